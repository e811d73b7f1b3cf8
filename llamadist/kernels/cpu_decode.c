/* CPU decode kernels, float32: the linear y = x W^T (+ b) for a few rows of x, a whole
   decoder layer for one new token per sequence, over a static KV cache (a row of slots
   per sequence) or a paged one (per row a block table and a length), and a stage's whole
   decode step (every layer, then the final norm and the head) in one parallel region.

   Decode reads every weight once per step and does two flops per four bytes, so the step
   runs at the speed the weights stream from memory, plus whatever the step spends around
   its matmuls. PyTorch's CPU matmul reads these shapes at about half the machine's read
   bandwidth, and a decoder layer run op by op costs some forty PyTorch calls of a few
   microseconds each (benchmarks/RESULTS.md). Here the matmul loop reads each thread's
   weight rows front to back, one row at a time with four independent accumulator chains
   (FMA latency hidden, one sequential stream for the prefetcher), and the layer is one
   call: one OpenMP parallel region in which the threads claim every matmul's rows and
   every attention's heads chunk by chunk, a phase waiting for the one before only where
   it reads what other threads wrote (five phases a layer, no OpenMP barrier: see "the
   team's schedule"; the norms, the activation quantization and the SwiGLU product are
   redone by every thread instead).

   Written with GCC vector extensions, not intrinsics: built with -march=native it becomes
   AVX2/AVX-512 FMA code on x86 and NEON on ARM. Built at run time by cpu_decode.py;
   OpenMP comes from the runtime PyTorch already loaded (same soname), so this code and
   PyTorch share one thread pool; the caller passes torch.get_num_threads() as the team
   size (OpenMP's own default is per calling thread, PyTorch's setting is global). */

#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_quant.h"

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v); /* unaligned load; compiles to one vector load */
    return v;
}

static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* One weight row . x, read front to back: four independent accumulator chains of 8 (FMA
   latency hidden) over one sequential stream. Measured on the 2-core Zen 4 (a chain of
   SmolLM2's GEMVs over 538 MB of distinct weights, benchmarks/RESULTS.md): one row at a
   time reads the weights at 1.3-1.6x the speed of the earlier loop that took eight rows at
   once (eight interleaved streams 2-6 KB apart defeat the hardware prefetcher). */
static inline float dot1(const float *w, const float *x, int64_t k_dim) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t k = 0;
    for (; k + 32 <= k_dim; k += 32) {
        a0 += load8(w + k) * load8(x + k);
        a1 += load8(w + k + 8) * load8(x + k + 8);
        a2 += load8(w + k + 16) * load8(x + k + 16);
        a3 += load8(w + k + 24) * load8(x + k + 24);
    }
    for (; k + 8 <= k_dim; k += 8) a0 += load8(w + k) * load8(x + k);
    float s = hsum8((a0 + a1) + (a2 + a3));
    for (; k < k_dim; ++k) s += w[k] * x[k];
    return s;
}

/* y[r] (=|+=) x[r] W^T + bias for rows r < m: x (m, k) with row stride ldx, w (n, k)
   contiguous, y (m, n) with row stride ldy. An orphaned worksharing loop: inside a
   parallel region the threads split W's rows (a contiguous run each, so each thread reads
   one sequential stream); each weight row is read from memory once and from cache for the
   further rows of x. */
static void linear_for(const float *x, const float *w, const float *bias, float *y,
                       int64_t m, int64_t n, int64_t k, int64_t ldx, int64_t ldy,
                       int accumulate) {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
        const float *wj = w + j * k, bj = bias ? bias[j] : 0.0f;
        for (int64_t r = 0; r < m; ++r) {
            const float v = dot1(wj, x + r * ldx, k) + bj;
            float *o = y + r * ldy + j;
            *o = accumulate ? *o + v : v;
        }
    }
}

void llamadist_linear_f32(const float *x, const float *w, const float *bias, float *y,
                          int64_t m, int64_t n, int64_t k, int64_t ldx, int64_t ldy,
                          int threads) {
#pragma omp parallel num_threads(threads)
    linear_for(x, w, bias, y, m, n, k, ldx, ldy, 0);
}

/* out = weight * x / sqrt(mean(x^2) + eps) for one row of d. */
static void rms_norm(const float *x, const float *weight, float *out, int64_t d, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; ++i) out[i] = weight[i] * (x[i] * inv);
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]). */
static void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; ++i) {
        out[i] = x[i] * cos[i] - x[i + h] * sin[i];
        out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
    }
}

typedef int32_t v8i __attribute__((vector_size(32)));

/* exp(x) for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial
   in r, times 2^n), within 2 ulp of expf; x clamped to [-87, 88] (2^n stays a normal
   float). Every thread computes the whole SwiGLU product itself (no barrier), so the
   scalar expf's ~6 ns a value (~9 us a SmolLM2 layer) is worth vectorizing. */
static inline v8 exp8(v8 x) {
    const v8 hi = {88.0f, 88.0f, 88.0f, 88.0f, 88.0f, 88.0f, 88.0f, 88.0f};
    const v8 lo = hi * 0.0f - 87.0f;
    v8i big = x > hi, small = x < lo;
    x = (v8)(((v8i)x & ~big) | ((v8i)hi & big));
    x = (v8)(((v8i)x & ~small) | ((v8i)lo & small));
    const v8 magic = x * 0.0f + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const v8 n = (x * 1.44269504088896341f + magic) - magic;
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = r * 0.0f + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i scale = (__builtin_convertvector(n, v8i) + 127) << 23; /* 2^n */
    return p * (v8)scale;
}

/* act = silu(gate) * up over n values: gate / (1 + exp(-gate)) * up. */
static void swiglu(const float *gate, const float *up, float *act, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8 g = load8(gate + i), u = load8(up + i);
        const v8 y = g / (1.0f + exp8(-g)) * u;
        memcpy(act + i, &y, sizeof y);
    }
    for (; i < n; ++i) act[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Rows of one weight format within a fused weight (float32 or GGUF blocks). */
typedef struct {
    const void *w;
    int64_t type, rows;
} wseg;

/* The shapes and tensors of one decoder layer's decode step (see cpu_decode.py). */
typedef struct {
    int64_t batch, dim, heads, kv_heads, head_dim, inter;
    int64_t len;                        /* slots to attend (paged: the longest row's) */
    int64_t start;                      /* static: slot of the new token */
    float eps;
    float *h;                           /* (batch, dim) residual stream, updated in place */
    const float *norm1, *norm2;         /* (dim) */
    const void *w_qkv; const float *b_qkv; /* (q + 2 kv, dim), bias or NULL */
    const void *w_o; const float *b_o;     /* (dim, q) */
    const void *w_gu; const float *b_gu;   /* (2 inter, dim): gate rows then up rows */
    const void *w_down; const float *b_down; /* (dim, inter) */
    float *k_cache, *v_cache;           /* static: (batch, kv_heads, slots, head_dim);
                                           paged: (blocks, kv_heads, block_size, head_dim) */
    int64_t cache_b, cache_h, cache_t;  /* element strides of a row (static) or a block
                                           (paged), of a head and of a slot */
    int64_t block_size;                 /* 0: static cache; else slots per block */
    const int32_t *block_table;         /* paged: (batch, bt_stride) block ids per row */
    int64_t bt_stride;
    const int32_t *lens;                /* paged: (batch) slots per row, the new one's
                                           included (static: len for every row) */
    const float *cos, *sin;             /* (batch, head_dim) rows, stride cs_b */
    int64_t cs_b;
    const uint8_t *mask;                /* (batch, len) bool, row stride mask_b; NULL = all */
    int64_t mask_b;
    float *scratch;                     /* see cpu_decode.py: scratch_floats() */
    int64_t threads;                    /* OpenMP team size */
    int64_t t_qkv, t_o, t_gu, t_down;   /* weight formats: 0 float32, else a ggml block
                                           type (the w_* point at blocks, cpu_quant.h) */
    void *qscratch;                     /* quantized activations (quantized weights only) */
    int64_t int8_x;                     /* quantized weights: x to int8 (cpu_quant.h) */
    wseg seg_qkv[3], seg_gu[2];         /* a fusion of parts of different formats: its */
    int64_t n_seg_qkv, n_seg_gu;        /* row blocks in order (0: w_qkv / w_gu alone) */
} layer_args;

/* ---- the team's schedule: phases of work items, no barriers ----
   A layer is five phases (q|k|v, RoPE with attention, o_proj, gate|up, down), each a set of
   independent items (weight rows, heads) that reads only what earlier phases wrote. Each
   thread owns a contiguous run of every phase's items and claims it chunk by chunk from
   the front (one sequential stream of weights per thread), then claims what is left of
   the other threads' runs; a thread enters a phase once every item of the one before is
   done. On an idle machine this is an OpenMP static split with its barriers. On a shared
   one (2 cores, other jobs) it is what keeps a step from stalling: at an OpenMP barrier
   the team waits for a preempted thread's next time slice (milliseconds), 180 times a
   SmolLM2 step; here the running thread takes over the preempted one's rows, and waits
   only for a chunk the preempted thread holds (microseconds of work). Which thread
   computes an item does not change its value: the results are the same bits at any team
   size and any interleaving. */
typedef struct {
    _Atomic int64_t v;
    char pad[64 - sizeof(int64_t)];
} cell; /* one per cache line */

typedef struct {
    cell *cells;   /* per phase: `threads` claim offsets, then `threads` done counts */
    int64_t threads, phases;
} team;

typedef struct { /* one thread's walk through the phases (every thread the same phases) */
    const team *tm;
    int64_t p, n;  /* the current phase (-1: none yet) and its items */
    int64_t v;     /* the run it claims from: (t + v) % threads */
    int t;
} walker;

static inline cell *claims(const walker *w) { return w->tm->cells + w->p * 2 * w->tm->threads; }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Enter the next phase, of n items, once every item of the current one is done. Returns 0
   when every item of the new phase is claimed already (the thread skips its set-up). */
static int phase_begin(walker *w, int64_t n) {
    const int64_t T = w->tm->threads;
    if (w->p >= 0) {
        const cell *done = claims(w) + T;
        for (int64_t spin = 0;; ++spin) {
            int64_t sum = 0;
            for (int64_t r = 0; r < T; ++r)
                sum += atomic_load_explicit(&done[r].v, memory_order_acquire);
            if (sum >= w->n) break;
            if (spin < 4096) cpu_relax();
            else sched_yield(); /* the thread we wait for may need this core */
        }
    }
    ++w->p;
    w->n = n;
    w->v = 0;
    if (w->p >= w->tm->phases) __builtin_trap(); /* more phases than the team was made for */
    const cell *c = claims(w);
    for (int64_t r = 0; r < T; ++r)
        if (atomic_load_explicit(&c[r].v, memory_order_relaxed) < n * (r + 1) / T - n * r / T)
            return 1;
    return 0;
}

/* Claim up to `chunk` items of the current phase: [*lo, *hi); 0 when none is left. */
static int claim(walker *w, int64_t chunk, int64_t *lo, int64_t *hi) {
    const int64_t T = w->tm->threads, n = w->n;
    cell *c = claims(w);
    for (; w->v < T; ++w->v) {
        const int64_t r = (w->t + w->v) % T, start = n * r / T, end = n * (r + 1) / T;
        if (atomic_load_explicit(&c[r].v, memory_order_relaxed) >= end - start) continue;
        const int64_t i = start + atomic_fetch_add_explicit(&c[r].v, chunk, memory_order_relaxed);
        if (i < end) {
            *lo = i;
            *hi = i + chunk < end ? i + chunk : end;
            return 1;
        }
    }
    return 0;
}

static inline void finish(walker *w, int64_t items) {
    atomic_fetch_add_explicit(&claims(w)[w->tm->threads + w->t].v, items, memory_order_release);
}

/* A phase whose items are [0, n) one at a time: for (i; next_item(w, &i);) work(i). */
static inline int next_item(walker *w, int64_t *i, int64_t *pending) {
    if (*pending) finish(w, *pending);
    int64_t hi;
    *pending = claim(w, 1, i, &hi);
    return (int)*pending;
}

static team team_make(int64_t threads, int64_t phases) {
    team tm = {NULL, threads, phases};
    const size_t bytes = (size_t)phases * 2 * threads * sizeof(cell);
    tm.cells = aligned_alloc(64, bytes);
    if (!tm.cells) abort(); /* a few KB per thread and layer */
    memset(tm.cells, 0, bytes);
    return tm;
}

/* ---- optional per-phase timing (built only with -DLLAMADIST_PHASE_TIMING; never in the
   normal build): per thread, the nanoseconds spent waiting in phase_begin and working in
   each phase kind, summed over calls until llamadist_phase_times reads them. ---- */
#ifdef LLAMADIST_PHASE_TIMING
#include <time.h>
enum { PT_WAIT, PT_QKV, PT_ATTN, PT_O, PT_GU, PT_DOWN, PT_HEAD, PT_STEP, PT_N };
static double pt_ns[64][PT_N];
static inline double pt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}
void llamadist_phase_times(double *out, int reset) { /* out: (64, PT_N) */
    memcpy(out, pt_ns, sizeof pt_ns);
    if (reset) memset(pt_ns, 0, sizeof pt_ns);
}
#define PT_BEGIN(wk, n) (pt_t0 = pt_now(), pt_on = phase_begin(wk, n), \
                         pt_ns[(wk)->t & 63][PT_WAIT] += pt_now() - pt_t0, pt_t0 = pt_now(), pt_on)
#define PT_END(wk, kind) (pt_ns[(wk)->t & 63][kind] += pt_now() - pt_t0)
#define PT_DECL double pt_t0 = 0; int pt_on = 0; (void)pt_on
#else
#define PT_BEGIN(wk, n) phase_begin(wk, n)
#define PT_END(wk, kind) ((void)0)
#define PT_DECL
#endif

/* What a thread computes into its private scratch before a GEMV phase's rows: each of the
   m rows' RMSNorm (src (m, d) times weight) or SwiGLU product (src (m, 2d): gate|up).
   It runs only once the thread holds a claimed chunk: until that chunk is finished the
   phase cannot end, so nobody can write src meanwhile (a thread that finds nothing to
   claim never reads it: the team may be a phase or more ahead, rewriting it). */
enum { PREP_NONE, PREP_NORM, PREP_SWIGLU };
typedef struct {
    int kind;
    const float *src, *weight;
    float *out;
    int64_t m, d;
    float eps;
} row_prep;

static void prep_rows(const row_prep *p) {
    for (int64_t b = 0; b < p->m; ++b) {
        if (p->kind == PREP_NORM)
            rms_norm(p->src + b * p->d, p->weight, p->out + b * p->d, p->d, p->eps);
        else
            swiglu(p->src + b * 2 * p->d, p->src + b * 2 * p->d + p->d, p->out + b * p->d, p->d);
    }
}

/* y[r] (=|+=) x[r] W^T + bias as the current phase (entered: phase_begin(wk, n)) over
   W's rows: a float32 weight, GGUF blocks, or a fused weight of row blocks of different
   formats (nseg 0: w of `type` alone). A chunk is about 32 KB of weights. x is this
   thread's to make first when prep is given (see row_prep). */
static void gemv_phase(walker *wk, const row_prep *prep, int int8_x, const wseg *segs,
                      int64_t nseg, int64_t type, const float *x, const void *w,
                      const float *bias, float *y, int64_t m, int64_t n, int64_t k,
                      int64_t ldx, int64_t ldy, int accumulate, void *qscratch) {
    const wseg one = {w, type, n};
    if (!nseg) {
        segs = &one;
        nseg = 1;
    }
    const int64_t t0 = segs[0].type;
    const int64_t row_bytes = t0 == QT_F32 ? 4 * k : k / block_weights((int)t0) * block_bytes((int)t0);
    const int64_t chunk = row_bytes >= 32768 ? 1 : 32768 / row_bytes;
    int prepared = -1; /* quant_prep_kind of what this thread's scratch holds */
    int64_t lo, hi;
    while (claim(wk, chunk, &lo, &hi)) {
        if (prep) {
            prep_rows(prep);
            prep = NULL;
        }
        for (int64_t s = 0, row = 0; s < nseg && row < hi; row += segs[s].rows, ++s) {
            const int64_t a = lo > row ? lo : row, e = hi < row + segs[s].rows ? hi : row + segs[s].rows;
            if (a >= e) continue;
            const int ty = (int)segs[s].type;
            const float *bs = bias ? bias + row : NULL;
            float *ys = y + row;
            if (ty == QT_F32) {
                const float *ws = (const float *)segs[s].w;
                for (int64_t j = a - row; j < e - row; ++j) {
                    const float *wj = ws + j * k, bj = bs ? bs[j] : 0.0f;
                    for (int64_t r = 0; r < m; ++r) {
                        const float v = dot1(wj, x + r * ldx, k) + bj;
                        float *o = ys + r * ldy + j;
                        *o = accumulate ? *o + v : v;
                    }
                }
                continue;
            }
            const int kind = quant_prep_kind(ty, int8_x);
            if (kind && kind != prepared) {
                quant_prep(ty, int8_x, x, m, k, ldx, qscratch);
                prepared = kind;
            }
            quant_rows(ty, int8_x, x, (const uint8_t *)segs[s].w, bs, ys, m, a - row, e - row, k,
                       ldx, ldy, accumulate, qscratch);
        }
        finish(wk, hi - lo);
    }
}

/* Element offset of row b's slot s, head 0: in a static cache the row's own slot s, in a
   paged one offset s % block_size of the row's block s / block_size. */
static inline int64_t slot_at(const layer_args *a, int64_t b, int64_t s) {
    if (!a->block_size) return b * a->cache_b + s * a->cache_t;
    return (int64_t)a->block_table[b * a->bt_stride + s / a->block_size] * a->cache_b
           + (s % a->block_size) * a->cache_t;
}

/* p[s] = exp(p[s] - mx) for s < len (0 where p[s] is -inf: a masked slot), 8 at a time
   (exp8); returns their sum. */
static float softmax_weights(float *p, int64_t len, float mx) {
    const v8 ninf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                     -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v8 tot = {0};
    int64_t s = 0;
    for (; s + 8 <= len; s += 8) {
        const v8 x = load8(p + s);
        const v8i dead = x == ninf;
        const v8 e = (v8)((v8i)exp8(x - mx) & ~dead);
        memcpy(p + s, &e, sizeof e);
        tot += e;
    }
    float total = hsum8(tot);
    for (; s < len; ++s) {
        p[s] = p[s] == -INFINITY ? 0.0f : expf(p[s] - mx);
        total += p[s];
    }
    return total;
}

/* o[i] += sum over the n slots j of e[j] * v[j * stride + i], i < hd: 64 floats at a time
   in eight registers (each slot's e broadcast once), then 8 at a time, then one. */
static void weighted_rows(const float *e, const float *v, int64_t n, int64_t stride,
                          float *o, int64_t hd) {
    int64_t i = 0;
    for (; i + 64 <= hd; i += 64) {
        v8 a0 = load8(o + i), a1 = load8(o + i + 8), a2 = load8(o + i + 16),
           a3 = load8(o + i + 24), a4 = load8(o + i + 32), a5 = load8(o + i + 40),
           a6 = load8(o + i + 48), a7 = load8(o + i + 56);
        for (int64_t j = 0; j < n; ++j) {
            if (e[j] == 0.0f) continue; /* masked (or underflowed): adds nothing */
            const float *r = v + j * stride + i, w = e[j];
            a0 += w * load8(r); a1 += w * load8(r + 8); a2 += w * load8(r + 16);
            a3 += w * load8(r + 24); a4 += w * load8(r + 32); a5 += w * load8(r + 40);
            a6 += w * load8(r + 48); a7 += w * load8(r + 56);
        }
        memcpy(o + i, &a0, 32); memcpy(o + i + 8, &a1, 32); memcpy(o + i + 16, &a2, 32);
        memcpy(o + i + 24, &a3, 32); memcpy(o + i + 32, &a4, 32); memcpy(o + i + 40, &a5, 32);
        memcpy(o + i + 48, &a6, 32); memcpy(o + i + 56, &a7, 32);
    }
    for (; i + 8 <= hd; i += 8) {
        v8 a = load8(o + i);
        for (int64_t j = 0; j < n; ++j)
            if (e[j] != 0.0f) a += e[j] * load8(v + j * stride + i);
        memcpy(o + i, &a, 32);
    }
    for (; i < hd; ++i)
        for (int64_t j = 0; j < n; ++j)
            if (e[j] != 0.0f) o[i] += e[j] * v[j * stride + i];
}

/* One query head q (hd) of row b over its slots [0, len) of KV head kh -> o (hd), the
   last slot (the new token's) read from knew / vnew (hd each), the others from the cache.
   p: len floats of scratch. Slots are read run by run: a run is one block (paged) or
   the whole row (static), its slots cache_t apart. Three passes: the scores, their
   exponentials (vectorized: a decode step's attention is a few thousand of them per
   layer), then the value rows weighted by them. */
static void attend_head(const layer_args *a, int64_t b, int64_t kh, const float *q,
                        const float *knew, const float *vnew, float *p, float *o,
                        int64_t len) {
    const int64_t hd = a->head_dim, run = a->block_size ? a->block_size : len;
    const uint8_t *mask = a->mask ? a->mask + b * a->mask_b : NULL;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t old = len - 1; /* slots before the new token's */
    float mx = -INFINITY;
    for (int64_t s0 = 0; s0 < old; s0 += run) {
        const int64_t n = old - s0 < run ? old - s0 : run;
        const float *keys = a->k_cache + slot_at(a, b, s0) + kh * a->cache_h;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t s = s0 + i;
            p[s] = (mask && !mask[s]) ? -INFINITY : dot1(keys + i * a->cache_t, q, hd) * scale;
            mx = p[s] > mx ? p[s] : mx;
        }
    }
    p[old] = (mask && !mask[old]) ? -INFINITY : dot1(knew, q, hd) * scale;
    mx = p[old] > mx ? p[old] : mx;
    const float total = softmax_weights(p, len, mx);
    for (int64_t i = 0; i < hd; ++i) o[i] = 0.0f;
    for (int64_t s0 = 0; s0 < old; s0 += run) {
        const int64_t n = old - s0 < run ? old - s0 : run;
        weighted_rows(p + s0, a->v_cache + slot_at(a, b, s0) + kh * a->cache_h, n,
                      a->cache_t, o, hd);
    }
    weighted_rows(p + old, vnew, 1, 0, o, hd);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
}

/* Floats of one thread's private scratch: its normed input (B, D) and its MLP activation
   silu(gate) * up (B, F), rounded to a 64-byte multiple. */
static inline int64_t private_floats(const layer_args *a) {
    return (a->batch * (a->dim + a->inter) + 15) / 16 * 16;
}

/* This thread's private scratch: after the shared q|k|v (B, q + 2 kv), attention output
   (B, q), gate|up (B, 2F) and probabilities (B * H, len). */
static inline float *private_scratch(const layer_args *a) {
    const int64_t q = a->heads * a->head_dim, kv = a->kv_heads * a->head_dim;
    return a->scratch + a->batch * (2 * q + 2 * kv + 2 * a->inter + a->heads * a->len)
           + omp_get_thread_num() * private_floats(a);
}

/* One decoder layer, run by every thread of the team (inside the caller's parallel region),
   as five phases of the team's schedule (see phase_begin): a->h is whole once the last one's
   items are done, which the next phase_begin waits for. */
static void layer_team(const layer_args *a, walker *wk) {
    const int64_t B = a->batch, D = a->dim, hd = a->head_dim, H = a->heads, Hkv = a->kv_heads;
    const int64_t q_size = H * hd, kv_size = Hkv * hd, qkv_n = q_size + 2 * kv_size;
    const int64_t group = H / Hkv, F = a->inter;
    float *qkv = a->scratch;                /* (B, qkv_n) */
    float *att = qkv + B * qkv_n;           /* (B, q_size) attention output */
    float *gu = att + B * q_size;           /* (B, 2F) gate|up */
    float *probs = gu + B * 2 * F;          /* (B * H, len) */
    /* then per thread: xn (B, D), act (B, F) (private_scratch) */
    void *qs = a->qscratch;
    const int q8 = (int)a->int8_x;
    /* The norms and the SwiGLU product (a few thousand floats) are computed by every thread
       that takes rows of the phase, into its own scratch, rather than shared. */
    float *xn = private_scratch(a), *act = xn + B * D;
    const row_prep norm1 = {PREP_NORM, a->h, a->norm1, xn, B, D, a->eps};
    const row_prep norm2 = {PREP_NORM, a->h, a->norm2, xn, B, D, a->eps};
    const row_prep glu = {PREP_SWIGLU, gu, NULL, act, B, F, 0.0f};
    int64_t i, pending = 0;
    PT_DECL;
    if (PT_BEGIN(wk, qkv_n)) /* q|k|v of norm1(h) */
        gemv_phase(wk, &norm1, q8, a->seg_qkv, a->n_seg_qkv, a->t_qkv, xn, a->w_qkv, a->b_qkv,
                   qkv, B, qkv_n, D, D, qkv_n, 0, qs);
    PT_END(wk, PT_QKV);
    /* Attention, one query head per item over its row's slots, with RoPE: the item rotates
       its q and its KV head's new k into private copies, and reads the new slot from them
       and v from q|k|v (no other item reads that slot of the cache in this phase); the
       group's first head writes k and v into the cache for the layers' later steps. The
       items do their rotations themselves instead of a phase of their own before: a phase
       less a layer (its wait for the slowest thread), the rotations redone per head of a
       group (64 multiplies each). */
    if (PT_BEGIN(wk, B * H))
        for (pending = 0; next_item(wk, &i, &pending);) {
            const int64_t b = i / H, head = i % H, kh = head / group;
            const float *cs = a->cos + b * a->cs_b, *sn = a->sin + b * a->cs_b;
            const float *row = qkv + b * qkv_n, *vnew = row + q_size + kv_size + kh * hd;
            float qr[hd], kr[hd];
            rotate(row + head * hd, cs, sn, qr, hd);
            rotate(row + q_size + kh * hd, cs, sn, kr, hd);
            const int64_t len = a->lens ? a->lens[b] : a->len;
            if (head % group == 0) {
                const int64_t pos = a->lens ? a->lens[b] - 1 : a->start;
                const int64_t slot = slot_at(a, b, pos) + kh * a->cache_h;
                memcpy(a->k_cache + slot, kr, sizeof kr);
                memcpy(a->v_cache + slot, vnew, hd * sizeof(float));
            }
            attend_head(a, b, kh, qr, kr, vnew, probs + i * a->len, att + b * q_size + head * hd,
                        len);
        }
    PT_END(wk, PT_ATTN);
    if (PT_BEGIN(wk, D)) /* h += o_proj */
        gemv_phase(wk, NULL, q8, NULL, 0, a->t_o, att, a->w_o, a->b_o, a->h, B, D, q_size,
                   q_size, D, 1, qs);
    PT_END(wk, PT_O);
    if (PT_BEGIN(wk, 2 * F)) /* gate|up of norm2(h) */
        gemv_phase(wk, &norm2, q8, a->seg_gu, a->n_seg_gu, a->t_gu, xn, a->w_gu, a->b_gu, gu, B,
                   2 * F, D, D, 2 * F, 0, qs);
    PT_END(wk, PT_GU);
    if (PT_BEGIN(wk, D)) /* h += down_proj(swiglu(gate, up)) */
        gemv_phase(wk, &glu, q8, NULL, 0, a->t_down, act, a->w_down, a->b_down, a->h, B, D, F,
                   F, D, 1, qs);
    PT_END(wk, PT_DOWN);
}

#define LAYER_PHASES 5

void llamadist_decode_layer_f32(const layer_args *a) {
    (void)current_isa(); /* the GEMVs' dispatch level, decided before the team starts */
    team tm = team_make(a->threads, LAYER_PHASES);
#pragma omp parallel num_threads((int)a->threads)
    {
        walker wk = {&tm, -1, 0, 0, omp_get_thread_num()};
        layer_team(a, &wk);
    } /* the region's end: every thread has finished the items it claimed */
    free(tm.cells);
}

/* A whole decode step of a stage: every layer, then (with a head) the final RMSNorm and
   the head's GEMV, in one parallel region. The per-layer prototypes hold what does not
   change between steps (shapes, weights, cache tensors and their strides, cpu_decode.py
   builds them once); the fields below are this step's, shared by every layer. */
typedef struct {
    int64_t n_layers;
    const layer_args *layers;           /* (n_layers) prototypes */
    int64_t batch, len, start;          /* as layer_args */
    float *h;                           /* (batch, dim) in: the stage's input; out: its
                                           hidden state (without the final norm) */
    const int32_t *block_table;
    int64_t bt_stride;
    const int32_t *lens;
    const float *cos, *sin;
    int64_t cs_b;
    const uint8_t *mask;
    int64_t mask_b;
    float *scratch;                     /* the largest layer's scratch_floats() */
    void *qscratch;                     /* and its quantized activations */
    int64_t threads;
    const float *norm;                  /* (dim) the final RMSNorm; NULL: no head */
    float norm_eps;
    const void *w_head;                 /* (vocab, dim), float32 or GGUF blocks */
    const float *b_head;
    int64_t t_head, vocab, int8_head;
    float *logits;                      /* (batch, vocab) */
    const void *embed;                  /* (embed_rows, dim) float32 or GGUF blocks: h is
                                           its rows `tokens` (NULL: h is given) */
    int64_t t_embed, embed_rows;
    const int64_t *tokens;              /* (batch) */
} step_args;

void llamadist_dequant_rows(int type, const uint8_t *w, int64_t rows, int64_t k, float *out,
                            int threads);

/* h = the embedding's rows of the step's tokens, before the team starts (a row of dim
   floats each: the Python embedding's work, whose few PyTorch calls cost more than the
   copy after a step has streamed the weights through the caches). -1 when a token is out
   of range (nothing written: the caller's own embedding then says so). */
static int embed_rows(const step_args *s, int64_t dim) {
    for (int64_t b = 0; b < s->batch; ++b)
        if (s->tokens[b] < 0 || s->tokens[b] >= s->embed_rows) return -1;
    const int ty = (int)s->t_embed;
    const int64_t row = ty == QT_F32 ? 4 * dim : dim / block_weights(ty) * block_bytes(ty);
    for (int64_t b = 0; b < s->batch; ++b) {
        const uint8_t *w = (const uint8_t *)s->embed + s->tokens[b] * row;
        if (ty == QT_F32) memcpy(s->h + b * dim, w, (size_t)row);
        else llamadist_dequant_rows(ty, w, 1, dim, s->h + b * dim, 1);
    }
    return 0;
}

static void step_layer(const step_args *s, int64_t i, layer_args *a) {
    *a = s->layers[i];
    a->batch = s->batch; a->len = s->len; a->start = s->start; a->h = s->h;
    a->block_table = s->block_table; a->bt_stride = s->bt_stride; a->lens = s->lens;
    a->cos = s->cos; a->sin = s->sin; a->cs_b = s->cs_b;
    a->mask = s->mask; a->mask_b = s->mask_b;
    a->scratch = s->scratch; a->qscratch = s->qscratch; a->threads = s->threads;
}

int llamadist_decode_step_f32(const step_args *s) {
    (void)current_isa();
    if (s->embed && embed_rows(s, s->layers[0].dim)) return -1;
    team tm = team_make(s->threads, s->n_layers * LAYER_PHASES + 1);
#pragma omp parallel num_threads((int)s->threads)
    {
        layer_args a;
        walker wk = {&tm, -1, 0, 0, omp_get_thread_num()};
        PT_DECL;
#ifdef LLAMADIST_PHASE_TIMING
        const double pt_start = pt_now();
#endif
        for (int64_t i = 0; i < s->n_layers; ++i) {
            step_layer(s, i, &a);
            layer_team(&a, &wk); /* the next layer's first phase waits for this one's last */
        }
        if (s->norm && PT_BEGIN(&wk, s->vocab)) {
            /* every thread that takes rows of the head norms them itself (its private
               scratch, as the layers' norms) */
            float *xn = private_scratch(&a);
            const row_prep norm = {PREP_NORM, s->h, s->norm, xn, s->batch, a.dim, s->norm_eps};
            gemv_phase(&wk, &norm, (int)s->int8_head, NULL, 0, s->t_head, xn, s->w_head,
                       s->b_head, s->logits, s->batch, s->vocab, a.dim, a.dim, s->vocab, 0,
                       s->qscratch);
        }
        PT_END(&wk, PT_HEAD);
#ifdef LLAMADIST_PHASE_TIMING
        pt_ns[wk.t & 63][PT_STEP] += pt_now() - pt_start;
#endif
    } /* the region's end: every thread has finished the items it claimed */
    free(tm.cells);
    return 0;
}
