// What int4_rows.cu and int8_rows.cu share, handed to NVRTC as an in-memory header
// (kernels.cuda_int4.compile_cubin): the 32- and 16-bit words, bf16 rounding, and the bf16
// tensor-core product they are built on. Only PTX through inline asm: no CUDA headers.
// A CPU emulator of these kernels (tests/cuda_emu.hpp) that defines LLAMADIST_PTX_EMULATED
// brings its own to_bf16 and mma (and cuda_ptx.cuh's instructions).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

#ifndef LLAMADIST_PTX_EMULATED

static __device__ __forceinline__ u16 to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// d (16 x 8, float32) += a (16 x 16, bf16; row) b (16 x 8, bf16; col): lane (g = lane / 4,
// c = lane % 4) holds a0 (row g, k 2c, 2c + 1), a1 (row g + 8, the same k), a2 and a3 (k
// 2c + 8, 2c + 9), b0 (k 2c, 2c + 1 of column g), b1 (k 2c + 8, 2c + 9), d0 and d1 (row
// g, columns 2c, 2c + 1), d2 and d3 (row g + 8); the lower k in each word's low half
static __device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                           u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif  // LLAMADIST_PTX_EMULATED
