// The PTX instructions int4_rows.cu builds on, one inline function each (handed to NVRTC
// in memory beside cuda_mma.cuh): shared-memory addresses, cp.async and its groups,
// ldmatrix, programmatic dependent launches, L2 prefetches, and the bit operations of its
// decode. A CPU emulator of the kernel (tests/cuda_emu.hpp) that defines
// LLAMADIST_PTX_EMULATED brings its own of each, so that the kernel's source runs on a CPU
// as it is.
#pragma once
#include "cuda_mma.cuh"

#ifndef LLAMADIST_PTX_EMULATED
// the block's dynamic shared memory (the launch's size), as an array of type
#define SHARED_DYNAMIC(type, name) extern __shared__ __align__(16) type name[]

// p (a generic pointer into shared memory) as a shared-memory address
static __device__ __forceinline__ u32 smem(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously, past the L1 (cg)
static __device__ __forceinline__ void cp_async_cg16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}

// BYTES (4, 8 or 16) global -> shared, asynchronously, through the L1 (ca)
template <int BYTES>
static __device__ __forceinline__ void cp_async_ca(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(dst), "l"(src), "n"(BYTES)
                 : "memory");
}

// the lane's cp.async issued since the last commit: one group
static __device__ __forceinline__ void commit_group() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// until at most N of the lane's latest groups are still in flight
template <int N>
static __device__ __forceinline__ void wait_group() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

static __device__ __forceinline__ void wait_all() {
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// a programmatic dependent launch: until the kernel before has ended, its writes visible
static __device__ __forceinline__ void grid_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

// the kernel after this one may be launched (it waits for this one's end)
static __device__ __forceinline__ void launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// sm_90: BYTES (a multiple of 16) of global memory from p (16-byte aligned) into the L2,
// no copy anywhere else and nothing to wait for (a hint the memory system may drop)
static __device__ __forceinline__ void prefetch_l2_bulk(const void* p, u32 bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
}

// the line of global memory holding p into the L2 (a hint, as prefetch_l2_bulk)
static __device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

// four 8 x 8 matrices of b16 from shared memory: lanes 8 q .. 8 q + 7 give matrix q's row
// addresses (16 bytes each: addr), lane T gets row T / 4, columns 2 (T % 4), + 1 of each
static __device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// words read once from global memory into registers: not kept in the L1, not written by
// the kernel (the non-coherent path)
static __device__ __forceinline__ u32 ld_nc(const u32* p) {
    u32 r;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

static __device__ __forceinline__ void ld_nc_v2(u32 (&r)[2], const u32* p) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "l"(p));
}

static __device__ __forceinline__ void ld_nc_v4(u32 (&r)[4], const u32* p) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

static __device__ __forceinline__ float bits_float(u32 v) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(v));
    return f;
}

// (v & 0x000F000F) | magic: one LOP3, the mask its immediate
static __device__ __forceinline__ u32 nibbles_or(u32 v, u32 magic) {
    u32 r;
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(r) : "r"(v), "r"(magic));
    return r;
}

// a * b + c on two bf16 halves, rounded to nearest even
static __device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    asm("fma.rn.bf16x2 %0, %0, %1, %2;" : "+r"(a) : "r"(b), "r"(c));
    return a;
}

static __device__ __forceinline__ u32 mul_hi(u32 a, u32 b) {
    u32 r;
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
#endif  // LLAMADIST_PTX_EMULATED
