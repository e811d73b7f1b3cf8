/* Quantized (GGUF block) linears for the CPU decode kernels: see cpu_quant.c. */
#ifndef LLAMADIST_CPU_QUANT_H
#define LLAMADIST_CPU_QUANT_H

#include <stdint.h>

/* ggml type ids; 0 is float32 (the weight is a plain float matrix) */
enum { QT_F32 = 0, QT_F16 = 1, QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q8_0 = 8, QT_Q4_K = 12,
       QT_Q5_K = 13, QT_Q6_K = 14, QT_BF16 = 30 };

#define IS_K(t) ((t) >= QT_Q4_K && (t) <= QT_Q6_K)  /* blocks of 256 */
#define IS_HALF(t) ((t) == QT_F16 || (t) == QT_BF16)  /* 16-bit floats: blocks of 1 */

/* Bytes of scratch quant_linear_for needs per thread of the team for m rows of k inputs
   (the scratch holds one such share per thread). */
int64_t llamadist_quant_scratch_bytes(int64_t m, int64_t k);

/* y[r] (=|+=) x[r] W^T + bias for rows r < m, W (n, k) in blocks of `type`, rows
   contiguous. An orphaned worksharing construct: call it inside a parallel region
   (every thread of the team); each thread prepares x into its own share of `scratch`.
   With int8_x (types Q4_0, Q4_1, Q8_0) x is first quantized to int8 blocks there and
   met in integer dot products; else each weight block
   is dequantized in registers and met by x in float32. The threads split W's rows. */
void quant_linear_for(int type, int int8_x, const float *x, const uint8_t *w,
                      const float *bias, float *y, int64_t m, int64_t n, int64_t k, int64_t ldx,
                      int64_t ldy, int accumulate, void *scratch);

/* quant_linear_for in two parts, for a caller that hands rows out itself (cpu_decode.c):
   quant_prep readies x in this thread's share of the scratch as quant_prep_kind(type,
   int8_x) says (0 nothing: float32 or 16-bit weights; 1 int8 blocks; 2 sums per 32), then
   quant_rows computes the outputs of W's rows j0 <= j < j1 (type QT_F32 not taken). */
int quant_prep_kind(int type, int int8_x);
void quant_prep(int type, int int8_x, const float *x, int64_t m, int64_t k, int64_t ldx,
                void *scratch);
void quant_rows(int type, int int8_x, const float *x, const uint8_t *w, const float *bias,
                float *y, int64_t m, int64_t j0, int64_t j1, int64_t k, int64_t ldx, int64_t ldy,
                int accumulate, void *scratch);

/* ---- shared by cpu_quant.c and cpu_quant_k.c ---- */
#include <math.h>
#include <string.h>

#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TGT_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")))
#define TGT_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

#include <immintrin.h>

TGT_AVX2 INLINE float hsum256(__m256 v) { /* the 8 lanes' sum, in a fixed order */
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* y[(r + i) ldy + j] (=|+=) v[i] + bias[j] for i < n: a pass's outputs of weight row j */
static inline void put_rows(float *y, int64_t ldy, int64_t r, int64_t j, const float *v, int n,
                            const float *bias, int accumulate) {
    for (int i = 0; i < n; ++i) {
        const float vi = v[i] + (bias ? bias[j] : 0.0f);
        float *o = y + (r + i) * ldy + j;
        *o = accumulate ? *o + vi : vi;
    }
}

static inline int block_weights(int type) { return IS_K(type) ? 256 : IS_HALF(type) ? 1 : 32; }

static inline int block_bytes(int type) {
    switch (type) {
    case QT_Q4_0: return 18;
    case QT_Q4_1: return 20;
    case QT_Q8_0: return 34;
    case QT_Q4_K: return 144;
    case QT_Q5_K: return 176;
    case QT_Q6_K: return 210;
    case QT_F16: case QT_BF16: return 2;
    default: return 0;
    }
}

static inline float f16(const uint8_t *p) { /* little-endian IEEE half -> float */
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t bits;
    if (e == 0) {
        const float f = ldexpf((float)m, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    bits = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

int current_isa(void); /* 0 plain C, 1 AVX2, 2 AVX-512 (cpu_quant.c; VNNI counts as 2) */

/* cpu_quant_k.c: one K block -> 256 floats; a weight row of nb K blocks . x, with
   xsum32 the sums of x's runs of 32 (see quant_linear_for). */
void dequant_k(int type, const uint8_t *blk, float *out);
float kdot(int type, const uint8_t *w, const float *x, const float *xsum32, int64_t nb);
/* ... and K_ROWS rows of x (ldx apart, their sums ldxs apart) against the row at once, each
   run decoded once for all (the same bits as K_ROWS kdot calls); AVX2 / AVX-512 only
   (current_isa() >= 1) */
#define K_ROWS 4
void krows(int type, const uint8_t *w, const float *x, int64_t ldx, const float *xsum32,
           int64_t ldxs, int64_t nb, float *out);

/* cpu_quant_half.c: k 16-bit floats (F16 or BF16) -> floats; a row of k of them . x */
void dequant_half(int type, const uint8_t *w, int64_t k, float *out);
float hdot(int type, const uint8_t *w, const float *x, int64_t k);
/* ... and rows j0 <= j < j1 of W (n, k) . the m rows of x: y[r * ldy + j] (=|+=) + bias[j] */
void hrows(int type, const uint8_t *w, const float *x, const float *bias, float *y, int64_t m,
           int64_t j0, int64_t j1, int64_t k, int64_t ldx, int64_t ldy, int accumulate);

#endif
