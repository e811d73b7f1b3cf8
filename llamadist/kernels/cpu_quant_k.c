/* The K block types (Q4_K, Q5_K, Q6_K: 256 weights a block, layouts in quant_ref.py):
   dequantization, and the GEMV row dot product with float32 x, in plain C (a block
   dequantized to the stack, then dotted) and in AVX2 / AVX-512, where each block is
   dequantized in registers, one run of 32 (Q4_K, Q5_K: its own scale and min) or 16
   (Q6_K: its own scale) at a time:
       Q4_K, Q5_K   sum_j d sc_j sum(q x) - dmin mn_j xsum32_j      (j: runs of 32)
       Q6_K         sum_g d sc_g sum((q - 32) x)                     (g: runs of 16)
   x is never quantized. Dispatch as in cpu_quant.c (current_isa). krows: four rows of x
   against a weight row at once (batched decode), each run decoded once for all four. */

#include "cpu_quant.h"

#include <immintrin.h>

static void k_scale_min(int j, const uint8_t *q, float *sc, float *mn) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *mn = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *mn = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

void dequant_k(int type, const uint8_t *blk, float *out) {
    if (type == QT_Q6_K) {
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16(blk + 208);
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, out += 128)
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                out[l] = d * sc[is] * (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
                out[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                out[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                out[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        return;
    }
    const float d = f16(blk), dmin = f16(blk + 2);
    const uint8_t *scales = blk + 4, *qh = blk + 16, *qs = blk + (type == QT_Q5_K ? 48 : 16);
    for (int j = 0; j < 8; ++j) { /* sub-block j: nibble (j & 1) of qs[32 (j / 2) + l] */
        float sc, mn;
        k_scale_min(j, scales, &sc, &mn);
        const float a = d * sc, c = dmin * mn;
        const uint8_t *src = qs + 32 * (j / 2);
        for (int l = 0; l < 32; ++l) {
            int q = (j & 1) ? src[l] >> 4 : src[l] & 0xF;
            if (type == QT_Q5_K) q += ((qh[l] >> j) & 1) << 4;
            out[32 * j + l] = a * (float)q - c;
        }
    }
}

typedef float v8 __attribute__((vector_size(32)));

static float kdot_c(int type, const uint8_t *w, const float *x, int64_t nb) {
    float tmp[256] __attribute__((aligned(64)));
    const int bb = block_bytes(type);
    v8 acc = {0};
    for (int64_t b = 0; b < nb; ++b, x += 256) {
        dequant_k(type, w + b * bb, tmp);
        for (int i = 0; i < 256; i += 8) {
            v8 xv, wv;
            memcpy(&xv, x + i, sizeof xv);
            memcpy(&wv, tmp + i, sizeof wv);
            acc += xv * wv;
        }
    }
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* ---- Q4_K / Q5_K ---- */
/* the 32 quants (0..31) of run j of a Q4_K / Q5_K block, as bytes */
TGT_AVX2 INLINE __m256i k45_quants(int type, const uint8_t *blk, int j) {
    const uint8_t *qs = blk + (type == QT_Q5_K ? 48 : 16) + 32 * (j / 2);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)qs), m4 = _mm256_set1_epi8(15);
    __m256i q = (j & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4)
                        : _mm256_and_si256(raw, m4);
    if (type == QT_Q5_K) { /* bit j of qh[l] is the fifth bit: 16 */
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        const __m256i bit = _mm256_set1_epi8((char)(1 << j));
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
        q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
    }
    return q;
}

/* Q4_K / Q5_K, R (<= K_ROWS) rows of x (x_r = x + r ldx, its sums xs_r = xs + r ldxs)
   against a weight row at once: each run's quants decoded and converted once, then met by
   every row in the same operations, so a row gets the same bits in a pass of R as alone
   (k45_avx2 / k45_avx512 are R = 1) */
TGT_AVX2 INLINE void k45_rows_avx2(int type, int R, const uint8_t *w, const float *x,
                                   int64_t ldx, const float *xs, int64_t ldxs, int64_t nb,
                                   float *out) {
    const int bb = block_bytes(type);
    __m256 acc[K_ROWS];
    float corr[K_ROWS];
    for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_setzero_ps();
        corr[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * bb;
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int j = 0; j < 8; ++j) {
            float sc, mn;
            k_scale_min(j, blk + 4, &sc, &mn);
            const __m256i q = k45_quants(type, blk, j);
            const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            const __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            const __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            const __m256 vs = _mm256_set1_ps(d * sc);
            const float cm = dmin * mn;
            for (int r = 0; r < R; ++r) {
                const float *xr = x + r * ldx + 256 * b + 32 * j;
                __m256 t = _mm256_mul_ps(f0, _mm256_loadu_ps(xr));
                t = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xr + 8), t);
                t = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xr + 16), t);
                t = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xr + 24), t);
                acc[r] = _mm256_fmadd_ps(t, vs, acc[r]);
                corr[r] = __builtin_fmaf(cm, xs[r * ldxs + 8 * b + j], corr[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = hsum256(acc[r]) - corr[r];
}

TGT_AVX512 INLINE void k45_rows_avx512(int type, int R, const uint8_t *w, const float *x,
                                       int64_t ldx, const float *xs, int64_t ldxs, int64_t nb,
                                       float *out) {
    const int bb = block_bytes(type);
    __m512 acc[K_ROWS];
    float corr[K_ROWS];
    for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_setzero_ps();
        corr[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * bb;
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int j = 0; j < 8; ++j) {
            float sc, mn;
            k_scale_min(j, blk + 4, &sc, &mn);
            const __m256i q = k45_quants(type, blk, j);
            const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
            const __m512 c = _mm512_cvtepi32_ps(
                _mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));
            const __m512 vs = _mm512_set1_ps(d * sc);
            const float cm = dmin * mn;
            for (int r = 0; r < R; ++r) {
                const float *xr = x + r * ldx + 256 * b + 32 * j;
                const __m512 t = _mm512_fmadd_ps(c, _mm512_loadu_ps(xr + 16),
                                                 _mm512_mul_ps(a, _mm512_loadu_ps(xr)));
                acc[r] = _mm512_fmadd_ps(t, vs, acc[r]);
                corr[r] = __builtin_fmaf(cm, xs[r * ldxs + 8 * b + j], corr[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = _mm512_reduce_add_ps(acc[r]) - corr[r];
}

/* ---- Q6_K ---- */
/* half h (128 weights) of a Q6_K block as four runs of 32 signed quants q - 32 */
TGT_AVX2 INLINE void q6_quants(const uint8_t *blk, int half, __m256i out[4]) {
    const uint8_t *ql = blk + 64 * half, *qh = blk + 128 + 32 * half;
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), o32 = _mm256_set1_epi8(32);
#define Q6_HIGH(shift) _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, shift), m3), 4)
    out[0] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l0, m4), Q6_HIGH(0)), o32);
    out[1] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l1, m4), Q6_HIGH(2)), o32);
    out[2] = _mm256_sub_epi8(
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), Q6_HIGH(4)), o32);
    out[3] = _mm256_sub_epi8(
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), Q6_HIGH(6)), o32);
#undef Q6_HIGH
}

TGT_AVX2 INLINE float k45_avx2(int type, const uint8_t *w, const float *x, const float *xs,
                               int64_t nb) {
    float out;
    k45_rows_avx2(type, 1, w, x, 0, xs, 0, nb, &out);
    return out;
}

TGT_AVX512 INLINE float k45_avx512(int type, const uint8_t *w, const float *x, const float *xs,
                                   int64_t nb) {
    float out;
    k45_rows_avx512(type, 1, w, x, 0, xs, 0, nb, &out);
    return out;
}

TGT_AVX2 static float q4k_avx2(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return k45_avx2(QT_Q4_K, w, x, xs, nb); }
TGT_AVX2 static float q5k_avx2(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return k45_avx2(QT_Q5_K, w, x, xs, nb); }
TGT_AVX512 static float q4k_avx512(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return k45_avx512(QT_Q4_K, w, x, xs, nb); }
TGT_AVX512 static float q5k_avx512(const uint8_t *w, const float *x, const float *xs, int64_t nb) { return k45_avx512(QT_Q5_K, w, x, xs, nb); }

/* Q6_K, R (<= K_ROWS) rows of x at once, as k45_rows_* (q6k_* are R = 1) */
TGT_AVX2 INLINE void q6k_rows_avx2(int R, const uint8_t *w, const float *x, int64_t ldx,
                                   int64_t nb, float *out) {
    __m256 acc[K_ROWS];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16(blk + 208);
        for (int half = 0; half < 2; ++half) {
            __m256i q[4];
            q6_quants(blk, half, q);
            for (int g = 0; g < 4; ++g) {
                const int s = 8 * half + 2 * g;
                const __m128i q0 = _mm256_castsi256_si128(q[g]);
                const __m128i q1 = _mm256_extracti128_si256(q[g], 1);
                const __m256 a0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0));
                const __m256 a1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)));
                const __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1));
                const __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)));
                const __m256 s0 = _mm256_set1_ps(d * sc[s]), s1 = _mm256_set1_ps(d * sc[s + 1]);
                for (int r = 0; r < R; ++r) {
                    const float *xg = x + r * ldx + 256 * b + 128 * half + 32 * g;
                    const __m256 t0 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(xg + 8),
                                                      _mm256_mul_ps(a0, _mm256_loadu_ps(xg)));
                    acc[r] = _mm256_fmadd_ps(t0, s0, acc[r]);
                    const __m256 t1 = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xg + 24),
                                                      _mm256_mul_ps(c0, _mm256_loadu_ps(xg + 16)));
                    acc[r] = _mm256_fmadd_ps(t1, s1, acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = hsum256(acc[r]);
}

TGT_AVX512 INLINE void q6k_rows_avx512(int R, const uint8_t *w, const float *x, int64_t ldx,
                                       int64_t nb, float *out) {
    __m512 acc0[K_ROWS], acc1[K_ROWS];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16(blk + 208);
        for (int half = 0; half < 2; ++half) {
            __m256i q[4];
            q6_quants(blk, half, q);
            for (int g = 0; g < 4; ++g) {
                const int s = 8 * half + 2 * g;
                const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q[g])));
                const __m512 c = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm256_extracti128_si256(q[g], 1)));
                const __m512 s0 = _mm512_set1_ps(d * sc[s]), s1 = _mm512_set1_ps(d * sc[s + 1]);
                for (int r = 0; r < R; ++r) {
                    const float *xg = x + r * ldx + 256 * b + 128 * half + 32 * g;
                    acc0[r] = _mm512_fmadd_ps(_mm512_mul_ps(a, _mm512_loadu_ps(xg)), s0, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(_mm512_mul_ps(c, _mm512_loadu_ps(xg + 16)), s1,
                                              acc1[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

TGT_AVX2 static float q6k_avx2(const uint8_t *w, const float *x, int64_t nb) {
    float out;
    q6k_rows_avx2(1, w, x, 0, nb, &out);
    return out;
}

TGT_AVX512 static float q6k_avx512(const uint8_t *w, const float *x, int64_t nb) {
    float out;
    q6k_rows_avx512(1, w, x, 0, nb, &out);
    return out;
}

TGT_AVX2 static void q6k_rows4_avx2(const uint8_t *w, const float *x, int64_t ldx, int64_t nb,
                                    float *out) { q6k_rows_avx2(4, w, x, ldx, nb, out); }
TGT_AVX512 static void q6k_rows4_avx512(const uint8_t *w, const float *x, int64_t ldx,
                                        int64_t nb, float *out) {
    q6k_rows_avx512(4, w, x, ldx, nb, out);
}

#define K45_ROWS(NAME, TGT, IMPL, TYPE, R)                                                \
TGT static void NAME(const uint8_t *w, const float *x, int64_t ldx, const float *xs,      \
                     int64_t ldxs, int64_t nb, float *out) {                              \
    IMPL(TYPE, R, w, x, ldx, xs, ldxs, nb, out);                                          \
}
K45_ROWS(q4k_rows4_avx2, TGT_AVX2, k45_rows_avx2, QT_Q4_K, 4)
K45_ROWS(q5k_rows4_avx2, TGT_AVX2, k45_rows_avx2, QT_Q5_K, 4)
K45_ROWS(q4k_rows4_avx512, TGT_AVX512, k45_rows_avx512, QT_Q4_K, 4)
K45_ROWS(q5k_rows4_avx512, TGT_AVX512, k45_rows_avx512, QT_Q5_K, 4)

void krows(int type, const uint8_t *w, const float *x, int64_t ldx, const float *xsum32,
           int64_t ldxs, int64_t nb, float *out) {
    const int isa = current_isa();
    if (type == QT_Q6_K) (isa == 2 ? q6k_rows4_avx512 : q6k_rows4_avx2)(w, x, ldx, nb, out);
    else if (type == QT_Q5_K) (isa == 2 ? q5k_rows4_avx512 : q5k_rows4_avx2)(w, x, ldx, xsum32, ldxs, nb, out);
    else (isa == 2 ? q4k_rows4_avx512 : q4k_rows4_avx2)(w, x, ldx, xsum32, ldxs, nb, out);
}

float kdot(int type, const uint8_t *w, const float *x, const float *xsum32, int64_t nb) {
    const int isa = current_isa();
    if (isa == 0) return kdot_c(type, w, x, nb);
    if (type == QT_Q6_K) return isa == 2 ? q6k_avx512(w, x, nb) : q6k_avx2(w, x, nb);
    if (type == QT_Q5_K) return isa == 2 ? q5k_avx512(w, x, xsum32, nb) : q5k_avx2(w, x, xsum32, nb);
    return isa == 2 ? q4k_avx512(w, x, xsum32, nb) : q4k_avx2(w, x, xsum32, nb);
}
