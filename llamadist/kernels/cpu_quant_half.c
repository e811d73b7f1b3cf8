/* 16-bit float weights (GGUF F16 and BF16 tensors) kept as they are: the GEMV row dot
   product with float32 x, each weight widened to float32 in registers (F16C's vcvtph2ps;
   bf16 is the top half of a float32, so a 16-bit shift), plain C / AVX2 / AVX-512 as
   dispatched in cpu_quant.c (the GEMV's rows, hrows, take AVX2 on AVX-512 CPUs too: see
   there); and their conversion to floats for prefill tiles. A row
   holds k weights, any k (tails in plain C). */

#include "cpu_quant.h"

#include <immintrin.h>

static inline float bf16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float half_at(int type, const uint8_t *w, int64_t i) {
    return type == QT_BF16 ? bf16(w + 2 * i) : f16(w + 2 * i);
}

TGT_AVX2 INLINE __m256 widen8(int type, const uint8_t *p);

TGT_AVX2 static void dequant_half_avx2(int type, const uint8_t *w, int64_t k, float *out) {
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(out + i, widen8(type, w + 2 * i));
    for (; i < k; ++i) out[i] = half_at(type, w, i);
}

void dequant_half(int type, const uint8_t *w, int64_t k, float *out) {
    if (current_isa() >= 1) {
        dequant_half_avx2(type, w, k, out);
        return;
    }
    for (int64_t i = 0; i < k; ++i) out[i] = half_at(type, w, i);
}

static float hdot_c(int type, const uint8_t *w, const float *x, int64_t from, int64_t k) {
    float acc = 0.0f;
    for (int64_t i = from; i < k; ++i) acc += half_at(type, w, i) * x[i];
    return acc;
}

TGT_AVX2 INLINE __m256 widen8(int type, const uint8_t *p) { /* 8 halves -> 8 floats */
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (type == QT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* R rows of x (x_r = x + r ldx) against a row of k 16-bit weights at once, four chains a
   row (FMA latency): each 8 weights widened once, then met by every row in the same
   operations, so a row gets the same bits in a pass of R as alone (hdot_avx2_inline is
   R = 1). R = 4 where AVX-512 is there (hdot4_avx512): its 256-bit operations then reach
   ymm16-31 for the 16 accumulators. Two rows a pass, at either level, measured slower than
   one at a time (F16 batch 2, 165-177 against 189-204 tokens/s), so no R = 2. */
TGT_AVX2 INLINE void hdot_rows_avx2(int type, int R, const uint8_t *w, const float *x,
                                    int64_t ldx, int64_t k, float *out) {
    __m256 a[4][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) a[r][c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32)
        for (int c = 0; c < 4; ++c) {
            const __m256 wc = widen8(type, w + 2 * i + 16 * c);
            for (int r = 0; r < R; ++r)
                a[r][c] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x + r * ldx + i + 8 * c), a[r][c]);
        }
    for (; i + 8 <= k; i += 8) {
        const __m256 wc = widen8(type, w + 2 * i);
        for (int r = 0; r < R; ++r)
            a[r][0] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x + r * ldx + i), a[r][0]);
    }
    for (int r = 0; r < R; ++r)
        out[r] = hsum256(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]),
                                       _mm256_add_ps(a[r][2], a[r][3])))
                 + hdot_c(type, w, x + r * ldx, i, k);
}

TGT_AVX2 INLINE float hdot_avx2_inline(int type, const uint8_t *w, const float *x, int64_t k) {
    float out;
    hdot_rows_avx2(type, 1, w, x, 0, k, &out);
    return out;
}

TGT_AVX512 static void hdot4_avx512(int type, const uint8_t *w, const float *x, int64_t ldx,
                                    int64_t k, float *out) {
    hdot_rows_avx2(type, 4, w, x, ldx, k, out);
}

TGT_AVX512 INLINE __m512 widen16(int type, const uint8_t *p) { /* 16 halves -> 16 floats */
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (type == QT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TGT_AVX512 static float hdot_avx512(int type, const uint8_t *w, const float *x, int64_t k) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        a0 = _mm512_fmadd_ps(widen16(type, w + 2 * i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(widen16(type, w + 2 * i + 32), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i + 16 <= k; i += 16)
        a0 = _mm512_fmadd_ps(widen16(type, w + 2 * i), _mm512_loadu_ps(x + i), a0);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + hdot_c(type, w, x, i, k);
}

TGT_AVX2 static float hdot_avx2(int type, const uint8_t *w, const float *x, int64_t k) {
    return hdot_avx2_inline(type, w, x, k);
}

/* Rows j0 <= j < j1 of W (n, k) 16-bit floats against the m rows of x: y[r][j] (=|+=)
   w_j . x_r + bias[j], the dot product inlined (hdot is a call and a dispatch per row: on
   SmolLM2's 576-wide rows that overhead is a fifth of the row's work). AVX2 at both
   levels: on the 2-core Zen 4, a chain of SmolLM2's GEMVs over 270 MB of f16 weights read
   at 34.5 GB/s with these four 256-bit chains against 31.9 with two 512-bit ones (best
   of 11, two threads). */
TGT_AVX2 static void hrows_avx2(int type, const uint8_t *w, const float *x, const float *bias,
                                float *y, int64_t m, int64_t j0, int64_t j1, int64_t k,
                                int64_t ldx, int64_t ldy, int accumulate) {
    const int wide = current_isa() == 2;  /* 4 rows a pass (AVX-512's registers) */
    for (int64_t j = j0; j < j1; ++j) {
        const uint8_t *wr = w + j * k * 2;
        int64_t r = 0;
        float v[4];
        for (; wide && r + 4 <= m; r += 4) { /* four rows a pass: each weight widened once */
            hdot4_avx512(type, wr, x + r * ldx, ldx, k, v);
            put_rows(y, ldy, r, j, v, 4, bias, accumulate);
        }
        for (; r < m; ++r) {
            v[0] = hdot_avx2_inline(type, wr, x + r * ldx, k);
            put_rows(y, ldy, r, j, v, 1, bias, accumulate);
        }
    }
}

float hdot(int type, const uint8_t *w, const float *x, int64_t k) {
    switch (current_isa()) {
    case 2: return hdot_avx512(type, w, x, k);
    case 1: return hdot_avx2(type, w, x, k);
    default: return hdot_c(type, w, x, 0, k);
    }
}

void hrows(int type, const uint8_t *w, const float *x, const float *bias, float *y, int64_t m,
           int64_t j0, int64_t j1, int64_t k, int64_t ldx, int64_t ldy, int accumulate) {
    if (current_isa() >= 1) {
        hrows_avx2(type, w, x, bias, y, m, j0, j1, k, ldx, ldy, accumulate);
        return;
    }
    for (int64_t j = j0; j < j1; ++j)
        for (int64_t r = 0; r < m; ++r) {
            const float v = hdot(type, w + j * k * 2, x + r * ldx, k) + (bias ? bias[j] : 0.0f);
            float *o = y + r * ldy + j;
            *o = accumulate ? *o + v : v;
        }
}
