// y (M, N) = x (M, K) @ W^T for M <= 16 rows of bf16 x and an int4 W in tinygemm's layout
// (torch's _convert_weight_to_int4pack, as kernels.wquant_torch.tinygemm_layout states it):
// the small-batch decode product of int4 weights, compiled at first use by NVRTC
// (kernels.cuda_int4 says how and why). No CUDA headers: only PTX through inline asm
// (cuda_mma.cuh holds what it shares with int8_rows.cu, cuda_ptx.cuh the instructions it
// builds on, which tests/cuda_emu.hpp emulates on a CPU).
//
// tinygemm's word [n/8][kt][lane][w] holds, for row n = 8 (n/8) + lane/4 and c = lane % 4,
// the codes of k = 16 TILES kt + 32 w + 2c + {0, 1, 8, 9, 16, 17, 24, 25} (nibbles 0, 4,
// 1, 5, 2, 6, 3, 7). That is the B operand of mma.m16n8k16 (k x n, n = lane/4) for two
// k16 steps: nibbles (0, 4) -> b0 of step 0, (1, 5) -> b1, (2, 6) -> b0 of step 1, (3, 7)
// -> b1. One AND-OR makes a pair of bf16 128 + code (exact), so the loop only masks and
// issues mma. Up to 8 rows (WA) the B fragments of n-tiles 2p and 2p + 1 are together the
// A fragments of one mma (rows 0-7 and 8-15), and x's rows are its B columns: two n-tiles
// an mma; past 8 rows x (M rows, zero-padded to 16) is the A operand, one n-tile an mma.
//
// Per group (GROUP inputs, one scale s and zero z a row: w = (code - 8) s + z), with
// acc = sum (128 + code) x over the group and xs = sum x (the same mma with B = ones):
//   sum w x = s acc + (z - 136 s) xs           (CODES_EXACT 0: fp32 acc, mild cancellation)
//   sum w x = s acc' + z xs, acc' on code - 8  (CODES_EXACT 1: one bf16 fma a pair more)
//
// Work: a block takes NB consecutive n-tiles of 8 rows for all of K; its WARPS warps take
// the k-tiles (16 TILES inputs each) warp, warp + WARPS, ... and sum through shared memory
// at the end. Each warp keeps STAGES - 1 k-tiles of words (TILES/2 words a lane and
// n-tile, 16 bytes at TILES 8), of the scale table and of x in flight, cp.async into a
// ring in shared memory: each lane reads back only its own words; the table's 8-byte
// pairs (copied by the lanes of row 0) and x's rows (16-byte chunks, rows padded by 16
// bytes so the fragments' reads do not share banks) are shared through __syncwarp.
// Measured on an H200 (RESULTS.md, session 21), one row at that session's rule (8 x 4 x 4)
// takes 9.9 / 6.4 / 24.2 / 12.9 us on Llama-3-8B's qkv / o / gate_up / down against
// tinygemm's 10.4 / 7.6 / 34.6 / 19.4; the loads alone (PROBE 1) take 90% of that, the math
// alone (PROBE 2) 55-60%: the ring's loads (2.7 TB/s on gate_up) are what bounds it now.
// Timed through the decode step instead (session 30), 2 stages beat 4 on Llama-3-8B's four
// linears up to 4 rows, and 16 warps beat 8 where the grid is one block an SM
// (cuda_int4.rows_config; rule_form takes 4 stages or 8 warps where ptxas would spill).
//
// Compile-time parameters (-D): TILES (2, 4, 8), GROUP (32..256, a power of 2), WARPS,
// NB, STAGES (>= 2), ROWS (the most rows M a launch may have: 1..16; the ring holds as
// many of x's rows), CODES_EXACT (0, 1), PROBE (0; a measurement of where the time goes,
// never a product: 1 skips the math, 2 the global loads), WA (0, 1: W as the A operand,
// two n-tiles an mma, for ROWS <= 8 and NB even; see ktile), and three measured variants,
// off by default: HI_SHIFT (0, 1: see codes; not faster), TMA (0, 1: sm_90's bulk copies
// on an mbarrier a slot instead of cp.async, see issue; slower: one lane issues a k-tile's
// ~10 small copies), STAGGER (0, 1: each block's warps take their k-tiles from a rotated
// start; cp.async only; within noise). PERSIST (0, 1): a grid of one wave whose blocks
// loop over the tiles, the ring running on from one tile to the next (the rule's at 5-8
// rows of a wide W, where the math is heavier; at 1-4 rows slower: a block that starts
// issues its whole tile at once, more bytes in flight than a ring that runs on). PDL (0,
// 1; sm_90): a programmatic dependent launch (kernels.gpu.dependent_launches, the decode
// graphs' default there): the first k-tiles of words before griddepcontrol.wait, x after.
// GLU (0, 1; NB even): W is gate | up (N / 2 rows each) and y (M, N / 2) = silu(gate) * up,
// as eager_fused's kernel writes it from the product: a block's first NB / 2 n-tiles are
// gate's, the rest the same n-tiles of up's, and its sums end in that kernel's formula.
// NORM (0, 1; cp.async, not STAGGER): the product of RMSNorm(x + res) rather than of x,
// as eager_fused.add_rms_norm gives it (the kernel it saves runs before qkv and gate | up
// in every layer): after griddepcontrol.wait each block adds the rows of x and res (h =
// bf16(x + res); res may be null, then h = x), block 0 stores h (the residual stream) at
// hout, the block sums h^2 a row (its warps' sums in a fixed order) and writes bf16(gamma
// * bf16(h * rsqrt(mean + eps))) into a whole-K buffer of x's rows in shared memory, which
// the mma read in place of the ring's x (KP: its own buffer of x, in k-tiles).
// ROPE (0, or the head dimension D, a multiple of 16; NB even, not GLU): q and k leave the
// kernel rotated, as eager_fused.rope rotates the product's bf16 outputs (RoPE's kernel
// after the q | k | v projection, saved): a block's first NB / 2 n-tiles are the first
// halves of heads (columns d < D / 2 of a head), the rest the same n-tiles' partners (d +
// D / 2), so its sums end with both of each pair; the columns below rot (q's and k's
// heads) are rotated by the rows' cos and sin (M, D), the rest (v's) written as they are.
// PREFETCH (0, or bytes; PDL, a tile a block): before griddepcontrol.wait the grid's first
// blocks, up to PREFETCH bytes of words in all, also bring the rest of their tile's words
// and its table into the L2 (prefetch_tile), so that a dependent launch that waits long
// (after the attention, whose kernels leave the DRAM mostly idle) reads its words from
// the L2.
// KVW (0, 1; with ROPE): k's and v's heads (the columns from qcols on) also go straight
// into the paged KV cache, kv (2, blocks, H_kv, bs, D) by its strides, at each row's slot
// (slots (M,) int32): the K/V write kernel after RoPE, saved (y still gets every column).
// MINB (1; a measurement, see cuda_int4.MIN_BLOCKS): past 1, __launch_bounds__ asks ptxas
// for registers that let MINB blocks share an SM (the rule's one-row forms take 88-100,
// two blocks of 256 threads an SM; 80 would give three), spilling where it must.

#include "cuda_ptx.cuh"

#define W (TILES / 2)          // words a lane holds per n-tile and k-tile
#define KTILE (16 * TILES)     // inputs a k-tile
#define GPK (KTILE > GROUP ? KTILE / GROUP : 1)  // the table's groups a k-tile reads
#define ROWS16 (ROWS > 8)      // rows 9-16: the A operand's second half
#if WA && (ROWS > 8 || NB % 2)
#error "WA takes up to 8 rows and an even NB"
#endif
#if TMA && STAGGER
#error "STAGGER is a cp.async option"
#endif
#ifndef PERSIST
#define PERSIST 0
#endif
#if PERSIST && (TMA || STAGGER)
#error "PERSIST is a cp.async option, without STAGGER"
#endif
#ifndef PDL
#define PDL 0
#endif
#ifndef GLU
#define GLU 0
#endif
#ifndef MINB
#define MINB 1
#endif
#ifndef NORM
#define NORM 0
#endif
#if NORM  // the kernel's parameters past K: the residual, h's output, the norm's weight, eps
#define NORM_PARAMS , const u16* __restrict__ res, u16* __restrict__ hout, \
                    const u16* __restrict__ gamma, float eps
#else
#define NORM_PARAMS
#endif
#if NORM && (TMA || STAGGER || PERSIST)
#error "NORM is a cp.async option, without STAGGER, a tile a block (not PERSIST)"
#endif
#ifndef KP
#define KP 0
#endif
#ifndef ROPE
#define ROPE 0
#endif
#ifndef PREFETCH
#define PREFETCH 0
#endif
#if PREFETCH && (!PDL || PERSIST || KP)
#error "PREFETCH is a dependent launch's (PDL) option, a tile a block (not PERSIST or KP)"
#endif
#ifndef KVW
#define KVW 0
#endif
#if KVW && !ROPE
#error "KVW writes k's heads rotated: ROPE"
#endif
#if ROPE && (GLU || NB % 2 || ROPE % 16)
#error "ROPE pairs NB / 2 n-tiles of heads' first halves with their partners (D % 16 == 0)"
#endif
#if MINB > 1  // (an explicit 1 is not the same to ptxas: it allocates registers otherwise)
#define BOUNDS __launch_bounds__(WARPS * 32, MINB)
#else
#define BOUNDS __launch_bounds__(WARPS * 32)
#endif
#if GLU && (NB % 2)
#error "GLU pairs NB / 2 n-tiles of gate with as many of up"
#endif
#define YNB (GLU || ROPE ? NB / 2 : NB)  // a tile's n-tiles of y (ROPE: its pairs of them)
#if PDL && TMA
#error "PDL is a cp.async option"
#endif
#define NOUT (WA ? NB / 2 : NB)  // the mma outputs a lane sums: per n-tile, or pair (WA)

// W words (4 W bytes) from global to shared memory, asynchronously
static __device__ __forceinline__ void cp_words(u32 dst, const u32* src) {
#if W == 4
    cp_async_cg16(dst, src);
#else
    cp_async_ca<4 * W>(dst, src);
#endif
}

static __device__ __forceinline__ void cp16(u32 dst, const void* src) {
    cp_async_cg16(dst, src);
}

#if TMA
// sm_90's bulk copies (the TMA unit; one lane issues a whole run) completing on an mbarrier
static __device__ __forceinline__ void bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1], %2, [%3];" :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

static __device__ __forceinline__ void bar_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
}

static __device__ __forceinline__ void bar_expect(u32 bar, u32 bytes) {  // the one arrival
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes)
                 : "memory");
}

static __device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{ .reg .pred p;\n"
        "WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=; }" :: "r"(bar), "r"(parity) : "memory");
}
#endif

static __device__ __forceinline__ void cp8(u32 dst, const u32* src) {
    cp_async_ca<8>(dst, src);
}

static __device__ __forceinline__ float lo_f(u32 v) {  // bf16 in the low half -> float
    return bits_float(v << 16);
}

static __device__ __forceinline__ float hi_f(u32 v) {  // bf16 in the high half -> float
    return bits_float(v & 0xFFFF0000u);
}

// the pair of codes at nibbles (j, j + 4) as bf16 (128 + code), or code - 8 (CODES_EXACT):
// one LOP3 with the mask as its immediate and the magic in a register
// (HI_SHIFT: word >> shift as the high half of word * mul[shift / 4] = 2^(32 - shift), an
// IMAD on the FMA pipe, which the loop leaves half idle, not a SHF on the ALU pipe that the
// LOP3s fill; ptxas keeps the multiply as the factors are registers to it)
static __device__ __forceinline__ u32 codes(u32 word, int shift, u32 magic,
                                            const u32 (&mul)[4]) {
    u32 sh = word >> shift;
#if HI_SHIFT
    if (shift)
        sh = mul_hi(word, mul[shift / 4]);
#endif
    u32 v = nibbles_or(sh, magic);
#if CODES_EXACT
    v = fma_bf16x2(v, 0x3F803F80u, 0xC308C308u);
#endif
    return v;
}

// a row's (scale, zero) table word as the epilogue's factors: s, and z - 136 s (the codes
// entered the mma as 128 + code) or z (CODES_EXACT: as code - 8)
static __device__ __forceinline__ void scale_zero(u32 pair, float& s, float& z) {
    s = lo_f(pair);
#if CODES_EXACT
    z = hi_f(pair);
#else
    z = hi_f(pair) - 136.f * s;
#endif
}

// the ring in dynamic shared memory: per warp, STAGES slots of NB n-tiles' words (32 W a
// n-tile), of the table's pairs (GPK groups x 4 pairs of 8 bytes a n-tile) and of x's rows
// (XR rows of KTILE bf16, padded to XROW words)
// (NORM: x's rows live in a whole-K buffer after the ring; KP keeps its own buffer)
#define XR (NORM && !KP ? 0 : ROWS)
#define XROW (KTILE / 2 + 4)
#define X_AT (NB * 32 * W + NB * GPK * 4 * 2)
#define SLOT_WORDS (X_AT + XR * XROW)

// x's rows < M of a k-tile (src: row 0's first input of it) to shared memory (base's
// shared address, from word at; rows XROW words apart), in 16-byte chunks, 2 TILES a row
static __device__ __forceinline__ void cp_rows(u32 base, int at, const u16* src, int M, int K,
                                               int lane) {
#pragma unroll
    for (int t = lane; t < XR * 2 * TILES; t += 32) {
        const int r = t / (2 * TILES), ch = t % (2 * TILES);
        if (r < M)
            cp16(base + (at + r * XROW + 4 * ch) * 4, src + (size_t)r * K + 8 * ch);
    }
}

// the same into a ring slot (its shared address)
static __device__ __forceinline__ void cp_x(u32 slot, const u16* src, int M, int K, int lane) {
    cp_rows(slot, X_AT, src, M, K, lane);
}

// x's A fragments for word w from a slot's rows (row g: rg, row g + 8: rq; lane's c)
static __device__ __forceinline__ void frag_a(u32 (&a)[2][4], const u32* rg, const u32* rq,
                                              int w, int c) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const int i = 16 * w + 8 * s + c;  // word of input 32 w + 16 s + 2 c
        a[s][0] = rg[i];
        a[s][2] = rg[i + 4];
#if ROWS16
        a[s][1] = rq[i];
        a[s][3] = rq[i + 4];
#else
        a[s][1] = 0u;
        a[s][3] = 0u;
#endif
    }
}

// k-tile kt's products, added to out (see the header for the sums): cw its words, zs its
// slot's table pairs (per n-tile and group, the 8 rows' (scale, zero) words)
#if WA
// W as the A operand: n-tiles 2p and 2p + 1 are the A rows 0-7 and 8-15 of pair p's mma
// (tinygemm's B fragments of the two tiles are A's fragments), x's rows the B columns. d0,
// d1 are (n = 8 (2p) + g, rows 2c, 2c + 1), d2, d3 the same for n-tile 2p + 1; the sums of
// x (A = ones) hold rows 2c, 2c + 1 in xs[0], xs[1].
// x's B fragments come from one ldmatrix.x4 a word: xa is this lane's row address for it
// (matrix lane / 8 = inputs 8 (lane / 8) .. + 7 of x's row lane % 8, the last row past M).
static __device__ __forceinline__ void ktile(float (&out)[NB / 2][4], const u32 (&cw)[NB][W],
                                             u32 xa, const u32* zs, int g, u32 magic,
                                             u32 ones, const u32 (&mul)[4]) {
    float acc[NB / 2][4], xs[4];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        u32 xb[4];  // [2 s]: inputs 32 w + 16 s + 2 c, + 1 of row g; [2 s + 1]: 8 further
        ldmatrix_x4(xb, xa + 64 * w);
        if ((32 * w) % GROUP == 0) {
            xs[0] = xs[1] = xs[2] = xs[3] = 0.f;
#pragma unroll
            for (int p = 0; p < NB / 2; ++p)
                acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0.f;
        }
#pragma unroll
        for (int s = 0; s < 2; ++s)
            mma(xs, ones, ones, ones, ones, xb[2 * s], xb[2 * s + 1]);
#pragma unroll
        for (int p = 0; p < NB / 2; ++p) {
#pragma unroll
            for (int s = 0; s < 2; ++s)
                mma(acc[p], codes(cw[2 * p][w], 8 * s, magic, mul),
                    codes(cw[2 * p + 1][w], 8 * s, magic, mul),
                    codes(cw[2 * p][w], 8 * s + 4, magic, mul),
                    codes(cw[2 * p + 1][w], 8 * s + 4, magic, mul), xb[2 * s], xb[2 * s + 1]);
        }
        if (w == W - 1 || (32 * w + 32) % GROUP == 0) {
            const int q = GPK > 1 ? (32 * w) / GROUP : 0;
#pragma unroll
            for (int p = 0; p < NB / 2; ++p) {
                const u32 p0 = zs[(2 * p * GPK + q) * 8 + g];
                const u32 p1 = zs[((2 * p + 1) * GPK + q) * 8 + g];
                float s0, z0, s1, z1;
                scale_zero(p0, s0, z0);
                scale_zero(p1, s1, z1);
                out[p][0] = fmaf(s0, acc[p][0], fmaf(z0, xs[0], out[p][0]));  // two FFMAs
                out[p][1] = fmaf(s0, acc[p][1], fmaf(z0, xs[1], out[p][1]));
                out[p][2] = fmaf(s1, acc[p][2], fmaf(z1, xs[0], out[p][2]));
                out[p][3] = fmaf(s1, acc[p][3], fmaf(z1, xs[1], out[p][3]));
            }
        }
    }
}
#else
static __device__ __forceinline__ void ktile(float (&out)[NB][4], const u32 (&cw)[NB][W],
                                             const u32* rg, const u32* rq, const u32* zs,
                                             int c, u32 magic, u32 ones,
                                             const u32 (&mul)[4]) {
    float acc[NB][4], xs[4];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        u32 xa[2][4];
        frag_a(xa, rg, rq, w, c);
        if ((32 * w) % GROUP == 0) {  // a group starts here (GROUP and KTILE: powers of 2)
            xs[0] = xs[1] = xs[2] = xs[3] = 0.f;
#pragma unroll
            for (int b = 0; b < NB; ++b)
                acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = 0.f;
        }
#pragma unroll
        for (int s = 0; s < 2; ++s)
            mma(xs, xa[s][0], xa[s][1], xa[s][2], xa[s][3], ones, ones);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int s = 0; s < 2; ++s)
                mma(acc[b], xa[s][0], xa[s][1], xa[s][2], xa[s][3],
                    codes(cw[b][w], 8 * s, magic, mul), codes(cw[b][w], 8 * s + 4, magic, mul));
        }
        if (w == W - 1 || (32 * w + 32) % GROUP == 0) {  // the group (or the k-tile) ends
            const int q = GPK > 1 ? (32 * w) / GROUP : 0;
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                const u32 p0 = zs[((b * GPK + q) * 4 + c) * 2];
                const u32 p1 = zs[((b * GPK + q) * 4 + c) * 2 + 1];
                float s0, z0, s1, z1;
                scale_zero(p0, s0, z0);
                scale_zero(p1, s1, z1);
                out[b][0] = fmaf(s0, acc[b][0], fmaf(z0, xs[0], out[b][0]));
                out[b][1] = fmaf(s1, acc[b][1], fmaf(z1, xs[1], out[b][1]));
                out[b][2] = fmaf(s0, acc[b][2], fmaf(z0, xs[2], out[b][2]));
                out[b][3] = fmaf(s1, acc[b][3], fmaf(z1, xs[3], out[b][3]));
            }
        }
    }
}
#endif

// n-tile b of tile t (tiles of NB n-tiles; GLU: the first YNB n-tiles of gate's half of
// W, then the same of up's), clamped to the last (of the half) past the end: read, never
// written
static __device__ __forceinline__ int ntile(int t, int b, int NT) {
#if ROPE
    // ROPE: pair u's n-tiles, u / (D / 16) the head and u % (D / 16) the n-tile of its first
    // half: that one, and its partner D / 16 n-tiles on
    const int half = ROPE / 16, u = min(t * YNB + b % YNB, NT / 2 - 1);
    const int lo = (u / half) * 2 * half + u % half;
    return b < YNB ? lo : lo + half;
#else
    const int nty = GLU ? NT >> 1 : NT, i = min(t * YNB + b % YNB, nty - 1);
    return b < YNB ? i : nty + i;
#endif
}

#if PREFETCH
// PREFETCH: the block's words (each n-tile's run over all of K, contiguous in tinygemm's
// layout) and its table's lines into the L2, before griddepcontrol.wait, where the grid's
// blocks before it and it hold at most PREFETCH bytes of words (blocks start in order: the
// first wave's, whose wait may be long, while the kernel before, attention or another
// projection, leaves the DRAM idle or half used). A hint: nothing waits for it, and the
// ring's copies read the same bytes, from the L2 where they came in time.
static __device__ __forceinline__ void prefetch_tile(const u32* words, const u32* sz, int N,
                                                     int K, int KT, int NT) {
    const int run = KT * 32 * W * 4, chunk = 16384;  // bytes of an n-tile's words; a hint's
    if ((unsigned long long)(blockIdx.x + 1) * NB * run > (unsigned long long)PREFETCH)
        return;
    const int chunks = (run + chunk - 1) / chunk, threads = WARPS * 32;
    for (int i = threadIdx.x; i < NB * chunks; i += threads) {
        const int b = i / chunks, at = (i % chunks) * chunk;
        prefetch_l2_bulk((const char*)(words + (size_t)ntile(blockIdx.x, b, NT) * KT * 32 * W)
                         + at, min(chunk, run - at));
    }
    for (int i = threadIdx.x; i < (K / GROUP) * NB; i += threads)  // 32 bytes each
        prefetch_l2(sz + (size_t)(i / NB) * N + ntile(blockIdx.x, i % NB, NT) * 8);
}
#endif

// ROPE's operands (unused else): cos and sin (M, D) bf16, and the columns it rotates; KVW's:
// the cache, the rows' slots, k's first column, the cache's block size and strides
// (elements: k to v, a block, a head, a slot)
struct Rope {
    const u16* cs;
    const u16* sn;
    int rot;
    u16* kv;
    const int* slots;
    int qcols, bs;
    long long s_kv, s_b, s_h, s_s;
};
#if ROPE
#define ROPE_PARAMS , const u16* __restrict__ cs, const u16* __restrict__ sn, int rot KVW_PARAMS
#else
#define ROPE_PARAMS
#endif
#if KVW
#define KVW_PARAMS , u16* __restrict__ kv, const int* __restrict__ slots, int qcols, \
                   int bs, long long s_kv, long long s_b, long long s_h, long long s_s
#define ROPE_OF_PARAMS {cs, sn, rot, kv, slots, qcols, bs, s_kv, s_b, s_h, s_s}
#elif ROPE
#define KVW_PARAMS
#define ROPE_OF_PARAMS {cs, sn, rot, nullptr, nullptr, 0, 0, 0, 0, 0, 0}
#else
#define ROPE_OF_PARAMS {nullptr, nullptr, 0, nullptr, nullptr, 0, 0, 0, 0, 0, 0}
#endif

// the kernel's entry: one parameter list for every form (the one cuda_int4's launches pass)
#define INT4_ROWS_ENTRY                                                                   \
    extern "C" __global__ void BOUNDS int4_rows(                                          \
        const u16* __restrict__ x, const u32* __restrict__ words,                         \
        const u32* __restrict__ sz, u16* __restrict__ y, int M, int N, int K NORM_PARAMS \
        ROPE_PARAMS)

#if ROPE
// out = x cos + rotate_half(x) sin at column d of a head, x its bf16 value and partner the
// bf16 value D / 2 columns off (first half: rotate_half = -partner), each product and the
// sum rounded to bf16, as eager_fused.rope's kernel rounds them
static __device__ __forceinline__ u16 rotated(u16 x, u16 partner, bool first, u16 c, u16 s) {
    const float p = first ? -lo_f(partner) : lo_f(partner);
    return to_bf16(lo_f(to_bf16(lo_f(x) * lo_f(c))) + lo_f(to_bf16(p * lo_f(s))));
}
#endif

#if GLU
// silu(gate) * up as eager_fused's kernel writes it from the product's bf16 outputs:
// CUDA's expf, a rounded division (NVRTC's default), each rounded to bf16
static __device__ __forceinline__ u16 silu_times(float gate, float up) {
    gate = lo_f(to_bf16(gate));
    const float act = lo_f(to_bf16(gate / (1.f + expf(-gate))));
    return to_bf16(act * lo_f(to_bf16(up)));
}
#endif

// y's rows of tile t from the warps' partial sums in red (summed in warp order): per n-tile
// b, red[warp][b][row of x][n of the n-tile]; GLU: silu(gate) * up of each gate n-tile and
// its up n-tile (n-tile YNB + b)
static __device__ __forceinline__ void write_tile(
        const float (&red)[WARPS][NB][ROWS16 ? 16 : 8][8], u16* __restrict__ y, int M, int N,
        int NT, int t, const Rope& rp) {
    const int rows = ROWS16 ? 16 : 8;
    for (int e = threadIdx.x; e < YNB * rows * 8; e += WARPS * 32) {
        const int b = e / (rows * 8), m = (e / 8) % rows, j = e % 8, nt = t * YNB + b;
        if (m >= M || nt >= (GLU || ROPE ? NT / 2 : NT)) continue;  // past y's n-tiles
        float v = 0.f, up = 0.f;
#pragma unroll
        for (int i = 0; i < WARPS; ++i) {
            v += red[i][b][m][j];
            if (GLU || ROPE)
                up += red[i][YNB + b][m][j];
        }
#if GLU
        y[(size_t)m * (N / 2) + nt * 8 + j] = silu_times(v, up);
#elif ROPE
        // pair nt: column col of a head's first half (d < D / 2) and col + D / 2
        const int col = ntile(t, b, NT) * 8 + j, d = col % ROPE;
        u16 lo = to_bf16(v), hi = to_bf16(up);
        if (col < rp.rot) {
            const u16* cs = rp.cs + (size_t)m * ROPE;
            const u16* sn = rp.sn + (size_t)m * ROPE;
            const u16 a = rotated(lo, hi, true, cs[d], sn[d]);
            hi = rotated(hi, lo, false, cs[d + ROPE / 2], sn[d + ROPE / 2]);
            lo = a;
        }
        y[(size_t)m * N + col] = lo;
        y[(size_t)m * N + col + ROPE / 2] = hi;
#if KVW
        if (col >= rp.qcols) {  // k's head (below rot) or v's: into the cache at m's slot
            const bool is_v = col >= rp.rot;
            // the slot's block and place in it in 32 bits (a 64-bit division is a long
            // call on the GPU, here once for each element stored)
            const int slot = rp.slots[m], blk = slot / rp.bs, pos = slot - blk * rp.bs;
            u16* dst = rp.kv + (is_v ? rp.s_kv : 0) + blk * rp.s_b
                       + ((col - (is_v ? rp.rot : rp.qcols)) / ROPE) * rp.s_h
                       + pos * rp.s_s + d;
            dst[0] = lo;
            dst[ROPE / 2] = hi;
        }
#endif
#else
        y[(size_t)m * N + nt * 8 + j] = to_bf16(v);
#endif
    }
}

// the warps' partial sums of tile t's rows: d0, d1 are (row g, n 2c, 2c + 1), d2, d3 the
// same at row g + 8 (WA: see ktile), summed over the warps through red; GLU: y (M, N / 2)
// = silu(gate) * up of each gate n-tile and its up n-tile
static __device__ __forceinline__ void sum_tile(const float (&out)[NOUT][4],
                                                float (&red)[WARPS][NB][ROWS16 ? 16 : 8][8],
                                                u16* __restrict__ y, int warp, int g, int c,
                                                int M, int N, int NT, int t, const Rope& rp) {
#if WA
#pragma unroll
    for (int p = 0; p < NB / 2; ++p) {
        red[warp][2 * p][2 * c][g] = out[p][0];
        red[warp][2 * p][2 * c + 1][g] = out[p][1];
        red[warp][2 * p + 1][2 * c][g] = out[p][2];
        red[warp][2 * p + 1][2 * c + 1][g] = out[p][3];
    }
#else
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        red[warp][b][g][2 * c] = out[b][0];
        red[warp][b][g][2 * c + 1] = out[b][1];
#if ROWS16
        red[warp][b][g + 8][2 * c] = out[b][2];
        red[warp][b][g + 8][2 * c + 1] = out[b][3];
#endif
    }
#endif
    __syncthreads();
    write_tile(red, y, M, N, NT, t, rp);
}

#if NORM
// h = bf16(a + b) of four words' bf16 pairs (b null: a), as torch adds bf16 tensors
static __device__ __forceinline__ uint4 add_pairs(uint4 a, const uint4* b) {
    if (!b)
        return a;
    const uint4 c = *b;
    const u32 in[4] = {a.x, a.y, a.z, a.w}, with[4] = {c.x, c.y, c.z, c.w};
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        out[i] = (u32)to_bf16(lo_f(in[i]) + lo_f(with[i])) |
                 ((u32)to_bf16(hi_f(in[i]) + hi_f(with[i])) << 16);
    return make_uint4(out[0], out[1], out[2], out[3]);
}

static __device__ __forceinline__ float squares(uint4 h) {
    const u32 w[4] = {h.x, h.y, h.z, h.w};
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        t += lo_f(w[i]) * lo_f(w[i]) + hi_f(w[i]) * hi_f(w[i]);
    return t;
}

// bf16(g * bf16(h * r)) of four words' pairs, as RMSNorm.forward's last two roundings
static __device__ __forceinline__ uint4 scaled(uint4 h, uint4 g, float r) {
    const u32 hw[4] = {h.x, h.y, h.z, h.w}, gw[4] = {g.x, g.y, g.z, g.w};
    u32 out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float lo = lo_f(to_bf16(lo_f(hw[i]) * r)), hi = lo_f(to_bf16(hi_f(hw[i]) * r));
        out[i] = (u32)to_bf16(lo_f(gw[i]) * lo) | ((u32)to_bf16(hi_f(gw[i]) * hi) << 16);
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// where chunk c (inputs 8 c .. 8 c + 7) of x's row m sits in the whole-K buffer: rows of
// xrow words, or KP's k-tiles of XR rows (XROW words each)
static __device__ __forceinline__ u32* norm_at(u32* xbuf, int xrow, int m, int c) {
#if KP
    return xbuf + (c / (2 * TILES)) * (XR * XROW) + m * XROW + 4 * (c % (2 * TILES));
#else
    return xbuf + m * xrow + 4 * c;
#endif
}

// x's rows < M of the product: RMSNorm(x + res) with weight gamma into xbuf (at norm_at),
// h = x + res stored at hout by block 0 (both null: no add, no store)
static __device__ __forceinline__ void norm_rows(const u16* __restrict__ x,
                                                 const u16* __restrict__ res,
                                                 u16* __restrict__ hout,
                                                 const u16* __restrict__ gamma, float eps,
                                                 u32* xbuf, int xrow, float (&nred)[WARPS][ROWS],
                                                 int M, int K, int warp, int lane) {
    const int chunks = K >> 3;  // 16-byte chunks of 8 inputs a row
    float ss[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        ss[m] = 0.f;
        if (m < M)
            for (int c = threadIdx.x; c < chunks; c += WARPS * 32) {
                const size_t at = (size_t)m * K + 8 * c;
                const uint4 h = add_pairs(*(const uint4*)(x + at),
                                          res ? (const uint4*)(res + at) : nullptr);
                ss[m] += squares(h);
                *(uint4*)norm_at(xbuf, xrow, m, c) = h;
                if (hout && blockIdx.x == 0)
                    *(uint4*)(hout + at) = h;
            }
#pragma unroll
        for (int o = 16; o; o >>= 1)
            ss[m] += __shfl_xor_sync(0xFFFFFFFFu, ss[m], o);
        if (lane == 0)
            nred[warp][m] = ss[m];
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        if (m >= M)
            break;
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w)
            t += nred[w][m];
        const float r = rsqrtf(t / (float)K + eps);
        for (int c = threadIdx.x; c < chunks; c += WARPS * 32) {
            u32* at = norm_at(xbuf, xrow, m, c);
            *(uint4*)at = scaled(*(const uint4*)at, *(const uint4*)(gamma + 8 * c), r);
        }
    }
    __syncthreads();
}
#endif

#if KP
// ---- KP: a warp's step is two consecutive k-tiles of one n-tile ----
// W as the A operand (up to 4 rows): its rows 0-7 are the n-tile's 8 rows at k-tile kt0
// (tinygemm's B fragments of that 512-byte run) and rows 8-15 the same rows at kt0 + 1 (the
// next 512 bytes); B's columns 0-3 are x's rows at kt0 and 4-7 at kt0 + 1. Of D, the rows
// 0-7 x columns 0-3 and rows 8-15 x columns 4-7 are the two k-tiles' products; the rest
// (a k-tile's codes against the other's x) is never used. A lane (g, c) keeps those of
// half h = c / 2: row g, x's rows 2 (c % 2) and + 1 of k-tile kt0 + h (d0, d1 at h 0; d2,
// d3 at h 1), and lanes c and c ^ 2 add theirs at the n-tile's end.
// Order: a block takes NB n-tiles one after another (KP2 = KT / 2 pairs each, rounded up);
// warp w takes pairs w, w + WARPS, ... of each, so at any time the block's warps read one
// contiguous run of about WARPS KB (at 8 TILES) where the WA form reads NB runs 16 KB apart
// (K = 4 096): the order of a plain read, which reads the same words faster (RESULTS.md,
// session 33). x is read once a block, into a buffer of all its k-tiles (a warp's own
// pairs' k-tiles, with the first n-tile's pairs). KP 1: the ring slots hold the pair's
// words and table (cp.async, as the WA form); KP 2: no ring, each lane loads its own words
// (its A fragments) and table words (its row's scale and zero) straight into registers,
// STAGES - 1 pairs ahead of the one it multiplies, and a warp's x comes whole at its start.
// An odd KT's last pair has a second k-tile of zeros in x's buffer (its words and table the
// first's: zero products).
#if ROWS > 4 || TMA || STAGGER || PERSIST || HI_SHIFT || KP > 2
#error "KP (1, 2) takes up to 4 rows, cp.async, no PERSIST, STAGGER or HI_SHIFT"
#endif
#define KSLOT_WORDS (2 * 32 * W + 2 * GPK * 8)  // a slot: two runs of words, their table
#define XKT (XR * XROW)                          // x's buffer: words a k-tile

// the pair's products (cw[h]: k-tile kt0 + h's words; xa: this lane's ldmatrix address in
// x's buffer at kt0; tz: the table's words of the lane's row g and k-tile kt0 + h, a group
// each) added to o0, o1: row g against x's rows 2 (c % 2), + 1 of k-tile kt0 + h
static __device__ __forceinline__ void kpair(float& o0, float& o1, const u32 (&cw)[2][W],
                                             u32 xa, const u32 (&tz)[GPK], int h, u32 magic,
                                             u32 ones, const u32 (&mul)[4]) {
    float acc[4], xs[4];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        u32 xb[4];  // [2 s]: inputs 32 w + 16 s + 2 c, + 1 of column g; [2 s + 1]: 8 further
        ldmatrix_x4(xb, xa + 64 * w);
        if ((32 * w) % GROUP == 0)
            acc[0] = acc[1] = acc[2] = acc[3] = xs[0] = xs[1] = xs[2] = xs[3] = 0.f;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            mma(xs, ones, ones, ones, ones, xb[2 * s], xb[2 * s + 1]);
            mma(acc, codes(cw[0][w], 8 * s, magic, mul), codes(cw[1][w], 8 * s, magic, mul),
                codes(cw[0][w], 8 * s + 4, magic, mul), codes(cw[1][w], 8 * s + 4, magic, mul),
                xb[2 * s], xb[2 * s + 1]);
        }
        if (w == W - 1 || (32 * w + 32) % GROUP == 0) {
            const int q = GPK > 1 ? (32 * w) / GROUP : 0;
            float s, z;
            scale_zero(tz[q], s, z);
            o0 = fmaf(s, h ? acc[2] : acc[0], fmaf(z, xs[0], o0));
            o1 = fmaf(s, h ? acc[3] : acc[1], fmaf(z, xs[1], o1));
        }
    }
}

// a lane's place in a k-pair block: its warp, lane (g, c), half h, the n-tiles and k-tiles,
// the pairs a n-tile (KP2) and this warp's (per), its ldmatrix row address in x's buffer
// (B's column n = lane % 8 is x's row n % 4, the last row past M, of the pair's k-tile n /
// 4; matrix lane / 8 holds inputs 8 (lane / 8) .. + 7 of a word's 32)
struct KpLane {
    int warp, lane, g, c, h, NT, KT, KP2, per;
    u32 xlane;
};

static __device__ __forceinline__ KpLane kp_lane(int M, int N, int K) {
    KpLane l;
    l.warp = threadIdx.x >> 5;
    l.lane = threadIdx.x & 31;
    l.g = l.lane >> 2;
    l.c = l.lane & 3;
    l.h = l.c >> 1;
    l.NT = N >> 3;
    l.KT = K / KTILE;
    l.KP2 = (l.KT + 1) >> 1;
    l.per = l.warp < l.KP2 ? (l.KP2 - 1 - l.warp) / WARPS + 1 : 0;
    const int xn = l.lane & 7;
    l.xlane = ((xn >> 2) * XKT + min(xn & 3, M - 1) * XROW) * 4 + 16 * (l.lane >> 3);
    return l;
}

// an odd KT's phantom k-tile in x's buffer: zeros, written by the warp whose last pair it is
static __device__ __forceinline__ void kp_phantom(u32* xbuf, const KpLane& l, int M) {
    if ((l.KT & 1) && l.warp == (l.KP2 - 1) % WARPS)
        for (int e = l.lane; e < M * XROW; e += 32)
            xbuf[l.KT * XKT + e] = 0u;
}

// x's rows of the pair's k-tiles kt0 and kt0 + 1 (< KT) into x's buffer (its shared address)
static __device__ __forceinline__ void cp_pair_x(u32 xbuf_s, const u16* x, int kt0,
                                                 const KpLane& l, int M, int K) {
    cp_rows(xbuf_s, kt0 * XKT, x + (size_t)kt0 * KTILE, M, K, l.lane);
    if (kt0 + 1 < l.KT)
        cp_rows(xbuf_s, (kt0 + 1) * XKT, x + (size_t)(kt0 + 1) * KTILE, M, K, l.lane);
}

// a warp's sums of n-tile b into red: lane c's sums of k-tile kt0 and lane c ^ 2's of kt0
// + 1 are the same outputs (row g against x's rows 2 (c % 2), + 1), added first
static __device__ __forceinline__ void kp_store(float (&red)[WARPS][NB][8][8], int b,
                                                const KpLane& l, float o0, float o1) {
    o0 += __shfl_xor_sync(0xFFFFFFFFu, o0, 2);
    o1 += __shfl_xor_sync(0xFFFFFFFFu, o1, 2);
    if (l.c < 2) {
        red[l.warp][b][2 * l.c][l.g] = o0;
        red[l.warp][b][2 * l.c + 1][l.g] = o1;
    }
}

#if KP == 1
INT4_ROWS_ENTRY {
    const Rope rp = ROPE_OF_PARAMS;
    __shared__ float red[WARPS][NB][8][8];
#if NORM
    __shared__ float nred[WARPS][ROWS];  // the warps' sums of h^2 a row
#endif
    SHARED_DYNAMIC(u32, ring);  // WARPS * STAGES slots, then x's buffer
    const KpLane l = kp_lane(M, N, K);
    const int warp = l.warp, lane = l.lane, g = l.g, c = l.c, h = l.h, NT = l.NT, KT = l.KT;
    const int per = l.per;
    u32 magic = 0x43004300u, ones = 0x3F803F80u;
    u32 mul[4] = {1u, 1u << 28, 1u << 24, 1u << 20};
    asm volatile("" : "+r"(magic), "+r"(ones), "+r"(mul[1]), "+r"(mul[2]), "+r"(mul[3]));
    u32* mine = ring + warp * STAGES * KSLOT_WORDS;
    const u32 mine_s = smem(mine);
    u32* xbuf = ring + WARPS * STAGES * KSLOT_WORDS;  // 2 KP2 k-tiles of x's rows
    const u32 xbuf_s = smem(xbuf);
    kp_phantom(xbuf, l, M);

    // iteration i's pair into slot i % STAGES, one commit group each: the next issue's n-tile
    // (of the block's) and pair (of this warp's), moved on by each issue
    int ib = per ? 0 : NB, iq = 0, fill = 0;
    auto issue = [&](bool with_x) {
        if (ib < NB && PROBE != 2) {
            const u32 slot = mine_s + fill * (KSLOT_WORDS * 4);
            const int nt = ntile(blockIdx.x, ib, NT), kt0 = 2 * (warp + iq * WARPS);
            const int kt1 = min(kt0 + 1, KT - 1);  // (the phantom's: kt0's, against zeros)
            const u32* run = words + (size_t)nt * KT * (32 * W) + lane * W;
            cp_words(slot + lane * W * 4, run + (size_t)kt0 * (32 * W));
            cp_words(slot + (32 * W + lane * W) * 4, run + (size_t)kt1 * (32 * W));
            if (g == 0) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const u32* zsrc = sz + (size_t)((hh ? kt1 : kt0) * KTILE / GROUP) * N
                                      + nt * 8 + 2 * c;
#pragma unroll
                    for (int q = 0; q < GPK; ++q)
                        cp8(slot + (2 * 32 * W + ((hh * GPK + q) * 4 + c) * 2) * 4,
                            zsrc + (size_t)q * N);
                }
            }
            if (!NORM && with_x && ib == 0)  // the first n-tile's pairs bring x's k-tiles
                cp_pair_x(xbuf_s, x, kt0, l, M, K);
            if (++iq == per) {
                iq = 0;
                ++ib;
            }
        }
        fill = fill == STAGES - 1 ? 0 : fill + 1;
        commit_group();
    };

#if PDL
    // as the WA form: the first STAGES - 1 issues' words and table before the wait, their x
    // (the first n-tile's pairs among them) after it, in one group
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
        issue(false);
    grid_wait();
    if (PROBE != 2 && !NORM)
        for (int q = 0; q < min(per, STAGES - 1); ++q)
            cp_pair_x(xbuf_s, x, 2 * (warp + q * WARPS), l, M, K);
    commit_group();
#if NORM
    norm_rows(x, res, hout, gamma, eps, xbuf, 0, nred, M, K, warp, lane);
#endif
    launch_dependents();
#else
    for (int s = 0; s < STAGES - 1; ++s)
        issue(true);
#if NORM
    norm_rows(x, res, hout, gamma, eps, xbuf, 0, nred, M, K, warp, lane);
#endif
#endif
    int i = 0, use = 0;
#pragma unroll 1
    for (int b = 0; b < NB; ++b) {
        float o0 = 0.f, o1 = 0.f;
        for (int q = 0; q < per; ++q, ++i, use = use == STAGES - 1 ? 0 : use + 1) {
            issue(true);
#if PDL
            if (i == 0)  // the prologue's x came in a group after its words
                wait_group<1>();
            else
#endif
            wait_group<STAGES - 1>();
            __syncwarp();  // the table's pairs and x's rows came from other lanes
            const u32* slot = mine + use * KSLOT_WORDS;
            u32 cw[2][W];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int w = 0; w < W; ++w)
                    cw[hh][w] = slot[hh * 32 * W + lane * W + w];
            u32 tz[GPK];  // the lane's row and k-tile: (h, group, row) words in the slot
#pragma unroll
            for (int r = 0; r < GPK; ++r)
                tz[r] = slot[2 * 32 * W + (h * GPK + r) * 8 + g];
            if (PROBE != 1)
                kpair(o0, o1, cw, xbuf_s + 2 * (warp + q * WARPS) * XKT * 4 + l.xlane, tz, h,
                      magic, ones, mul);
            __syncwarp();  // every lane done with the slot before the next issue refills it
        }
        kp_store(red, b, l, o0, o1);
    }
    __syncthreads();
    write_tile(red, y, M, N, NT, blockIdx.x, rp);
    wait_all();
}
#else  // KP 2
// a lane's W words of a run, straight into registers (read once: past the L1)
static __device__ __forceinline__ void ld_words(u32 (&r)[W], const u32* p) {
#if W == 4
    ld_nc_v4(r, p);
#elif W == 2
    ld_nc_v2(r, p);
#else
    r[0] = ld_nc(p);
#endif
}

INT4_ROWS_ENTRY {
    const Rope rp = ROPE_OF_PARAMS;
    __shared__ float red[WARPS][NB][8][8];
#if NORM
    __shared__ float nred[WARPS][ROWS];  // the warps' sums of h^2 a row
#endif
    SHARED_DYNAMIC(u32, xbuf);  // x's buffer only: 2 KP2 k-tiles of x's rows
    const KpLane l = kp_lane(M, N, K);
    const int warp = l.warp, lane = l.lane, g = l.g, h = l.h, NT = l.NT, KT = l.KT;
    const int per = l.per, total = NB * per;
    u32 magic = 0x43004300u, ones = 0x3F803F80u;
    u32 mul[4] = {1u, 1u << 28, 1u << 24, 1u << 20};
    asm volatile("" : "+r"(magic), "+r"(ones), "+r"(mul[1]), "+r"(mul[2]), "+r"(mul[3]));
    const u32 xbuf_s = smem(xbuf);
    kp_phantom(xbuf, l, M);

    // the pairs in flight: words and table words of pairs i + 1 .. i + D while pair i's
    // multiply (D = STAGES - 1; constant indices only, so that they stay in registers)
    constexpr int D = STAGES - 1;
    u32 wq[D][2][W], tq[D][GPK];
    int ib = per ? 0 : NB, iq = 0;  // the next load's n-tile (of the block's) and pair
    auto load = [&](u32 (&wr)[2][W], u32 (&tr)[GPK]) {
        if (ib < NB && PROBE != 2) {
            const int nt = ntile(blockIdx.x, ib, NT), kt0 = 2 * (warp + iq * WARPS);
            const int kt1 = min(kt0 + 1, KT - 1);
            const u32* run = words + (size_t)nt * KT * (32 * W) + lane * W;
            ld_words(wr[0], run + (size_t)kt0 * (32 * W));
            ld_words(wr[1], run + (size_t)kt1 * (32 * W));
            const u32* zsrc = sz + (size_t)((h ? kt1 : kt0) * KTILE / GROUP) * N + nt * 8 + g;
#pragma unroll
            for (int q = 0; q < GPK; ++q)
                tr[q] = ld_nc(zsrc + (size_t)q * N);
            if (++iq == per) {
                iq = 0;
                ++ib;
            }
        }
    };

    // the first D pairs' words (the model's: before the wait of a dependent launch), then
    // the warp's k-tiles of x (the kernel before's output) in one group
#pragma unroll
    for (int s = 0; s < D; ++s)
        load(wq[s], tq[s]);
#if PDL
    grid_wait();
#endif
#if NORM
    norm_rows(x, res, hout, gamma, eps, xbuf, 0, nred, M, K, warp, lane);  // (synced)
#else
    if (PROBE != 2)
        for (int q = 0; q < per; ++q)
            cp_pair_x(xbuf_s, x, 2 * (warp + q * WARPS), l, M, K);
    commit_group();
#endif
#if PDL
    launch_dependents();
#endif
    wait_group<0>();
    __syncwarp();  // x's rows came from other lanes (and the phantom's zeros)

    float o0 = 0.f, o1 = 0.f;
    for (int i = 0, b = 0, q = 0; i < total; ++i) {
        u32 cw[2][W], tz[GPK];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int w = 0; w < W; ++w)
                cw[hh][w] = wq[0][hh][w];
#pragma unroll
        for (int r = 0; r < GPK; ++r)
            tz[r] = tq[0][r];
#pragma unroll
        for (int s = 0; s + 1 < D; ++s) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int w = 0; w < W; ++w)
                    wq[s][hh][w] = wq[s + 1][hh][w];
#pragma unroll
            for (int r = 0; r < GPK; ++r)
                tq[s][r] = tq[s + 1][r];
        }
        load(wq[D - 1], tq[D - 1]);  // pair i + D
        if (PROBE != 1)
            kpair(o0, o1, cw, xbuf_s + 2 * (warp + q * WARPS) * XKT * 4 + l.xlane, tz, h,
                  magic, ones, mul);
        if (++q == per) {  // the n-tile's last pair
            kp_store(red, b, l, o0, o1);
            o0 = o1 = 0.f;
            q = 0;
            ++b;
        }
    }
    if (!per)  // a warp past the pairs: its sums are zeros
        for (int b = 0; b < NB; ++b)
            kp_store(red, b, l, 0.f, 0.f);
    __syncthreads();
    write_tile(red, y, M, N, NT, blockIdx.x, rp);
}
#endif  // KP 1, 2
#else
INT4_ROWS_ENTRY {
    const Rope rp = ROPE_OF_PARAMS;
    __shared__ float red[WARPS][NB][ROWS16 ? 16 : 8][8];
#if NORM
    __shared__ float nred[WARPS][ROWS];  // the warps' sums of h^2 a row
#endif
#if TMA
    __shared__ __align__(8) unsigned long long bars[WARPS][STAGES];  // a slot's mbarrier
#endif
    SHARED_DYNAMIC(u32, ring);  // WARPS * STAGES * SLOT_WORDS
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int NT = N >> 3, KT = K / KTILE;
    u32 magic = 0x43004300u, ones = 0x3F803F80u;
    u32 mul[4] = {1u, 1u << 28, 1u << 24, 1u << 20};  // codes' shifts by 4, 8, 12 (HI_SHIFT)
    // kept in registers (LOP3's one immediate; multiplies ptxas would turn into shifts)
    asm volatile("" : "+r"(magic), "+r"(ones), "+r"(mul[1]), "+r"(mul[2]), "+r"(mul[3]));

    // Rows of x past M and n-tiles past N read row M - 1 and the last n-tile instead (in
    // bounds): an mma's output row depends on its A row alone, and those outputs are never
    // written, so no lane needs a predicate.
    const int rowg = min(g, M - 1) * XROW, rowq = min(g + 8, M - 1) * XROW;
    const u32 xlane = (min(lane & 7, M - 1) * XROW) * 4 + 16 * (lane >> 3);  // WA's ldmatrix
#if NORM
    // x's whole rows after the ring (NORM): row stride K / 2 + 4 words (16 bytes of pad, so
    // that the fragments' reads do not share banks, as XROW)
    const int xrow = K / 2 + 4;
    u32* xbuf = ring + WARPS * STAGES * SLOT_WORDS;
    const u32 xbuf_s = smem(xbuf);
    const int nrowg = min(g, M - 1) * xrow, nrowq = min(g + 8, M - 1) * xrow;
    const u32 nxlane = (min(lane & 7, M - 1) * xrow) * 4 + 16 * (lane >> 3);
#endif
    u32* mine = ring + warp * STAGES * SLOT_WORDS;
    const u32 mine_s = smem(mine);  // the same, as a shared-memory address
    const int iters = warp < KT ? (KT - 1 - warp) / WARPS + 1 : 0;  // this warp's k-tiles
    // The block's tiles (NB n-tiles each): its own, or (PERSIST: a grid of one wave) tiles
    // blockIdx.x, + gridDim.x, ..., the ring running on from one tile's k-tiles to the next
    // so that the loads stay in flight through each tile's sums
#if PERSIST
    const int tiles = ((GLU ? NT >> 1 : NT) + YNB - 1) / YNB;
    const int my_tiles = (int)blockIdx.x < tiles ? (tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
#else
    const int my_tiles = 1;
#endif
    const int total = iters * my_tiles;  // this warp's issues

    // the issue's tile (n-tiles ntb) and its running sources (n-tile b's words, x's k-tile),
    // each moved WARPS k-tiles on by an issue, and the slot it fills: few instructions an
    // issue (PERSIST: the table's n-tiles from the tile, not kept: four registers fewer)
    int next_i = 0, next_t = blockIdx.x;
#if PERSIST
#define NTB(b) ntile(next_t, b, NT)
#else
    int ntb[NB];
#define NTB(b) ntb[b]
#endif
    const u32* wsrc[NB];
    const u16* xsrc;
    auto sources = [&](int t) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const int nt = ntile(t, b, NT);
#if !PERSIST
            ntb[b] = nt;
#endif
            wsrc[b] = words + ((size_t)nt * KT + warp) * (32 * W) + lane * W;
        }
        xsrc = x + warp * KTILE;
    };
    sources(next_t);
    int fill = 0;
#if STAGGER
    // where each warp's k-tiles start (any rotation of its own is a permutation)
    const int rot = iters ? blockIdx.x % iters : 0;
#endif

#if TMA
    // iteration i's k-tile (warp + i WARPS) into slot i % STAGES: lane 0 arms the slot's
    // mbarrier with the bytes to come and issues one bulk copy per n-tile's words, per
    // n-tile and group of the table, and per row of x (every address and size a multiple of
    // 16 bytes: tinygemm's 512-byte runs, the table's 32, x's 2 KTILE)
    const u32 bar0 = smem(&bars[warp][0]);
    if (lane == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s)
            bar_init(bar0 + 8 * s);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncwarp();
    auto issue = [&](int i, bool) {
        if (i < iters && lane == 0) {
            const u32 slot = mine_s + fill * (SLOT_WORDS * 4), bar = bar0 + 8 * fill;
            if (PROBE == 2) {
                bar_expect(bar, 0);
            } else {
                // the slot's last reads (generic proxy) ordered before the copies (async)
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                bar_expect(bar, NB * 128 * W + NB * GPK * 32 + M * KTILE * 2);
                const int kt = warp + i * WARPS;
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    bulk(slot + b * 128 * W, wsrc[b], 128 * W, bar);  // lane 0's: the run
                    wsrc[b] += WARPS * 32 * W;
                }
                const u32* zsrc = sz + (size_t)(kt * KTILE / GROUP) * N;
#pragma unroll
                for (int b = 0; b < NB; ++b)
#pragma unroll
                    for (int q = 0; q < GPK; ++q)
                        bulk(slot + (NB * 32 * W + (b * GPK + q) * 8) * 4,
                             zsrc + (size_t)q * N + ntb[b] * 8, 32, bar);
#pragma unroll 1
                for (int r = 0; r < M; ++r)
                    bulk(slot + (X_AT + r * XROW) * 4, xsrc + (size_t)r * K, KTILE * 2, bar);
                xsrc += WARPS * KTILE;
            }
        }
        fill = fill == STAGES - 1 ? 0 : fill + 1;
    };
#else
    // iteration i's k-tile (warp + i WARPS) into slot i % STAGES: one commit group each
    // (issue runs for i = 0, 1, 2, ... in turn)
    auto issue = [&](int i, bool with_x) {
        if (i < total && PROBE != 2) {
            const u32 slot = mine_s + fill * (SLOT_WORDS * 4);
#if STAGGER
            // block-rotated order: the blocks' warps start on different k-tiles (and DRAM
            // pages) rather than all at their n-tiles' first
            const int kt = warp + ((i + rot) % iters) * WARPS;
#pragma unroll
            for (int b = 0; b < NB; ++b)
                cp_words(slot + (b * 32 * W + lane * W) * 4,
                         words + ((size_t)ntb[b] * KT + kt) * (32 * W) + lane * W);
            const u16* xsrc = x + kt * KTILE;
#else
            const int kt = warp + (PERSIST ? next_i : i) * WARPS;
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                cp_words(slot + (b * 32 * W + lane * W) * 4, wsrc[b]);
                wsrc[b] += WARPS * 32 * W;
            }
#endif
            if (g == 0) {
                const u32* zsrc = sz + (size_t)(kt * KTILE / GROUP) * N + 2 * c;
#pragma unroll
                for (int b = 0; b < NB; ++b)
#pragma unroll
                    for (int q = 0; q < GPK; ++q)
                        cp8(slot + (NB * 32 * W + ((b * GPK + q) * 4 + c) * 2) * 4,
                            zsrc + (size_t)q * N + NTB(b) * 8);
            }
            if (with_x)  // (PDL: not the first STAGES - 1, issued after the wait below)
                cp_x(slot, xsrc, M, K, lane);
#if !STAGGER
            xsrc += WARPS * KTILE;
#if PERSIST
            if (++next_i == iters) {  // the tile's last k-tile: the block's next tile's
                next_i = 0;
                next_t += gridDim.x;
                sources(next_t);
            }
#endif
#endif
        }
        fill = fill == STAGES - 1 ? 0 : fill + 1;
        commit_group();
    };

#endif

#if PDL
    // A programmatic dependent launch: this grid may start while the kernel before it in
    // the stream still runs. W and its table are the model's, never written by a kernel,
    // so the first STAGES - 1 k-tiles of them are issued at once; x (the kernel before's
    // output, maybe) only after griddepcontrol.wait, which returns when that kernel has
    // finished and its writes are visible; y is written after it too. Then the kernel
    // after this one may be launched (it waits for this one's end the same way).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
        issue(s, false);
#if PREFETCH
    prefetch_tile(words, sz, N, K, KT, NT);
#endif
    grid_wait();
#if STAGGER
    const int rot0 = rot;
#else
    const int rot0 = 0;
#endif
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)  // slot s: the k-tile issue(s) took
        if (s < total && PROBE != 2)
            cp_x(mine_s + s * (SLOT_WORDS * 4),
                 x + (size_t)(warp + ((s + rot0) % iters) * WARPS) * KTILE, M, K, lane);
    commit_group();  // one group: every slot's x
#if NORM
    norm_rows(x, res, hout, gamma, eps, xbuf, xrow, nred, M, K, warp, lane);
#endif
    launch_dependents();
#else
    for (int s = 0; s < STAGES - 1; ++s)
        issue(s, true);
#if NORM
    norm_rows(x, res, hout, gamma, eps, xbuf, xrow, nred, M, K, warp, lane);
#endif
#endif
    for (int tt = 0, i = 0, use = 0; tt < my_tiles; ++tt) {
        float out[NOUT][4];
#pragma unroll
        for (int b = 0; b < NOUT; ++b)
            out[b][0] = out[b][1] = out[b][2] = out[b][3] = 0.f;
        for (int it = 0; it < iters; ++it, ++i, use = use == STAGES - 1 ? 0 : use + 1) {
            issue(i + STAGES - 1, true);
#if TMA
            bar_wait(bar0 + 8 * use, (i / STAGES) & 1);  // the slot's copies have landed
#else
#if PDL
            if (i == 0)  // the prologue's x came in a group after its words: all but this one
                wait_group<1>();
            else
#endif
            wait_group<STAGES - 1>();
            __syncwarp();  // the table's pairs and x's rows came from other lanes
#endif
            const u32* slot = mine + use * SLOT_WORDS;
            u32 cw[NB][W];
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int w = 0; w < W; ++w)
                    cw[b][w] = slot[b * 32 * W + lane * W + w];
#if NORM
            const int kt = warp + it * WARPS;  // this iteration's k-tile (no STAGGER)
#endif
            if (PROBE != 1)
#if WA && NORM
                ktile(out, cw, xbuf_s + nxlane + kt * KTILE * 2, slot + NB * 32 * W, g, magic,
                      ones, mul);
#elif WA
                ktile(out, cw, mine_s + (use * SLOT_WORDS + X_AT) * 4 + xlane,
                      slot + NB * 32 * W, g, magic, ones, mul);
#elif NORM
                ktile(out, cw, xbuf + kt * (KTILE / 2) + nrowg, xbuf + kt * (KTILE / 2) + nrowq,
                      slot + NB * 32 * W, c, magic, ones, mul);
#else
                ktile(out, cw, slot + X_AT + rowg, slot + X_AT + rowq, slot + NB * 32 * W, c,
                      magic, ones, mul);
#endif
            __syncwarp();  // every lane done with the slot before the next issue refills it
        }
        sum_tile(out, red, y, warp, g, c, M, N, NT, blockIdx.x + tt * gridDim.x, rp);
        if (PERSIST)
            __syncthreads();  // every sum of red read before the next tile's are written
    }
#if !TMA
    wait_all();
#endif
}
#endif  // KP
