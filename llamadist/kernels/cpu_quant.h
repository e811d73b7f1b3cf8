/* Quantized (GGUF block) linears for the CPU decode kernels: see cpu_quant.c. */
#ifndef LLAMADIST_CPU_QUANT_H
#define LLAMADIST_CPU_QUANT_H

#include <stdint.h>

/* ggml type ids; 0 is float32 (the weight is a plain float matrix) */
enum { QT_F32 = 0, QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q8_0 = 8, QT_Q4_K = 12, QT_Q5_K = 13,
       QT_Q6_K = 14 };

/* Bytes of scratch quant_linear_for needs for m rows of k inputs. */
int64_t llamadist_quant_scratch_bytes(int64_t m, int64_t k);

/* y[r] (=|+=) x[r] W^T + bias for rows r < m, W (n, k) in blocks of `type`, rows
   contiguous. An orphaned worksharing construct: call it inside a parallel region
   (every thread of the team). With int8_x (types Q4_0, Q4_1, Q8_0) x is first quantized
   to int8 blocks into `scratch` and met in integer dot products; else each weight block
   is dequantized in registers and met by x in float32. The threads split W's rows. */
void quant_linear_for(int type, int int8_x, const float *x, const uint8_t *w,
                      const float *bias, float *y, int64_t m, int64_t n, int64_t k, int64_t ldx,
                      int64_t ldy, int accumulate, void *scratch);

#endif
