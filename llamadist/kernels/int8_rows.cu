// y (M, N) = (x (M, K) @ q^T) * scale for M <= 8 rows of bf16 x and an int8 W (N, K) in
// row-major bytes with one float32 scale a row: the decode product of int8 weights on the
// tensor cores, compiled at first use by NVRTC (kernels.cuda_int8 says how and why). No
// CUDA headers: only PTX through inline asm (and cuda_mma.cuh, shared with int4_rows.cu).
//
// W is the A operand of mma.m16n8k16 (16 rows of W x 16 inputs), x's rows its B columns
// (rows past M repeat row M - 1; their outputs are never written). The sum over k does not
// care which input each A / B slot holds as long as both agree, so each lane takes 16
// contiguous bytes of its two rows (g = lane / 4 and g + 8, from input 16 c, c = lane % 4,
// of a 64-input chunk) with plain 16-byte loads, and k-step j of the chunk puts its bytes
// 4j, 4j + 1 in the fragments' slots (2c, 2c + 1) and 4j + 2, 4j + 3 in (2c + 8, 2c + 9):
// x's lane (g, c) then loads x[16 c + 4 j ..] of row g, the same bytes' inputs.
//
// A code q (int8) is 16 h + l with l = its low nibble (0..15) and h its signed high one
// (-8..7); each becomes a bf16 pair by a byte permute, a shift and one LOP3 (mask, and
// the magic 2^7 with h's sign bit flipped: 128 + l, 136 + h, exact), then one bf16x2 FMA
// each makes them exact small integers (l; 16 h): two mma a k-step (low and high parts)
// into one float32 accumulator, so sum q x is exact products summed in float32.
//
// Work: a block takes NT tiles of 16 rows for all of K; its WARPS warps take the 64-input
// chunks warp, warp + WARPS, ..., each keeping PF chunks of words (and x) in flight in
// registers ahead of the one it multiplies, and sum through shared memory at the end.
// PDL (sm_90): a programmatic dependent launch: the first PF chunks of W before
// griddepcontrol.wait, x after it.
//
// Compile-time parameters (-D): WARPS, NT (1, 2), PF (1..3), ROWS (<= 8: the rows a
// launch may have), PDL (0, 1). K must be a multiple of 64.

#include "cuda_mma.cuh"

#define CHUNK 64
#ifndef PDL
#define PDL 0
#endif
#if ROWS > 8
#error "int8_rows takes up to 8 rows of x"
#endif

static __device__ __forceinline__ void ldw(u32 (&v)[4], const unsigned char* p) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
}

static __device__ __forceinline__ void ldx(u32 (&v)[8], const u16* p) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p) : "memory");
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8) : "memory");
}

// bytes (SEL: 0x4140 for 0, 1; 0x4342 for 2, 3) of a word of codes as two bf16 pairs:
// lo = (l0, l1), hi = (16 h0, 16 h1), exact
struct Consts {  // kept in registers (a LOP3 takes one immediate)
    u32 zero, lo_magic, hi_magic, one_one, lo_off, hi_mul, hi_off;
};

template <u32 SEL>
static __device__ __forceinline__ void pair(u32 word, const Consts& k, u32& lo, u32& hi) {
    u32 t;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(t) : "r"(word), "r"(k.zero), "n"(SEL));
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(lo) : "r"(t), "r"(k.lo_magic));
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0x6A;" : "=r"(hi) : "r"(t >> 4), "r"(k.hi_magic));
    asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(lo) : "r"(k.one_one), "r"(k.lo_off));  // l
    asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(hi) : "r"(k.hi_mul), "r"(k.hi_off));  // 16 h
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
int8_rows(const u16* __restrict__ x, const unsigned char* __restrict__ q,
          const float* __restrict__ scale, u16* __restrict__ y, int M, int N, int K) {
    __shared__ float red[WARPS][NT][16][8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int row0 = blockIdx.x * NT * 16;
    const int chunks = K / CHUNK;
    const int mine = warp < chunks ? (chunks - 1 - warp) / WARPS + 1 : 0;  // my chunks
    // (a & b) | c: 128 + l; (a & b) ^ c, h's sign bit flipped: 136 + h; then x 1 - 128
    // and x 16 - 2176 (bf16 pairs)
    Consts k = {0u, 0x43004300u, 0x43084308u, 0x3F803F80u, 0xC300C300u, 0x41804180u,
                0xC508C508u};
    asm volatile("" : "+r"(k.zero), "+r"(k.lo_magic), "+r"(k.hi_magic), "+r"(k.one_one),
                 "+r"(k.lo_off), "+r"(k.hi_mul), "+r"(k.hi_off));

    // the lane's W rows (past N: row N - 1, never written) from its first chunk's byte
    const unsigned char* wp[NT][2];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            wp[t][h] = q + (size_t)min(row0 + 16 * t + 8 * h + g, N - 1) * K + warp * CHUNK +
                       16 * c;
    const u16* xp = x + (size_t)min(g, M - 1) * K + warp * CHUNK + 16 * c;
    const size_t step = (size_t)WARPS * CHUNK;  // bytes (and inputs) from one chunk to the next

    u32 wr[PF + 1][NT][2][4];
    u32 xr[PF + 1][8];
    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
        acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

    // chunk i's words into slot s (the model's weights: no kernel writes them)
    auto load_w = [&](int s, int i) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                ldw(wr[s][t][h], wp[t][h] + i * step);
    };
#pragma unroll
    for (int s = 0; s < PF; ++s)
        if (s < mine)
            load_w(s, s);
#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");  // x is the kernel before's output
#endif
#pragma unroll
    for (int s = 0; s < PF; ++s)
        if (s < mine)
            ldx(xr[s], xp + s * step);
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif

    for (int i0 = 0; i0 < mine; i0 += PF + 1) {
#pragma unroll
        for (int s = 0; s <= PF; ++s) {
            const int i = i0 + s;
            if (i < mine) {
                const int f = (s + PF) % (PF + 1);  // the slot the previous step freed
                if (i + PF < mine) {
                    load_w(f, i + PF);
                    ldx(xr[f], xp + (i + PF) * step);
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {  // k-step j: bytes 4j.. of each lane's 16
                    const u32 b0 = xr[s][2 * j], b1 = xr[s][2 * j + 1];
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        u32 lg0, hg0, lq0, hq0, lg1, hg1, lq1, hq1;
                        pair<0x4140>(wr[s][t][0][j], k, lg0, hg0);  // row g, bytes 0, 1
                        pair<0x4140>(wr[s][t][1][j], k, lq0, hq0);  // row g + 8
                        pair<0x4342>(wr[s][t][0][j], k, lg1, hg1);  // bytes 2, 3
                        pair<0x4342>(wr[s][t][1][j], k, lq1, hq1);
                        mma(acc[t], lg0, lq0, lg1, lq1, b0, b1);
                        mma(acc[t], hg0, hq0, hg1, hq1, b0, b1);
                    }
                }
            }
        }
    }

    // d0, d1: (W row g, x rows 2c, 2c + 1); d2, d3: the same at W row g + 8
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        red[warp][t][g][2 * c] = acc[t][0];
        red[warp][t][g][2 * c + 1] = acc[t][1];
        red[warp][t][g + 8][2 * c] = acc[t][2];
        red[warp][t][g + 8][2 * c + 1] = acc[t][3];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < NT * 16 * 8; e += WARPS * 32) {
        const int t = e / 128, r = (e / 8) % 16, m = e % 8, row = row0 + 16 * t + r;
        if (m >= M || row >= N) continue;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w)
            v += red[w][t][r][m];
        y[(size_t)m * N + row] = to_bf16(v * scale[row]);
    }
}
