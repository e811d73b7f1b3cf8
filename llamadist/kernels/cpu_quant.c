/* Quantized linears on GGUF blocks (layouts in quant_ref.py), for decode and prefill.

   Q4_0, Q4_1, Q8_0 (blocks of 32 along the input): x is quantized per block of 32 to
   int8 with an f32 scale d and the block sum s = d * sum(q) (llama.cpp's q8_1), and each
   weight block meets its x block in an integer dot product, dequantized in registers:
       Q8_0  dw dx sum(qw qx)      Q4_0  dw (dx sum(qw qx) - 8 s)      Q4_1  dw dx sum(qw qx) + m s
   The error this adds is x's rounding, at most dx / 2 per input (tests/unit/test_quant.py
   bounds it). Q4_K, Q5_K, Q6_K (blocks of 256): each block is dequantized into 256 floats
   on the stack (L1) and dotted with x in float32; x is not quantized. With float32 x (the
   default) the 32-blocks are widened and converted in registers and met by x in float32;
   a batch's rows of x, float32 or int8, go in passes of 8, 4, then 2 (AVX-512; 4, 2 at
   AVX2), each block decoded once a pass, every row with the one-row kernel's operations
   in its order (the same bits as alone: the one-row kernels are the passes' R = 1 case);
   the K types in passes of 4 (krows).

   Runtime dispatch: the integer dot products exist three times, plain C, AVX2 (+FMA, F16C:
   every x86 since Haswell / Zen 1) and AVX-512 (F, BW, DQ, VL: two blocks per 512-bit
   register), the latter also with VNNI where the CPU has it (a fourth level; no AMX), each function built with its own
   __attribute__((target)), and the first call picks the best the CPU has
   (__builtin_cpu_supports); llamadist_quant_set_isa forces a lower one (tests run all
   three on one machine). Built with cpu_decode.c into one library (cpu_decode.py). */

#include "cpu_quant.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>


typedef float (*qdot_fn)(const uint8_t *w, const int8_t *q, const float *d, const float *s,
                         int64_t nb);
typedef float (*fdot_fn)(const uint8_t *w, const float *x, const float *xs, int64_t nb);
/* A pass's rows of x (ldx apart; their block sums xs ldxs apart) against one weight row:
   at most FX_AVX2 rows at AVX2, FX_AVX512 at AVX-512 (their accumulators fill the
   registers), then half as many, then 2 */
#define FX_AVX2 4
#define FX_AVX512 8
typedef void (*fxrows_fn)(const uint8_t *w, const float *x, int64_t ldx, const float *xs,
                          int64_t ldxs, int64_t nb, float *out);
/* The same for int8 x: rows of q (ldq apart) with their block scales d and sums s (lds
   apart), as many rows a pass */
typedef void (*qxrows_fn)(const uint8_t *w, const int8_t *q, int64_t ldq, const float *d,
                          const float *s, int64_t lds, int64_t nb, float *out);


/* ---- x -> int8 blocks of 32 (the reference is quant_ref.quantize_q8) ---- */
static void quantize_row_q8(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / 32; ++b) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(xb[i]));
        const float db = amax / 127.0f, inv = db > 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; ++i) {
            const int v = (int)roundf(xb[i] * inv);
            q[32 * b + i] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

/* ---- plain C ---- */
INLINE float row_dot_c(int type, const uint8_t *w, const int8_t *q, const float *d,
                       const float *s, int64_t nb) {
    const int bb = block_bytes(type);
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * bb;
        const int8_t *qb = q + 32 * b;
        int dot = 0;
        if (type == QT_Q8_0) {
            const int8_t *qw = (const int8_t *)(blk + 2);
            for (int j = 0; j < 32; ++j) dot += qw[j] * qb[j];
        } else {
            const uint8_t *qs = blk + (type == QT_Q4_1 ? 4 : 2);
            for (int j = 0; j < 16; ++j) dot += (qs[j] & 15) * qb[j] + (qs[j] >> 4) * qb[j + 16];
        }
        const float dw = f16(blk);
        if (type == QT_Q4_0) acc += dw * (d[b] * (float)dot - 8.0f * s[b]);
        else if (type == QT_Q4_1) acc += dw * d[b] * (float)dot + f16(blk + 2) * s[b];
        else acc += dw * d[b] * (float)dot;
    }
    return acc;
}

static float dot_q4_0_c(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_c(QT_Q4_0, w, q, d, s, nb); }
static float dot_q4_1_c(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_c(QT_Q4_1, w, q, d, s, nb); }
static float dot_q8_0_c(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_c(QT_Q8_0, w, q, d, s, nb); }

/* ---- AVX2 ---- */
TGT_AVX2 INLINE __m256i nibbles32(const uint8_t *p) { /* 16 bytes -> 32 bytes: lo, then hi */
    const __m128i r = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r, 4), m4), _mm_and_si128(r, m4));
}

/* A block's 32 codes as the integer dot's operands: Q4 its nibbles (wx), Q8_0 its signed
   bytes (wx) and their magnitudes (ax) */
TGT_AVX2 INLINE void block_codes_avx2(int type, const uint8_t *blk, __m256i *wx, __m256i *ax) {
    if (type == QT_Q8_0) {
        *wx = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *ax = _mm256_sign_epi8(*wx, *wx);
    } else {
        *wx = nibbles32(blk + (type == QT_Q4_1 ? 4 : 2));
        *ax = _mm256_setzero_si256();
    }
}

/* The block's codes (block_codes_avx2) against 32 int8 of x: 8 int32 partial sums; Q8_0
   signed x signed: |w| times y with w's sign */
TGT_AVX2 INLINE __m256i codes_dot_avx2(int type, __m256i wx, __m256i ax, const int8_t *qx) {
    const __m256i y = _mm256_loadu_si256((const __m256i *)qx), ones = _mm256_set1_epi16(1);
    if (type == QT_Q8_0)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(y, wx)), ones);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wx, y), ones);
}

TGT_AVX2 INLINE float f16c(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* The block's offset term's factor (none for Q8_0): m s with m = -8 dw (Q4_0) or the
   block's m (Q4_1) */
TGT_AVX2 INLINE float block_offset(int type, const uint8_t *blk, float dw) {
    return type == QT_Q4_0 ? -8.0f * dw : type == QT_Q4_1 ? f16c(blk + 2) : 0.0f;
}

/* R (<= FX_AVX2) rows of int8 x against a weight row at once: each block's codes loaded
   (and for Q4 split into nibbles) once, then met by every row in the same operations, so
   a row gets the same bits in a pass of R as alone (row_dot_avx2 is R = 1). Per block,
   dw dx_b sum(qw qx) into two float chains by block parity, and the offset term m s_b as
   an explicit fma into two more (one rounding whatever the compiler contracts). */
TGT_AVX2 INLINE void rows_dot_avx2(int type, int R, const uint8_t *w, const int8_t *q,
                                   int64_t ldq, const float *d, const float *s, int64_t lds,
                                   int64_t nb, float *out) {
    const int bb = block_bytes(type);
    __m256 acc0[FX_AVX2], acc1[FX_AVX2];
    float corr0[FX_AVX2], corr1[FX_AVX2];
    for (int r = 0; r < R; ++r) {
        acc0[r] = acc1[r] = _mm256_setzero_ps();
        corr0[r] = corr1[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * bb;
        const float dw = f16c(blk), m = block_offset(type, blk, dw);
        __m256i wx, ax;
        block_codes_avx2(type, blk, &wx, &ax);
        for (int r = 0; r < R; ++r) {
            const __m256i p = codes_dot_avx2(type, wx, ax, q + r * ldq + 32 * b);
            const __m256 sc = _mm256_set1_ps(dw * d[r * lds + b]);
            if (b & 1) acc1[r] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc1[r]);
            else acc0[r] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc0[r]);
            if (type == QT_Q8_0) continue;
            if (b & 1) corr1[r] = __builtin_fmaf(m, s[r * lds + b], corr1[r]);
            else corr0[r] = __builtin_fmaf(m, s[r * lds + b], corr0[r]);
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = hsum256(_mm256_add_ps(acc0[r], acc1[r])) + (corr0[r] + corr1[r]);
}

TGT_AVX2 INLINE float row_dot_avx2(int type, const uint8_t *w, const int8_t *q, const float *d,
                                   const float *s, int64_t nb) {
    float out;
    rows_dot_avx2(type, 1, w, q, 0, d, s, 0, nb, &out);
    return out;
}

TGT_AVX2 static float dot_q4_0_avx2(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_avx2(QT_Q4_0, w, q, d, s, nb); }
TGT_AVX2 static float dot_q4_1_avx2(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_avx2(QT_Q4_1, w, q, d, s, nb); }
TGT_AVX2 static float dot_q8_0_avx2(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_avx2(QT_Q8_0, w, q, d, s, nb); }

/* ---- AVX-512: two blocks per register (lanes 0-7 block b, 8-15 block b+1) ---- */
/* R (<= FX_AVX512) rows of int8 x against a weight row, its blocks two at a time (lanes
   0-7 block b, 8-15 block b + 1): each pair's codes loaded (Q4: split into nibbles) once,
   then met by every row in the same operations (rows_dot_avx2's terms; DOT: the pair's
   16 int32 partial sums from the pair's codes as the dot's first operand, and for Q8_0
   their signs), so a row's bits in a pass of R equal its bits alone. An odd last block
   takes the AVX2 path's operations. */
#define ROWS_DOT_512(NAME, TGT, DOT)                                                      \
TGT INLINE void NAME(int type, int R, const uint8_t *w, const int8_t *q, int64_t ldq,       \
                     const float *d, const float *s, int64_t lds, int64_t nb, float *out) { \
    const int bb = block_bytes(type), off = type == QT_Q4_1 ? 4 : 2;                      \
    __m512 acc[FX_AVX512];                                                                \
    float corr0[FX_AVX512], corr1[FX_AVX512]; /* by block parity: two short chains */     \
    for (int r = 0; r < R; ++r) {                                                         \
        acc[r] = _mm512_setzero_ps();                                                     \
        corr0[r] = corr1[r] = 0.0f;                                                       \
    }                                                                                     \
    int64_t b = 0;                                                                        \
    for (; b + 2 <= nb; b += 2) {                                                         \
        const uint8_t *b0 = w + b * bb, *b1 = b0 + bb;                                    \
        const float d0 = f16c(b0), d1 = f16c(b1);                                         \
        const float m0 = block_offset(type, b0, d0), m1 = block_offset(type, b1, d1);     \
        __m512i wx;                                                                       \
        __mmask64 neg = 0;                                                                \
        if (type == QT_Q8_0) {                                                            \
            wx = _mm512_inserti64x4(                                                      \
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),    \
                _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);                        \
            neg = _mm512_movepi8_mask(wx); /* y with w's sign, times |w| */               \
            wx = _mm512_abs_epi8(wx);                                                     \
        } else {                                                                          \
            wx = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles32(b0 + off)),          \
                                    nibbles32(b1 + off), 1);                              \
        }                                                                                 \
        for (int r = 0; r < R; ++r) {                                                     \
            __m512i y = _mm512_loadu_si512((const void *)(q + r * ldq + 32 * b));         \
            if (type == QT_Q8_0) y = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y); \
            const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(d0 * d[r * lds + b]),     \
                                                 _mm256_set1_ps(d1 * d[r * lds + b + 1]), 1); \
            acc[r] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(DOT(wx, y)), acc[r]);         \
            if (type == QT_Q8_0) continue;                                                \
            corr0[r] = __builtin_fmaf(m0, s[r * lds + b], corr0[r]);                      \
            corr1[r] = __builtin_fmaf(m1, s[r * lds + b + 1], corr1[r]);                  \
        }                                                                                 \
    }                                                                                     \
    for (int r = 0; r < R; ++r) {                                                         \
        float total = _mm512_reduce_add_ps(acc[r]);                                       \
        if (b < nb) { /* an odd block: the AVX2 path's operations */                      \
            const uint8_t *b0 = w + b * bb;                                               \
            const float d0 = f16c(b0);                                                    \
            __m256i wx0, ax0;                                                             \
            block_codes_avx2(type, b0, &wx0, &ax0);                                       \
            const __m256i p0 = codes_dot_avx2(type, wx0, ax0, q + r * ldq + 32 * b);      \
            total = __builtin_fmaf(d0 * d[r * lds + b], hsum256(_mm256_cvtepi32_ps(p0)), total); \
            if (type != QT_Q8_0)                                                          \
                corr0[r] = __builtin_fmaf(block_offset(type, b0, d0), s[r * lds + b],     \
                                          corr0[r]);                                      \
        }                                                                                 \
        out[r] = total + (corr0[r] + corr1[r]);                                           \
    }                                                                                     \
}

TGT_AVX512 INLINE __m512i dot_madd(__m512i wx, __m512i y) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(wx, y), _mm512_set1_epi16(1));
}

/* vpdpbusd (AVX-512 VNNI: Zen 4, Ice Lake and later) does maddubs + madd in one
   instruction, without the int16 step (whose saturation these ranges never reach: 15 *
   127 * 2 and 128 * 127 * 2 fit), so the sums are bit for bit the same */
TGT_VNNI INLINE __m512i dot_vnni(__m512i wx, __m512i y) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), wx, y);
}

ROWS_DOT_512(rows_dot_avx512, TGT_AVX512, dot_madd)
ROWS_DOT_512(rows_dot_vnni, TGT_VNNI, dot_vnni)

TGT_AVX512 INLINE float row_dot_avx512(int type, const uint8_t *w, const int8_t *q,
                                       const float *d, const float *s, int64_t nb) {
    float out;
    rows_dot_avx512(type, 1, w, q, 0, d, s, 0, nb, &out);
    return out;
}

TGT_VNNI INLINE float row_dot_vnni(int type, const uint8_t *w, const int8_t *q,
                                   const float *d, const float *s, int64_t nb) {
    float out;
    rows_dot_vnni(type, 1, w, q, 0, d, s, 0, nb, &out);
    return out;
}

TGT_AVX512 static float dot_q4_0_avx512(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_avx512(QT_Q4_0, w, q, d, s, nb); }
TGT_AVX512 static float dot_q4_1_avx512(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_avx512(QT_Q4_1, w, q, d, s, nb); }
TGT_AVX512 static float dot_q8_0_avx512(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_avx512(QT_Q8_0, w, q, d, s, nb); }
TGT_VNNI static float dot_q4_0_vnni(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_vnni(QT_Q4_0, w, q, d, s, nb); }
TGT_VNNI static float dot_q4_1_vnni(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_vnni(QT_Q4_1, w, q, d, s, nb); }
TGT_VNNI static float dot_q8_0_vnni(const uint8_t *w, const int8_t *q, const float *d, const float *s, int64_t nb) { return row_dot_vnni(QT_Q8_0, w, q, d, s, nb); }

/* ---- float32 x: each block dequantized in registers, then FMA with x ---- */
INLINE float row_dot_fx_c(int type, const uint8_t *w, const float *x, const float *xs,
                          int64_t nb) {
    (void)xs;
    const int bb = block_bytes(type);
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b, x += 32) {
        const uint8_t *blk = w + b * bb;
        const float d = f16(blk);
        float sum = 0.0f, xs = 0.0f;
        if (type == QT_Q8_0) {
            const int8_t *qw = (const int8_t *)(blk + 2);
            for (int j = 0; j < 32; ++j) sum += (float)qw[j] * x[j];
            acc += d * sum;
            continue;
        }
        const uint8_t *qs = blk + (type == QT_Q4_1 ? 4 : 2);
        for (int j = 0; j < 16; ++j) {
            sum += (float)(qs[j] & 15) * x[j] + (float)(qs[j] >> 4) * x[j + 16];
            xs += x[j] + x[j + 16];
        }
        acc += d * sum + (type == QT_Q4_1 ? f16(blk + 2) : -8.0f * d) * xs;
    }
    return acc;
}

static float fdot_q4_0_c(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_c(QT_Q4_0, w, x, xs, nb); }
static float fdot_q4_1_c(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_c(QT_Q4_1, w, x, xs, nb); }
static float fdot_q8_0_c(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_c(QT_Q8_0, w, x, xs, nb); }

/* 32 weights of a block as four groups of 8 int32 (AVX2) */
TGT_AVX2 INLINE void block_ints_avx2(int type, const uint8_t *blk, __m256i q[4]) {
    if (type == QT_Q8_0) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(blk + 2));
        const __m128i b = _mm_loadu_si128((const __m128i *)(blk + 18));
        q[0] = _mm256_cvtepi8_epi32(a);
        q[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8));
        q[2] = _mm256_cvtepi8_epi32(b);
        q[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8));
        return;
    }
    const __m128i r = _mm_loadu_si128((const __m128i *)(blk + (type == QT_Q4_1 ? 4 : 2)));
    const __m128i m4 = _mm_set1_epi8(15), lo = _mm_and_si128(r, m4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(r, 4), m4);
    q[0] = _mm256_cvtepu8_epi32(lo);
    q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    q[2] = _mm256_cvtepu8_epi32(hi);
    q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

/* The block's affine map w = d q + m: (d, m) */
TGT_AVX2 INLINE void block_affine(int type, const uint8_t *blk, float *d, float *m) {
    *d = f16c(blk);
    *m = block_offset(type, blk, *d);
}

/* R (<= FX_AVX2) rows of x against a weight row at once, each sum over blocks of
   d sum(q x) + m xs[b] (the affine map applied once a block, to sums): each block's codes
   widened and converted once, then met by every row in the same operations, so a row gets
   the same bits in a pass of R as alone (row_dot_fx_avx2 is R = 1); batched decode then
   decodes each weight once a pass, not once a row. The block-sum term (none for Q8_0) is
   an explicit fma, one rounding whatever the compiler contracts; it and the products
   alternate between two chains by block parity. */
TGT_AVX2 INLINE void rows_dot_fx_avx2(int type, int R, const uint8_t *w, const float *x,
                                      int64_t ldx, const float *xs, int64_t ldxs, int64_t nb,
                                      float *out) {
    const int bb = block_bytes(type);
    __m256 acc0[FX_AVX2], acc1[FX_AVX2];
    float corr0[FX_AVX2], corr1[FX_AVX2];
    for (int r = 0; r < R; ++r) {
        acc0[r] = acc1[r] = _mm256_setzero_ps();
        corr0[r] = corr1[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * bb;
        __m256i q[4];
        float d, m;
        block_ints_avx2(type, blk, q);
        block_affine(type, blk, &d, &m);
        const __m256 f0 = _mm256_cvtepi32_ps(q[0]), f1 = _mm256_cvtepi32_ps(q[1]);
        const __m256 f2 = _mm256_cvtepi32_ps(q[2]), f3 = _mm256_cvtepi32_ps(q[3]);
        const __m256 vd = _mm256_set1_ps(d);
        for (int r = 0; r < R; ++r) {
            const float *xr = x + r * ldx + 32 * b;
            __m256 t = _mm256_mul_ps(f0, _mm256_loadu_ps(xr));
            t = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xr + 8), t);
            t = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xr + 16), t);
            t = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xr + 24), t);
            if (b & 1) acc1[r] = _mm256_fmadd_ps(t, vd, acc1[r]);
            else acc0[r] = _mm256_fmadd_ps(t, vd, acc0[r]);
            if (type == QT_Q8_0) continue;
            if (b & 1) corr1[r] = __builtin_fmaf(m, xs[r * ldxs + b], corr1[r]);
            else corr0[r] = __builtin_fmaf(m, xs[r * ldxs + b], corr0[r]);
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = hsum256(_mm256_add_ps(acc0[r], acc1[r])) + (corr0[r] + corr1[r]);
}

TGT_AVX2 INLINE float row_dot_fx_avx2(int type, const uint8_t *w, const float *x,
                                      const float *xs, int64_t nb) {
    float out;
    rows_dot_fx_avx2(type, 1, w, x, 0, xs, 0, nb, &out);
    return out;
}

TGT_AVX2 static float fdot_q4_0_avx2(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_avx2(QT_Q4_0, w, x, xs, nb); }
TGT_AVX2 static float fdot_q4_1_avx2(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_avx2(QT_Q4_1, w, x, xs, nb); }
TGT_AVX2 static float fdot_q8_0_avx2(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_avx2(QT_Q8_0, w, x, xs, nb); }

/* rows_dot_fx_avx2 in 512-bit registers (two blocks' halves a register), R <= FX_AVX512 */
TGT_AVX512 INLINE void rows_dot_fx_avx512(int type, int R, const uint8_t *w, const float *x,
                                          int64_t ldx, const float *xs, int64_t ldxs,
                                          int64_t nb, float *out) {
    const int bb = block_bytes(type);
    __m512 acc0[FX_AVX512], acc1[FX_AVX512];
    float corr0[FX_AVX512], corr1[FX_AVX512];
    for (int r = 0; r < R; ++r) {
        acc0[r] = acc1[r] = _mm512_setzero_ps();
        corr0[r] = corr1[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * bb;
        __m512i q0, q1;
        if (type == QT_Q8_0) {
            q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)));
            q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)));
        } else {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + (type == QT_Q4_1 ? 4 : 2)));
            const __m128i m4 = _mm_set1_epi8(15);
            q0 = _mm512_cvtepu8_epi32(_mm_and_si128(raw, m4));
            q1 = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
        }
        float d, m;
        block_affine(type, blk, &d, &m);
        const __m512 f0 = _mm512_cvtepi32_ps(q0), f1 = _mm512_cvtepi32_ps(q1);
        const __m512 vd = _mm512_set1_ps(d);
        for (int r = 0; r < R; ++r) {
            const float *xr = x + r * ldx + 32 * b;
            const __m512 t = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xr + 16),
                                             _mm512_mul_ps(f0, _mm512_loadu_ps(xr)));
            if (b & 1) acc1[r] = _mm512_fmadd_ps(t, vd, acc1[r]);
            else acc0[r] = _mm512_fmadd_ps(t, vd, acc0[r]);
            if (type == QT_Q8_0) continue;
            if (b & 1) corr1[r] = __builtin_fmaf(m, xs[r * ldxs + b], corr1[r]);
            else corr0[r] = __builtin_fmaf(m, xs[r * ldxs + b], corr0[r]);
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + (corr0[r] + corr1[r]);
}

TGT_AVX512 INLINE float row_dot_fx_avx512(int type, const uint8_t *w, const float *x,
                                          const float *xs, int64_t nb) {
    float out;
    rows_dot_fx_avx512(type, 1, w, x, 0, xs, 0, nb, &out);
    return out;
}

#define FXROWS(NAME, TGT, IMPL, TYPE, R)                                                  \
TGT static void NAME(const uint8_t *w, const float *x, int64_t ldx, const float *xs,      \
                     int64_t ldxs, int64_t nb, float *out) {                              \
    IMPL(TYPE, R, w, x, ldx, xs, ldxs, nb, out);                                          \
}
#define FXROWS_TYPES(SUFFIX, TGT, IMPL, R)                                                \
FXROWS(fxrows_q4_0_##SUFFIX, TGT, IMPL, QT_Q4_0, R)                                       \
FXROWS(fxrows_q4_1_##SUFFIX, TGT, IMPL, QT_Q4_1, R)                                       \
FXROWS(fxrows_q8_0_##SUFFIX, TGT, IMPL, QT_Q8_0, R)
FXROWS_TYPES(avx2_2, TGT_AVX2, rows_dot_fx_avx2, 2)
FXROWS_TYPES(avx2_4, TGT_AVX2, rows_dot_fx_avx2, 4)
FXROWS_TYPES(avx512_2, TGT_AVX512, rows_dot_fx_avx512, 2)
FXROWS_TYPES(avx512_4, TGT_AVX512, rows_dot_fx_avx512, 4)
FXROWS_TYPES(avx512_8, TGT_AVX512, rows_dot_fx_avx512, 8)

#define QXROWS(NAME, TGT, IMPL, TYPE, R)                                                  \
TGT static void NAME(const uint8_t *w, const int8_t *q, int64_t ldq, const float *d,      \
                     const float *s, int64_t lds, int64_t nb, float *out) {               \
    IMPL(TYPE, R, w, q, ldq, d, s, lds, nb, out);                                         \
}
#define QXROWS_TYPES(SUFFIX, TGT, IMPL, R)                                                \
QXROWS(qxrows_q4_0_##SUFFIX, TGT, IMPL, QT_Q4_0, R)                                       \
QXROWS(qxrows_q4_1_##SUFFIX, TGT, IMPL, QT_Q4_1, R)                                       \
QXROWS(qxrows_q8_0_##SUFFIX, TGT, IMPL, QT_Q8_0, R)
QXROWS_TYPES(avx2_2, TGT_AVX2, rows_dot_avx2, 2)
QXROWS_TYPES(avx2_4, TGT_AVX2, rows_dot_avx2, 4)
QXROWS_TYPES(avx512_2, TGT_AVX512, rows_dot_avx512, 2)
QXROWS_TYPES(avx512_4, TGT_AVX512, rows_dot_avx512, 4)
QXROWS_TYPES(avx512_8, TGT_AVX512, rows_dot_avx512, 8)
QXROWS_TYPES(vnni_2, TGT_VNNI, rows_dot_vnni, 2)
QXROWS_TYPES(vnni_4, TGT_VNNI, rows_dot_vnni, 4)
QXROWS_TYPES(vnni_8, TGT_VNNI, rows_dot_vnni, 8)

TGT_AVX512 static float fdot_q4_0_avx512(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_avx512(QT_Q4_0, w, x, xs, nb); }
TGT_AVX512 static float fdot_q4_1_avx512(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_avx512(QT_Q4_1, w, x, xs, nb); }
TGT_AVX512 static float fdot_q8_0_avx512(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return row_dot_fx_avx512(QT_Q8_0, w, x, xs, nb); }

/* ---- dispatch ---- */
static int isa_level = -1; /* 0 plain C, 1 AVX2, 2 AVX-512, 3 AVX-512 + VNNI */

static int best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return __builtin_cpu_supports("avx512vnni") ? 3 : 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

static int isa(void) {
    if (isa_level < 0) isa_level = best_isa();
    return isa_level;
}

/* The level the float32-x, K and 16-bit kernels take: VNNI changes only integer dots. */
int current_isa(void) { return isa() > 2 ? 2 : isa(); }

/* Force a dispatch level (-1: the best); returns the level in effect, never above what
   the CPU has. */
int llamadist_quant_set_isa(int level) {
    const int best = best_isa();
    isa_level = level < 0 || level > best ? best : level;
    return isa_level;
}

/* The dispatch tables' indices: a 32-block type's column (Q4_0, Q4_1, Q8_0) and a pass
   width's row (8, 4, 2) */
static int type_col(int type) { return type == QT_Q4_0 ? 0 : type == QT_Q4_1 ? 1 : 2; }
static int pass_row(int width) { return width == 8 ? 0 : width == 4 ? 1 : 2; }

static qdot_fn pick_dot(int type) {
    static const qdot_fn table[4][3] = {
        {dot_q4_0_c, dot_q4_1_c, dot_q8_0_c},
        {dot_q4_0_avx2, dot_q4_1_avx2, dot_q8_0_avx2},
        {dot_q4_0_avx512, dot_q4_1_avx512, dot_q8_0_avx512},
        {dot_q4_0_vnni, dot_q4_1_vnni, dot_q8_0_vnni}};
    return table[isa()][type_col(type)];
}

static fdot_fn pick_fdot(int type) {
    static const fdot_fn table[3][3] = {
        {fdot_q4_0_c, fdot_q4_1_c, fdot_q8_0_c},
        {fdot_q4_0_avx2, fdot_q4_1_avx2, fdot_q8_0_avx2},
        {fdot_q4_0_avx512, fdot_q4_1_avx512, fdot_q8_0_avx512}};
    return table[current_isa()][type_col(type)];
}

/* The several-row kernel of fdot's level for passes of ``width`` rows (8, 4 or 2; NULL
   where the level has none: plain C, or 8 at AVX2) */
static fxrows_fn pick_fxrows(int type, int width) {
    static const fxrows_fn table[3][3][3] = {  /* [level][width 8, 4, 2][type] */
        {{NULL, NULL, NULL}, {NULL, NULL, NULL}, {NULL, NULL, NULL}},
        {{NULL, NULL, NULL},
         {fxrows_q4_0_avx2_4, fxrows_q4_1_avx2_4, fxrows_q8_0_avx2_4},
         {fxrows_q4_0_avx2_2, fxrows_q4_1_avx2_2, fxrows_q8_0_avx2_2}},
        {{fxrows_q4_0_avx512_8, fxrows_q4_1_avx512_8, fxrows_q8_0_avx512_8},
         {fxrows_q4_0_avx512_4, fxrows_q4_1_avx512_4, fxrows_q8_0_avx512_4},
         {fxrows_q4_0_avx512_2, fxrows_q4_1_avx512_2, fxrows_q8_0_avx512_2}}};
    return table[current_isa()][pass_row(width)][type_col(type)];
}

/* The int8-x several-row kernel of the dot's level (VNNI its own) for passes of ``width``
   rows (8, 4 or 2; NULL where the level has none: plain C, or 8 at AVX2) */
static qxrows_fn pick_qxrows(int type, int width) {
    static const qxrows_fn table[4][3][3] = {  /* [level][width 8, 4, 2][type] */
        {{NULL, NULL, NULL}, {NULL, NULL, NULL}, {NULL, NULL, NULL}},
        {{NULL, NULL, NULL},
         {qxrows_q4_0_avx2_4, qxrows_q4_1_avx2_4, qxrows_q8_0_avx2_4},
         {qxrows_q4_0_avx2_2, qxrows_q4_1_avx2_2, qxrows_q8_0_avx2_2}},
        {{qxrows_q4_0_avx512_8, qxrows_q4_1_avx512_8, qxrows_q8_0_avx512_8},
         {qxrows_q4_0_avx512_4, qxrows_q4_1_avx512_4, qxrows_q8_0_avx512_4},
         {qxrows_q4_0_avx512_2, qxrows_q4_1_avx512_2, qxrows_q8_0_avx512_2}},
        {{qxrows_q4_0_vnni_8, qxrows_q4_1_vnni_8, qxrows_q8_0_vnni_8},
         {qxrows_q4_0_vnni_4, qxrows_q4_1_vnni_4, qxrows_q8_0_vnni_4},
         {qxrows_q4_0_vnni_2, qxrows_q4_1_vnni_2, qxrows_q8_0_vnni_2}}};
    return table[isa()][pass_row(width)][type_col(type)];
}

/* ---- dequantization (prefill tiles, embedding rows) ---- */
static void dequant_block(int type, const uint8_t *blk, float *out) {
    if (IS_K(type)) {
        dequant_k(type, blk, out);
        return;
    }
    const float d = f16(blk);
    if (type == QT_Q8_0) {
        for (int j = 0; j < 32; ++j) out[j] = d * (float)(int8_t)blk[2 + j];
        return;
    }
    const uint8_t *qs = blk + (type == QT_Q4_1 ? 4 : 2);
    const float m = type == QT_Q4_1 ? f16(blk + 2) : -8.0f * d;
    for (int j = 0; j < 16; ++j) {
        out[j] = d * (float)(qs[j] & 15) + m;
        out[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

/* A row of nb 32-blocks (Q4_0, Q4_1, Q8_0) -> floats, 8 at a time (AVX2, F16C). */
TGT_AVX2 static void dequant_row32_avx2(int type, const uint8_t *w, int64_t nb, float *out) {
    const int bb = block_bytes(type);
    for (int64_t b = 0; b < nb; ++b, out += 32) {
        const uint8_t *blk = w + b * bb;
        __m256i q[4];
        float d, m;
        block_ints_avx2(type, blk, q);
        block_affine(type, blk, &d, &m);
        const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
        for (int i = 0; i < 4; ++i)
            _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[i]), vd, vm));
    }
}

/* rows of W (rows, k) in blocks of `type` -> out (rows, k) float32. */
void llamadist_dequant_rows(int type, const uint8_t *w, int64_t rows, int64_t k, float *out,
                            int threads) {
    const int64_t bw = block_weights(type), bb = block_bytes(type), nb = k / bw;
    const int simd = current_isa() >= 1 && !IS_K(type) && !IS_HALF(type);
    isa(); /* decide before the team starts */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        if (IS_HALF(type)) {
            dequant_half(type, w + r * k * 2, k, out + r * k);
            continue;
        }
        if (simd) {
            dequant_row32_avx2(type, w + r * nb * bb, nb, out + r * k);
            continue;
        }
        for (int64_t b = 0; b < nb; ++b)
            dequant_block(type, w + (r * nb + b) * bb, out + r * k + b * bw);
    }
}

/* ---- the linear ---- */
/* One thread's share of the scratch: its own quantized x (int8, scale and sum per 32),
   64-byte aligned, so every thread prepares x itself and no barrier waits for it. */
int64_t llamadist_quant_scratch_bytes(int64_t m, int64_t k) {
    return (m * k + 2 * m * (k / 32) * (int64_t)sizeof(float) + 63) / 64 * 64;
}

/* This thread's share of the scratch: xd (m, k/32) scales, xs (m, k/32) sums, xq (m, k). */
static inline float *scratch_share(void *scratch, int64_t m, int64_t k) {
    return (float *)((uint8_t *)scratch
                     + omp_get_thread_num() * llamadist_quant_scratch_bytes(m, k));
}

int quant_prep_kind(int type, int int8_x) {
    if (type == QT_F32 || IS_HALF(type)) return 0;
    return int8_x && !IS_K(type) ? 1 : 2;
}

void quant_prep(int type, int int8_x, const float *x, int64_t m, int64_t k, int64_t ldx,
                void *scratch) {
    /* x (at most 32 rows of a few thousand) is prepared by every thread into its own
       scratch: a microsecond of redundant work instead of waiting for the other threads. */
    const int kind = quant_prep_kind(type, int8_x);
    float *xd = scratch_share(scratch, m, k), *xs = xd + m * (k / 32);
    int8_t *xq = (int8_t *)(xs + m * (k / 32));
    if (kind == 1) {
        for (int64_t r = 0; r < m; ++r)
            quantize_row_q8(x + r * ldx, k, xq + r * k, xd + r * (k / 32), xs + r * (k / 32));
    } else if (kind == 2) { /* the sums of x's runs of 32 (the blocks' offsets m, the K types' mins) */
        for (int64_t r = 0; r < m; ++r)
            for (int64_t b = 0; b < k / 32; ++b) {
                float sum = 0.0f;
                for (int i = 0; i < 32; ++i) sum += x[r * ldx + 32 * b + i];
                xs[r * (k / 32) + b] = sum;
            }
    }
}

void quant_rows(int type, int int8_x, const float *x, const uint8_t *w, const float *bias,
                float *y, int64_t m, int64_t j0, int64_t j1, int64_t k, int64_t ldx, int64_t ldy,
                int accumulate, void *scratch) {
    const int is_k = IS_K(type), half = IS_HALF(type), q8 = quant_prep_kind(type, int8_x) == 1;
    const int64_t nb = k / block_weights(type), rb = nb * block_bytes(type);
    const float *xd = scratch_share(scratch, m, k), *xs = xd + m * (k / 32);
    const int8_t *xq = (const int8_t *)(xs + m * (k / 32));
    if (half) {
        hrows(type, w, x, bias, y, m, j0, j1, k, ldx, ldy, accumulate);
        return;
    }
    const qdot_fn dot = q8 ? pick_dot(type) : NULL;
    const fdot_fn fdot = q8 || is_k ? NULL : pick_fdot(type);
    const int several = !q8 && !is_k;  /* float x on 32-blocks: passes of 8, 4, 2 rows */
    const fxrows_fn fx8 = several ? pick_fxrows(type, 8) : NULL,
                    fx4 = several ? pick_fxrows(type, 4) : NULL,
                    fx2 = several ? pick_fxrows(type, 2) : NULL;
    const qxrows_fn qx8 = q8 ? pick_qxrows(type, 8) : NULL,  /* int8 x: the same passes */
                    qx4 = q8 ? pick_qxrows(type, 4) : NULL,
                    qx2 = q8 ? pick_qxrows(type, 2) : NULL;
    /* several rows a pass where there are: a batch's x on 32-blocks (float or int8), or K
       types (krows, at AVX2 / AVX-512) */
    const int passes = several && m >= 2, qpasses = q8 && m >= 2;
    const int kpasses = is_k && m >= K_ROWS && current_isa() >= 1;
    for (int64_t j = j0; j < j1; ++j) {
        const uint8_t *wr = w + j * rb;
        int64_t r = 0;
        float v[FX_AVX512 > K_ROWS ? FX_AVX512 : K_ROWS];
        for (int width = 8; passes && width >= 2; width /= 2) { /* each block decoded once */
            const fxrows_fn fx = width == 8 ? fx8 : width == 4 ? fx4 : fx2;
            for (; fx && r + width <= m; r += width) {
                fx(wr, x + r * ldx, ldx, xs + r * (k / 32), k / 32, nb, v);
                put_rows(y, ldy, r, j, v, width, bias, accumulate);
            }
        }
        for (int width = 8; qpasses && width >= 2; width /= 2) { /* each block loaded once */
            const qxrows_fn qx = width == 8 ? qx8 : width == 4 ? qx4 : qx2;
            for (; qx && r + width <= m; r += width) {
                qx(wr, xq + r * k, k, xd + r * nb, xs + r * nb, nb, nb, v);
                put_rows(y, ldy, r, j, v, width, bias, accumulate);
            }
        }
        for (; kpasses && r + K_ROWS <= m; r += K_ROWS) { /* each run decoded once */
            krows(type, wr, x + r * ldx, ldx, xs + r * (k / 32), k / 32, nb, v);
            put_rows(y, ldy, r, j, v, K_ROWS, bias, accumulate);
        }
        for (; r < m; ++r) { /* the row is read from memory once, then cache */
            v[0] = is_k ? kdot(type, wr, x + r * ldx, xs + r * (k / 32), nb)
                   : q8 ? dot(wr, xq + r * k, xd + r * nb, xs + r * nb, nb)
                        : fdot(wr, x + r * ldx, xs + r * (k / 32), nb);
            put_rows(y, ldy, r, j, v, 1, bias, accumulate);
        }
    }
}

void quant_linear_for(int type, int int8_x, const float *x, const uint8_t *w,
                      const float *bias, float *y, int64_t m, int64_t n, int64_t k, int64_t ldx,
                      int64_t ldy, int accumulate, void *scratch) {
    quant_prep(type, int8_x, x, m, k, ldx, scratch);
    const int threads = omp_get_num_threads(), t = omp_get_thread_num();
    /* the rows split as schedule(static) would, a contiguous run per thread */
    quant_rows(type, int8_x, x, w, bias, y, m, n * t / threads, n * (t + 1) / threads, k, ldx,
               ldy, accumulate, scratch);
#pragma omp barrier
}

void llamadist_qlinear(int type, int int8_x, const float *x, const uint8_t *w,
                       const float *bias, float *y, int64_t m, int64_t n, int64_t k, int64_t ldx,
                       int64_t ldy, void *scratch, int threads) {
    isa(); /* decide before the team starts */
#pragma omp parallel num_threads(threads)
    quant_linear_for(type, int8_x, x, w, bias, y, m, n, k, ldx, ldy, 0, scratch);
}

/* The activation quantization alone, for tests: x (m, k) -> q (m, k), d, s (m, k/32). */
void llamadist_quantize_q8(const float *x, int64_t m, int64_t k, int64_t ldx, int8_t *q,
                           float *d, float *s) {
    for (int64_t r = 0; r < m; ++r)
        quantize_row_q8(x + r * ldx, k, q + r * k, d + r * (k / 32), s + r * (k / 32));
}
