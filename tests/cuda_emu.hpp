// A CPU emulator of the CUDA C++ kernels' dialect (llamadist/kernels/int4_rows.cu: no CUDA
// headers, its PTX through cuda_ptx.cuh and cuda_mma.cuh), so that their source runs on a
// CPU as it is, compiled by g++ with this header forced in first (-include): the kernel's
// index arithmetic, its shared-memory layout, its cp.async groups and the warp's collective
// instructions run as written, against references, where no GPU is. tests/cuda_emu.py
// builds and launches it.
//
// How: each CUDA thread of a block is a coroutine (ucontext) on one OS thread; a block's
// threads run in turn until each reaches a barrier (__syncwarp, __syncthreads, or a warp's
// collective: ldmatrix, mma, shfl, which trade their operands through the warp's scratch
// between two barriers), and blocks run one after another (so a block's __shared__
// variables are the kernel function's statics). A cp.async copies nothing when issued: its
// group lands when wait_group lets it (from global memory, which no kernel writes here), so
// a slot read before its wait reads what was there before. The dynamic shared memory is
// filled with 0xFF bytes at each block's start. Checked, with the kernel's words in the
// error: every cp.async's source inside a buffer the launch registered and its
// destination inside the dynamic shared memory, every ldmatrix row inside it, and
// barriers that every thread of their scope reaches (a deadlock otherwise).
// Not emulated: timing, the memory model past the above, TMA (bulk copies, mbarriers).
// The numbers: mma sums in double and rounds once to float (a tensor core's order and
// rounding differ: results agree within float32's rounding, not to the bit); expf is the
// host's.
#pragma once
#define LLAMADIST_PTX_EMULATED 1

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

typedef unsigned int u32;
typedef unsigned short u16;

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return {x, y, z, w};
}

static inline float rsqrtf(float v) { return 1.f / sqrtf(v); }

namespace emu {

struct Copy {
    u32 dst;
    const void* src;
    int bytes;
};

struct Thread {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 idx;
    int warp = 0, lane = 0;
    bool done = false;
    int waiting = 0;      // 0 none, 1 warp barrier, 2 block barrier
    unsigned long gen = 0;  // the barrier's generation it waits past
    std::vector<Copy> open;                 // cp.async since the last commit
    std::deque<std::vector<Copy>> groups;  // committed, not yet landed
};

struct Barrier {
    int arrived = 0;
    unsigned long gen = 0;
};

struct Scratch {  // a warp's collective operands, one row a lane
    u32 v[32][10];
    float f[32];
};

struct State {
    std::vector<Thread> threads;
    std::vector<Barrier> warp_bars;
    Barrier block_bar;
    std::vector<Scratch> scratch;
    ucontext_t sched;
    Thread* cur = nullptr;
    std::vector<unsigned char> shared;  // the dynamic shared memory
    std::vector<std::pair<const char*, size_t>> buffers;  // global memory a launch may read
    std::string error;
    std::function<void()> kernel;
    int warps = 0;
};

inline State* S = nullptr;

[[noreturn]] inline void fail(const std::string& what) {
    char where[32];
    snprintf(where, sizeof where, " (thread %u)", S->cur->idx.x);
    if (S->error.empty())
        S->error = what + where;
    S->cur->done = true;
    swapcontext(&S->cur->ctx, &S->sched);  // never resumed
    abort();
}

inline void yield() { swapcontext(&S->cur->ctx, &S->sched); }

// every thread of the scope (1: the current warp, 2: the block) arrives before any goes on
inline void barrier(int scope) {
    Barrier& b = scope == 1 ? S->warp_bars[S->cur->warp] : S->block_bar;
    const int size = scope == 1 ? 32 : (int)S->threads.size();
    if (++b.arrived == size) {
        b.arrived = 0;
        ++b.gen;
        return;
    }
    S->cur->waiting = scope;
    S->cur->gen = b.gen;
    yield();
}

inline Scratch& scratch() { return S->scratch[S->cur->warp]; }

inline unsigned char* shared_at(u32 addr, size_t bytes, const char* what) {
    if ((size_t)addr + bytes > S->shared.size()) {
        char m[160];
        snprintf(m, sizeof m, "%s: shared address %u + %zu past the dynamic shared memory's %zu "
                 "bytes", what, addr, bytes, S->shared.size());
        fail(m);
    }
    return S->shared.data() + addr;
}

inline void check_global(const void* src, int bytes, const char* what) {
    const char* p = (const char*)src;
    for (auto& [base, size] : S->buffers)
        if (p >= base && p + bytes <= base + size)
            return;
    char m[160];
    snprintf(m, sizeof m, "%s: a %d-byte read at %p outside every buffer of the launch", what,
             bytes, src);
    fail(m);
}

inline void land(const std::vector<Copy>& group) {
    for (const Copy& c : group)
        memcpy(shared_at(c.dst, c.bytes, "cp.async"), c.src, c.bytes);
}

inline void cp_async(u32 dst, const void* src, int bytes) {
    check_global(src, bytes, "cp.async");
    shared_at(dst, bytes, "cp.async");
    if ((dst % bytes) || ((uintptr_t)src % bytes))
        fail("cp.async: an address not aligned to the copy's size");
    S->cur->open.push_back({dst, src, bytes});
}

inline void trampoline() {
    S->kernel();
    S->cur->done = true;
    swapcontext(&S->cur->ctx, &S->sched);
}

inline bool runnable(const Thread& t) {
    if (t.done)
        return false;
    if (t.waiting == 1)
        return S->warp_bars[t.warp].gen != t.gen;
    if (t.waiting == 2)
        return S->block_bar.gen != t.gen;
    return true;
}

}  // namespace emu

inline dim3 blockIdx, gridDim, blockDim;
#define threadIdx (emu::S->cur->idx)

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

static inline void __syncwarp() { emu::barrier(1); }
static inline void __syncthreads() { emu::barrier(2); }

static inline float __shfl_xor_sync(u32 mask, float v, int lanes) {
    if (mask != 0xFFFFFFFFu)
        emu::fail("__shfl_xor_sync: only a full warp's mask is emulated");
    emu::Scratch& s = emu::scratch();
    const int lane = emu::S->cur->lane;
    s.f[lane] = v;
    emu::barrier(1);
    const float r = s.f[lane ^ lanes];
    emu::barrier(1);
    return r;
}

// ---- cuda_mma.cuh --------------------------------------------------------------------------
static inline u16 to_bf16(float f) {
    u32 b;
    memcpy(&b, &f, 4);
    if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x7FFFFFu))
        return (u16)((b >> 16) | 0x40);  // a NaN stays one
    b += 0x7FFFu + ((b >> 16) & 1);   // round to nearest even
    return (u16)(b >> 16);
}

static inline float bf16_float(u32 h) {
    const u32 b = h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    emu::Scratch& s = emu::scratch();
    const int lane = emu::S->cur->lane;
    const u32 mine[10] = {a0, a1, a2, a3, b0, b1};
    memcpy(s.v[lane], mine, sizeof mine);
    emu::barrier(1);
    float A[16][16], B[16][8];
    for (int t = 0; t < 32; ++t) {
        const int g = t >> 2, c = t & 3;
        const u32* v = s.v[t];
        for (int e = 0; e < 2; ++e) {
            A[g][2 * c + e] = bf16_float(v[0] >> (16 * e) & 0xFFFF);
            A[g + 8][2 * c + e] = bf16_float(v[1] >> (16 * e) & 0xFFFF);
            A[g][2 * c + 8 + e] = bf16_float(v[2] >> (16 * e) & 0xFFFF);
            A[g + 8][2 * c + 8 + e] = bf16_float(v[3] >> (16 * e) & 0xFFFF);
            B[2 * c + e][g] = bf16_float(v[4] >> (16 * e) & 0xFFFF);
            B[2 * c + 8 + e][g] = bf16_float(v[5] >> (16 * e) & 0xFFFF);
        }
    }
    emu::barrier(1);
    const int g = lane >> 2, c = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
    for (int i = 0; i < 4; ++i) {
        double sum = d[i];
        for (int k = 0; k < 16; ++k)
            sum += (double)A[rows[i]][k] * B[k][cols[i]];
        d[i] = (float)sum;
    }
}

// ---- cuda_ptx.cuh --------------------------------------------------------------------------
#define SHARED_DYNAMIC(type, name) type* name = (type*)emu::S->shared.data()

static inline u32 smem(const void* p) {
    const unsigned char* q = (const unsigned char*)p;
    if (q < emu::S->shared.data() || q > emu::S->shared.data() + emu::S->shared.size())
        emu::fail("smem: a pointer outside the dynamic shared memory (static shared memory "
                  "has no emulated address)");
    return (u32)(q - emu::S->shared.data());
}

static inline void cp_async_cg16(u32 dst, const void* src) { emu::cp_async(dst, src, 16); }

template <int BYTES>
static inline void cp_async_ca(u32 dst, const void* src) { emu::cp_async(dst, src, BYTES); }

static inline void commit_group() {
    emu::Thread* t = emu::S->cur;
    t->groups.push_back(std::move(t->open));
    t->open.clear();
}

template <int N>
static inline void wait_group() {
    emu::Thread* t = emu::S->cur;
    while ((int)t->groups.size() > N) {
        emu::land(t->groups.front());
        t->groups.pop_front();
    }
}

static inline void wait_all() {
    commit_group();
    wait_group<0>();
}

static inline void grid_wait() {}
static inline void launch_dependents() {}

// a hint with no effect to emulate, but its range must lie in a buffer the launch reads
static inline void prefetch_l2_bulk(const void* p, u32 bytes) {
    if ((uintptr_t)p % 16 || bytes % 16 || bytes == 0)
        emu::fail("cp.async.bulk.prefetch: an address or size not a multiple of 16 bytes");
    emu::check_global(p, (int)bytes, "cp.async.bulk.prefetch");
}

static inline void prefetch_l2(const void* p) { emu::check_global(p, 1, "prefetch.global.L2"); }

static inline void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    emu::Scratch& s = emu::scratch();
    const int lane = emu::S->cur->lane;
    emu::shared_at(addr, 16, "ldmatrix");
    if (addr % 16)
        emu::fail("ldmatrix: a row address not aligned to 16 bytes");
    s.v[lane][0] = addr;
    emu::barrier(1);
    for (int q = 0; q < 4; ++q)
        memcpy(&r[q], emu::shared_at(s.v[8 * q + lane / 4][0] + 4 * (lane % 4), 4, "ldmatrix"), 4);
    emu::barrier(1);
}

static inline u32 ld_nc(const u32* p) {
    emu::check_global(p, 4, "ld.global.nc");
    return *p;
}

static inline void ld_nc_v2(u32 (&r)[2], const u32* p) {
    emu::check_global(p, 8, "ld.global.nc");
    if ((uintptr_t)p % 8)
        emu::fail("ld.global.nc.v2: an address not aligned to 8 bytes");
    memcpy(r, p, 8);
}

static inline void ld_nc_v4(u32 (&r)[4], const u32* p) {
    emu::check_global(p, 16, "ld.global.nc");
    if ((uintptr_t)p % 16)
        emu::fail("ld.global.nc.v4: an address not aligned to 16 bytes");
    memcpy(r, p, 16);
}

static inline float bits_float(u32 v) {
    float f;
    memcpy(&f, &v, 4);
    return f;
}

static inline u32 nibbles_or(u32 v, u32 magic) { return (v & 0x000F000Fu) | magic; }

static inline u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    u32 r = 0;
    for (int e = 0; e < 2; ++e) {
        const double v = (double)bf16_float(a >> (16 * e) & 0xFFFF) *
                         bf16_float(b >> (16 * e) & 0xFFFF) + bf16_float(c >> (16 * e) & 0xFFFF);
        r |= (u32)to_bf16((float)v) << (16 * e);
    }
    return r;
}

static inline u32 mul_hi(u32 a, u32 b) { return (u32)(((unsigned long long)a * b) >> 32); }

namespace emu {
// the kernel (a call of it with its arguments bound) on grid x threads, shared bytes of
// dynamic shared memory, reading only the buffers given; the first error's words, or ""
inline std::string launch(unsigned grid, unsigned threads, size_t shared,
                          std::vector<std::pair<const char*, size_t>> buffers,
                          std::function<void()> kernel) {
    if (threads % 32 || threads == 0 || threads > 1024)
        return "threads a block must be a multiple of 32, 32..1024";
    State st;
    S = &st;
    st.buffers = std::move(buffers);
    st.kernel = std::move(kernel);
    st.warps = threads / 32;
    st.shared.resize(shared);
    gridDim = {grid, 1, 1};
    blockDim = {threads, 1, 1};
    for (unsigned b = 0; b < grid && st.error.empty(); ++b) {
        blockIdx = {b, 0, 0};
        memset(st.shared.data(), 0xFF, shared);
        st.threads.assign(threads, Thread());
        st.warp_bars.assign(st.warps, Barrier());
        st.block_bar = Barrier();
        st.scratch.assign(st.warps, Scratch());
        for (unsigned i = 0; i < threads; ++i) {
            Thread& t = st.threads[i];
            t.idx = {i, 0, 0};
            t.warp = i / 32;
            t.lane = i % 32;
            t.stack.resize(256 * 1024);
            getcontext(&t.ctx);
            t.ctx.uc_stack.ss_sp = t.stack.data();
            t.ctx.uc_stack.ss_size = t.stack.size();
            t.ctx.uc_link = nullptr;
            makecontext(&t.ctx, trampoline, 0);
        }
        for (;;) {
            bool ran = false, left = false;
            for (Thread& t : st.threads) {
                if (!st.error.empty())
                    break;
                if (t.done)
                    continue;
                left = true;
                if (!runnable(t))
                    continue;
                t.waiting = 0;
                st.cur = &t;
                ran = true;
                swapcontext(&st.sched, &t.ctx);
            }
            if (!st.error.empty() || !left)
                break;
            if (!ran) {
                st.error = "deadlock: threads wait at a barrier that others never reach";
                break;
            }
        }
        if (st.error.empty())
            for (Thread& t : st.threads)
                if (!t.groups.empty() || !t.open.empty()) {
                    st.error = "a thread ended with cp.async copies not waited for";
                    break;
                }
        if (!st.error.empty()) {
            char where[64];
            snprintf(where, sizeof where, " [block %u]", b);
            st.error += where;
        }
    }
    S = nullptr;
    return st.error;
}
}  // namespace emu
