"""The Triton code of llamadist.kernels.wquant_triton (see its docstring): the GEMV, its
split-K sum and the GEMM kernels, and their launches. Imported only through
llamadist.kernels.gpu.load, on the first launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels import cuda_int8, wquant_triton
from llamadist.kernels.gpu import eager_fused, interpreted
from llamadist.kernels.gpu.dependent import dependent, enter
from llamadist.kernels.wquant_triton import (GEMV_MAX_M, KIND_IDS, GemvConfig, MmaConfig,
                                             _blocks, _x_operand, device_traits,
                                             gemv_config, tile_k)


# int8's bit decode on a GPU: a 32-bit word of four codes, its sign bits flipped once (q +
# 128, unsigned), then each byte permuted into the low byte of float32 2^23 (0x4B000000):
# one PRMT a code for the bits of 2^23 + 128 + q (Triton's own ops extract each byte and
# OR in the exponent, after LLVM packs the XOR across rows: ~5.6 SASS instructions a code
# in the deferred loop against ~4.1). The interpreter and ROCm (no PTX) compute the same
# bits with Triton's ops.
_PTX = tl.constexpr(not interpreted() and torch.version.hip is None)
_INT8_BITS = tl.constexpr(
    "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B000000, 0x7650; "
    "prmt.b32 $1, t, 0x4B000000, 0x7651; prmt.b32 $2, t, 0x4B000000, 0x7652; "
    "prmt.b32 $3, t, 0x4B000000, 0x7653; }")
# The biased decode (``_gemv_kernel``'s BIASED, ``wquant_triton.int8_biased``): each
# (flipped) byte into bits 8-15 of float32 2^15 (0x47000000): 2^15 + 128 + q, an integer
# kept as it is. With bf16 x (8 significant bits) each product with it is exact in float32
# (16 + 8 bits); the offset, 32 896 times x's sums, comes off each lane of the deferred
# sums once, after the loop: one PRMT and one FMA a code, no subtraction (the one-row
# loop: 212 SASS instructions a tile of 64 codes a thread against 262).
_INT8_BIASED = tl.constexpr(
    "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x47000000, 0x7604; "
    "prmt.b32 $1, t, 0x47000000, 0x7614; prmt.b32 $2, t, 0x47000000, 0x7624; "
    "prmt.b32 $3, t, 0x47000000, 0x7634; }")
INT8_BIAS = tl.constexpr(32896.0)  # 2^15 + 128


@triton.jit
def _e4m3_to_f32(b):
    """int32 tile of e4m3 bit patterns (0..255) -> float32 values (finite inputs)."""
    e = (b >> 3) & 0xF
    bits = ((b & 0x80) << 24) | ((tl.maximum(e, 1) + 120) << 23) | ((b & 0x7) << 20)
    v = bits.to(tl.float32, bitcast=True)  # subnormal e == 0 read as e == 1 ...
    sub = tl.where(e == 0, 0.015625, 0.0)  # ... minus the implicit one (2^-6)
    return tl.where((b & 0x80) != 0, v + sub, v - sub)


@triton.jit
def _wq_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K,
               stride_xm, stride_qn, stride_sn, stride_ym,
               GROUP: tl.constexpr, KIND: tl.constexpr, PER_ROW: tl.constexpr,
               HAS_BIAS: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + rm[:, None] * stride_xm
    q_rows = q_ptr + rn[:, None] * stride_qn
    s_rows = s_ptr + rn[:, None] * stride_sn
    if KIND == 1:  # int4: BLOCK_K bytes = 2 * BLOCK_K inputs per step
        kb = (K + 1) // 2
        for b0 in range(0, kb, BLOCK_K):
            rb = b0 + tl.arange(0, BLOCK_K)
            ke = 2 * rb
            w_ok = n_ok[:, None] & (rb < kb)[None, :]  # past the row: no scale read
            byte = tl.load(q_rows + rb[None, :], mask=w_ok, other=0).to(tl.int32)
            gi = ke[None, :] // GROUP                                  # (BN, BK) bytes
            sc = tl.load(s_rows + gi, mask=w_ok, other=0.0).to(tl.float32)
            off = tl.load(o_ptr + rn[:, None] * stride_sn + gi, mask=w_ok,
                          other=0.0).to(tl.float32)
            w_lo = (byte & 0xF).to(tl.float32) * sc + off
            w_hi = (byte >> 4).to(tl.float32) * sc + off
            x_e = tl.load(x_rows + ke[None, :], mask=m_ok[:, None] & (ke < K)[None, :],
                          other=0.0)                                   # (BM, BK)
            x_o = tl.load(x_rows + ke[None, :] + 1,
                          mask=m_ok[:, None] & (ke + 1 < K)[None, :], other=0.0)
            if DOT:
                t = x_e.dtype
                if IEEE:
                    acc += tl.dot(x_e, tl.trans(w_lo.to(t)), input_precision="ieee")
                    acc += tl.dot(x_o, tl.trans(w_hi.to(t)), input_precision="ieee")
                else:
                    acc += tl.dot(x_e, tl.trans(w_lo.to(t)))
                    acc += tl.dot(x_o, tl.trans(w_hi.to(t)))
            else:
                acc += tl.sum(x_e.to(tl.float32)[:, None, :] * w_lo[None, :, :], axis=2)
                acc += tl.sum(x_o.to(tl.float32)[:, None, :] * w_hi[None, :, :], axis=2)
    else:  # int8 / fp8: BLOCK_K inputs per step
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w_ok = n_ok[:, None] & k_ok[None, :]
            raw = tl.load(q_rows + rk[None, :], mask=w_ok, other=0)
            if KIND == 0:
                w = raw.to(tl.float32)
            else:
                w = _e4m3_to_f32(raw.to(tl.int32))
            if not PER_ROW:
                gi = rk[None, :] // GROUP
                w = w * tl.load(s_rows + gi, mask=w_ok, other=0.0).to(tl.float32)
            x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT:
                if IEEE:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if PER_ROW:
        acc = acc * tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _x_pairs(w, XDT: tl.constexpr):
    """Words holding (x[2j], x[2j + 1]) -> the two as float32 (XDT 0 bf16 / 1 fp16 in
    int32 words, 2 float32 in int64 words)."""
    if XDT == 0:
        return (w << 16).to(tl.float32, bitcast=True), \
            (w & -65536).to(tl.float32, bitcast=True)
    elif XDT == 1:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return w.to(tl.int32).to(tl.float32, bitcast=True), \
            (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _decode(raw, KIND: tl.constexpr, NATIVE: tl.constexpr, BIASED: tl.constexpr = False):
    """(BN, BK) uint8 codes of int8 (two's complement bits) or fp8 -> float32 values
    (NATIVE: the hardware's int8 / float8e4nv conversion; BIASED, int8: q + INT8_BIAS)."""
    if NATIVE:
        if KIND == 2:
            return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return raw.to(tl.int8, bitcast=True).to(tl.float32)
    if KIND == 0 and BIASED:  # 2^15 + 128 + q
        if _PTX:
            bits = tl.inline_asm_elementwise(_INT8_BIASED, "=r,=r,=r,=r,r", [raw],
                                             dtype=tl.int32, is_pure=True, pack=4)
        else:
            bits = ((raw.to(tl.int32) ^ 0x80) << 8) | 0x47000000
        return bits.to(tl.float32, bitcast=True)
    if KIND == 0:  # 2^23 + 128 + q, minus 2^23 + 128: q exactly
        if _PTX:  # four codes a word (their bytes in element order)
            bits = tl.inline_asm_elementwise(_INT8_BITS, "=r,=r,=r,=r,r", [raw],
                                             dtype=tl.int32, is_pure=True, pack=4)
        else:
            bits = (raw.to(tl.int32) ^ 0x80) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388736.0
    u = raw.to(tl.int32)  # zero-extended byte
    bits = ((u & 0x80) << 24) | ((u & 0x7F) << 20)  # e4m3 * 2^-120 (float32 subnormals
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # too) * 2^120


@triton.jit
def _gemv_codes(q_rows, b0, b_hi, n_ok, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BN, BK) code bytes [b0, b0 + BK) of the rows (zeros past b_hi). EVEN_K:
    a tile is wholly in or out, so the mask is one bool along K and loads stay wide."""
    rb = b0 + tl.arange(0, BLOCK_K)
    if EVEN_K:  # (a splat tensor: the interpreter's & refuses a scalar bool)
        in_k = tl.zeros((1, BLOCK_K), dtype=tl.int32) + b0 < b_hi
        return tl.load(q_rows + rb[None, :], mask=n_ok[:, None] & in_k, other=0)
    return tl.load(q_rows + rb[None, :], mask=n_ok[:, None] & (rb < b_hi)[None, :],
                   other=0)


@triton.jit
def _gemv_scales(s_ptr, o_ptr, rn, stride_sn, b0, b_hi, n_ok, GROUP_B: tl.constexpr,
                 KIND: tl.constexpr, GROUPED: tl.constexpr):
    """(scale, offset) (BN,) float32 of the group holding byte b0 (zeros if not
    GROUPED; offset zeros but for int4)."""
    sc = tl.zeros(n_ok.shape, dtype=tl.float32)
    off = tl.zeros(n_ok.shape, dtype=tl.float32)
    if GROUPED:
        ok = n_ok & (tl.zeros(n_ok.shape, dtype=tl.int32) + b0 < b_hi)  # (as above)
        g = b0 // GROUP_B
        sc = tl.load(s_ptr + rn * stride_sn + g, mask=ok, other=0.0).to(tl.float32)
        if KIND == 1:
            off = tl.load(o_ptr + rn * stride_sn + g, mask=ok, other=0.0).to(tl.float32)
    return sc, off


@triton.jit
def _decode_tile(raw, sc, off, KIND: tl.constexpr, NATIVE: tl.constexpr,
                 GROUP_SUMS: tl.constexpr, BIASED: tl.constexpr):
    """A (BN, BK) tile of code bytes -> float32 tiles (w_a, w_b): int4 the low and high
    nibbles' f = 1 + c / 16 exactly (c in float32's top mantissa bits: a shift and a
    mask, no conversion), and unless GROUP_SUMS their weights c s + o in one FMA each,
    w = 16 s f + (o - 16 s), within ~2^-19 s of w (the tests' float32 bound is ~1e-4 s
    |x| a weight); int8 / fp8 the unscaled values (w, w) (BIASED int8: q + INT8_BIAS)."""
    if KIND == 1:
        u = raw.to(tl.int32)
        f_lo = (((u << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        f_hi = (((u << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        if GROUP_SUMS:
            return f_lo, f_hi
        a = (16.0 * sc)[:, None]
        b = (off - 16.0 * sc)[:, None]
        return f_lo * a + b, f_hi * a + b
    w = _decode(raw, KIND, NATIVE, BIASED)
    return w, w


@triton.jit
def _x_run(x_row, rb, b_hi, EVEN_K: tl.constexpr):
    """x_row[rb] as a 1-D load, zeros past b_hi (EVEN_K: a tile is wholly in, no mask)."""
    if EVEN_K:
        return tl.load(x_row + rb)
    return tl.load(x_row + rb, mask=rb < b_hi, other=0)


@triton.jit
def _x_pair_row(x_row, rb, b_hi, EVEN_K: tl.constexpr, XDT: tl.constexpr):
    """int4's row of x for the tile's bytes rb: (x[2j], x[2j + 1]) as float32 (BK,) each,
    from pair words (x[2j] meets byte j's low nibble, x[2j + 1] its high one)."""
    return _x_pairs(_x_run(x_row, rb, b_hi, EVEN_K), XDT)


@triton.jit
def _tile_prod(w_a, w_b, x_row, rb, b_hi, KIND: tl.constexpr, EVEN_K: tl.constexpr,
               XDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile's (BN, BK) products of its weights (decoded, int4 scaled) with one row of
    x. int8 / fp8: x's pointers broadcast to the tile's shape, so that x loads in the
    tile's own layout (a 1-D load would reach the threads through shared memory and a
    barrier each step)."""
    if KIND == 1:
        x_e, x_o = _x_pair_row(x_row, rb, b_hi, EVEN_K, XDT)
        return w_a * x_e[None, :] + w_b * x_o[None, :]
    xp = tl.broadcast_to((x_row + rb)[None, :], (BLOCK_N, BLOCK_K))
    if EVEN_K:
        x = tl.load(xp).to(tl.float32)
    else:
        x = tl.load(xp, mask=(rb < b_hi)[None, :], other=0.0).to(tl.float32)
    return w_a * x


@triton.jit
def _tile_part(w_a, w_b, sc, off, x_row, rb, b_hi, KIND: tl.constexpr,
               GROUPED: tl.constexpr, GROUP_SUMS: tl.constexpr, EVEN_K: tl.constexpr,
               XDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN,) sums over the tile of its weights times one row of x (bytes rb); grouped
    int8 / fp8 scale the group's sum once, and so does int4 with GROUP_SUMS: sum w x =
    16 s sum(f x) + (o - 16 s) sum(x), f = 1 + c / 16 (a FMA a weight, two row sums
    and the tile's sum of x; both terms are ~16 s sum|x|, so float32 keeps ~2^-20 s
    sum|x| of the tile's part). Without it int4 is scaled per weight."""
    if KIND == 1 and GROUP_SUMS:  # two sums: each a chain of FMAs (one would add a product)
        x_e, x_o = _x_pair_row(x_row, rb, b_hi, EVEN_K, XDT)
        fx = tl.sum(w_a * x_e[None, :], axis=1) + tl.sum(w_b * x_o[None, :], axis=1)
        xs = tl.sum(x_e + x_o, axis=0)
        return fx * (16.0 * sc) + xs * (off - 16.0 * sc)
    part = tl.sum(_tile_prod(w_a, w_b, x_row, rb, b_hi, KIND, EVEN_K, XDT, BLOCK_N, BLOCK_K),
                  axis=1)
    if GROUPED and KIND != 1:  # the group's sum, scaled once
        part = part * sc
    return part


@triton.jit
def _acc_add(acc0, acc1, acc2, acc3, part, M_IDX: tl.constexpr):
    """Add ``part`` to row M_IDX's accumulator (four named ones: M <= GEMV_MAX_M; (BN,)
    sums, or DEFER's (BN, BK) tiles)."""
    if M_IDX == 0:
        acc0 += part
    elif M_IDX == 1:
        acc1 += part
    elif M_IDX == 2:
        acc2 += part
    else:
        acc3 += part
    return acc0, acc1, acc2, acc3


@triton.jit
def _l2_prefetch(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs`` (PTX ``prefetch.global.L2``: no registers
    wait for them, nothing is read back)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv_tile(q_rows, s_ptr, o_ptr, rn, stride_sn, b0, b_hi, n_ok, GROUP_B: tl.constexpr,
               KIND: tl.constexpr, TILE_G: tl.constexpr, EVEN_K: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """A GEMV tile's loads: its (BN, BK) codes from byte b0 and, TILE_G, its group's
    (scale, offset) (_gemv_codes, _gemv_scales)."""
    codes = _gemv_codes(q_rows, b0, b_hi, n_ok, EVEN_K, BLOCK_K)
    sc, off = _gemv_scales(s_ptr, o_ptr, rn, stride_sn, b0, b_hi, n_ok, GROUP_B, KIND, TILE_G)
    return codes, sc, off


@triton.jit
def _gemv_step(raw, sc, off, b0, b_hi, d0, d1, d2, d3, xs, acc0, acc1, acc2, acc3, x_ptr,
               stride_xm,
               s_ptr, rn, stride_sn, n_ok, GROUP_B: tl.constexpr, KIND: tl.constexpr,
               GROUPED: tl.constexpr, GROUP_SUMS: tl.constexpr, NATIVE: tl.constexpr,
               DEFER: tl.constexpr, WIDE_G: tl.constexpr, ROWS: tl.constexpr,
               EVEN_K: tl.constexpr, XDT: tl.constexpr, BIASED: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the GEMV's loop (codes ``raw`` from byte b0, its group's sc, off) into
    the rows' sums: DEFER's tiles d0..d3 (BIASED: and x's (BK,) sums xs), or acc0..acc3
    (see _gemv_kernel)."""
    rb = b0 + tl.arange(0, BLOCK_K)
    SUB: tl.constexpr = 16 if GROUP_B >= 16 else GROUP_B  # WIDE_G: inputs a partial sum
    w_a, w_b = _decode_tile(raw, sc, off, KIND, NATIVE, GROUP_SUMS, BIASED)
    if DEFER:
        if WIDE_G:  # the tile spans NG groups: sums of SUB products (within a
            NG: tl.constexpr = BLOCK_K // GROUP_B  # thread), each times its scale
            gi = b0 // GROUP_B + tl.arange(0, NG)
            sc2 = tl.load(s_ptr + rn[:, None] * stride_sn + gi[None, :],
                          mask=n_ok[:, None] & (gi * GROUP_B < b_hi)[None, :],
                          other=0.0).to(tl.float32)
        elif GROUPED and KIND != 1:  # the group's scale (int4's weights carry theirs)
            w_a = w_a * sc[:, None]
        for m in tl.static_range(ROWS):
            part = _tile_prod(w_a, w_b, x_ptr + m * stride_xm, rb, b_hi, KIND, EVEN_K, XDT,
                              BLOCK_N, BLOCK_K)
            if WIDE_G:
                part = tl.sum(tl.reshape(part, (BLOCK_N, BLOCK_K // SUB, SUB)), axis=2)
                part = tl.reshape(tl.reshape(part, (BLOCK_N, NG, GROUP_B // SUB))
                                  * sc2[:, :, None], (BLOCK_N, BLOCK_K // SUB))
            d0, d1, d2, d3 = _acc_add(d0, d1, d2, d3, part, m)
        if BIASED:  # (one row) x's own sums, a 1-D load of its own
            xs += _x_run(x_ptr, rb, b_hi, EVEN_K).to(tl.float32)
    else:
        for m in tl.static_range(ROWS):
            part = _tile_part(w_a, w_b, sc, off, x_ptr + m * stride_xm, rb, b_hi, KIND,
                              GROUPED, GROUP_SUMS, EVEN_K, XDT, BLOCK_N, BLOCK_K)
            acc0, acc1, acc2, acc3 = _acc_add(acc0, acc1, acc2, acc3, part, m)
    return d0, d1, d2, d3, xs, acc0, acc1, acc2, acc3


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, KB, K, N, KS,
                 stride_xm, stride_qn, stride_sn, stride_ym,
                 GROUP_B: tl.constexpr, KIND: tl.constexpr, GROUPED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, PARTIAL: tl.constexpr,
                 EVEN_K: tl.constexpr, XDT: tl.constexpr, NATIVE: tl.constexpr,
                 GROUP_SUMS: tl.constexpr, PREFETCH: tl.constexpr, DEFER: tl.constexpr,
                 WIDE_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr, EARLY: tl.constexpr, FIRST: tl.constexpr,
                 GLU: tl.constexpr = False, PRECISE: tl.constexpr = False,
                 BIASED: tl.constexpr = False):
    """y rows 0..ROWS-1 (or, PARTIAL, float32 partials (splits, ROWS, N) at y_ptr) over
    codes bytes [pid_k * KS, +KS) of each row. KB bytes a row (int4: K inputs, x read as
    KB pair words); GROUP_B bytes per scale group, a multiple of BLOCK_K (WIDE_G: a
    divisor). PREFETCH (0, 1, 2): tiles whose codes and scales are loaded ahead of the one being reduced
    (Triton does not pipeline a loop without tl.dot; ptxas issues a prefetch only once
    the registers it lands in are free, late in the step: with 1 it barely overlaps,
    with 2 a whole step's work covers each tile's HBM latency). DEFER (no int4 group
    sums): each row's tile products accumulate elementwise in a (BN, BK) float32 tile of
    its own, reduced along K once after the loop instead of after every tile (no shuffles
    in the loop; ROWS tiles of registers). WIDE_G (DEFER, grouped int8 / fp8): a tile
    spans BLOCK_K / GROUP_B groups: each run of SUB (16) products of one group is summed
    (within a thread), times the group's scale, into a (BN, BK / SUB) tile of sums (the
    narrow tiles of one group each cost more). PDL: a dependent launch (gpu.dependent);
    there, the first EARLY bytes of each of the program's rows of codes are asked into L2
    before it waits for the kernel before (the model's weights: no kernel writes them), so
    HBM may stream them while that one still runs (``wquant_triton.L2_EARLY``). FIRST: the
    loads the loop starts with (its first tile of codes and scales; PREFETCH's tiles) are
    issued before that wait, into registers, x's only after it (``wquant_triton.
    first_early``; without PDL the same loads in the same order; PREFETCH 0's first tile
    is peeled off the loop: handed to its first step, it stays live through the loop).
    GLU (no PARTIAL, no bias): W is a gate | up product of N = 2F rows and y (ROWS, F) =
    silu(gate) * up: a program's BLOCK_N rows are BLOCK_N / 2 (gate, up) pairs, gate row j
    next to up row F + j, and it writes their BLOCK_N / 2 outputs, each value rounded to
    y's dtype where the separate silu * up kernel (eager_fused) would read or write it
    (the same bits as the two kernels; PRECISE: CUDA's expf and a rounded division, as
    that kernel compiled). BIASED (DEFER, one row of bf16 x, int8 with one scale a row):
    the codes decode to q + INT8_BIAS (_INT8_BIASED); x's own (BK,) sums xs accumulate
    beside the tile of sums, and each lane loses INT8_BIAS times its xs before the tile
    is reduced (each of a lane's KS / BK additions rounds by ~2^-9 |x| in units of a code:
    wquant_triton.int8_biased bounds the lane's length)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GLU:  # pairs: row 2i is gate row j, row 2i + 1 up row F + j (F = N / 2)
        i = tl.arange(0, BLOCK_N)
        pair = pid_n * (BLOCK_N // 2) + i // 2
        rn = pair + (i % 2) * (N // 2)
        n_ok = pair < N // 2
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
    q_rows = q_ptr + rn[:, None] * stride_qn
    b_lo = pid_k * KS
    b_hi = tl.minimum(b_lo + KS, KB)
    if PDL and EARLY > 0:  # the first EARLY bytes a row (past-N rows, the tail clamped)
        lines = q_ptr + tl.minimum(rn, N - 1)[:, None] * stride_qn
        at = tl.minimum(b_lo + tl.arange(0, EARLY // 128) * 128, b_hi - 1)
        _l2_prefetch(lines + at[None, :])
    if not FIRST:
        enter(PDL)
    TILE_G: tl.constexpr = GROUPED and not WIDE_G  # one scale a row a tile
    if FIRST or PREFETCH >= 1:  # the first tiles' codes (and scales) before the loop; FIRST:
        # also before the wait (no kernel writes W), and PREFETCH 0's first tile
        nxt, sc_n, off_n = _gemv_tile(q_rows, s_ptr, o_ptr, rn, stride_sn, b_lo, b_hi, n_ok,
                                      GROUP_B, KIND, TILE_G, EVEN_K, BLOCK_K)
    if PREFETCH == 2:
        nxt2, sc_n2, off_n2 = _gemv_tile(q_rows, s_ptr, o_ptr, rn, stride_sn, b_lo + BLOCK_K,
                                         b_hi, n_ok, GROUP_B, KIND, TILE_G, EVEN_K, BLOCK_K)
    if FIRST:
        enter(PDL)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    SUB: tl.constexpr = 16 if GROUP_B >= 16 else GROUP_B  # WIDE_G: inputs a partial sum
    if DEFER and WIDE_G:  # (statements: older Triton takes no conditional expression here)
        d0 = tl.zeros((BLOCK_N, BLOCK_K // SUB), dtype=tl.float32)
    elif DEFER:
        d0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        d0 = tl.zeros((1, 1), dtype=tl.float32)
    d1 = d0
    d2 = d0
    d3 = d0
    xs = tl.zeros((BLOCK_K if BIASED else 1,), dtype=tl.float32)
    sc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    off = tl.zeros((BLOCK_N,), dtype=tl.float32)
    lo = b_lo
    if FIRST and PREFETCH == 0:  # the first tile, loaded before the wait, peeled off
        d0, d1, d2, d3, xs, acc0, acc1, acc2, acc3 = _gemv_step(
            nxt, sc_n, off_n, b_lo, b_hi, d0, d1, d2, d3, xs, acc0, acc1, acc2, acc3, x_ptr,
            stride_xm, s_ptr, rn, stride_sn, n_ok, GROUP_B, KIND, GROUPED, GROUP_SUMS, NATIVE,
            DEFER, WIDE_G, ROWS, EVEN_K, XDT, BIASED, BLOCK_N, BLOCK_K)
        lo = b_lo + BLOCK_K
    for b0 in range(lo, b_hi, BLOCK_K):
        if PREFETCH == 2:  # issue the loads two tiles ahead, then work on this one
            raw, sc, off = nxt, sc_n, off_n
            nxt, sc_n, off_n = nxt2, sc_n2, off_n2
            nxt2, sc_n2, off_n2 = _gemv_tile(q_rows, s_ptr, o_ptr, rn, stride_sn,
                                             b0 + 2 * BLOCK_K, b_hi, n_ok, GROUP_B, KIND,
                                             TILE_G, EVEN_K, BLOCK_K)
        elif PREFETCH == 1:  # issue the next tile's loads, then work on this one
            raw, sc, off = nxt, sc_n, off_n
            nxt, sc_n, off_n = _gemv_tile(q_rows, s_ptr, o_ptr, rn, stride_sn, b0 + BLOCK_K,
                                          b_hi, n_ok, GROUP_B, KIND, TILE_G, EVEN_K, BLOCK_K)
        else:
            raw, sc, off = _gemv_tile(q_rows, s_ptr, o_ptr, rn, stride_sn, b0, b_hi, n_ok,
                                      GROUP_B, KIND, TILE_G, EVEN_K, BLOCK_K)
        d0, d1, d2, d3, xs, acc0, acc1, acc2, acc3 = _gemv_step(
            raw, sc, off, b0, b_hi, d0, d1, d2, d3, xs, acc0, acc1, acc2, acc3, x_ptr, stride_xm,
            s_ptr, rn, stride_sn, n_ok, GROUP_B, KIND, GROUPED, GROUP_SUMS, NATIVE, DEFER,
            WIDE_G, ROWS, EVEN_K, XDT, BIASED, BLOCK_N, BLOCK_K)
    if DEFER and BIASED:  # each lane's offset, 32 896 times its sum of x, off first
        acc0 = tl.sum(d0 - INT8_BIAS * xs[None, :], axis=1)
    elif DEFER:  # each row's tile reduced along K once
        acc0 = tl.sum(d0, axis=1)
        if ROWS > 1:
            acc1 = tl.sum(d1, axis=1)
        if ROWS > 2:
            acc2 = tl.sum(d2, axis=1)
        if ROWS > 3:
            acc3 = tl.sum(d3, axis=1)
    if not GROUPED:  # one scale a row, applied once
        sc = tl.load(s_ptr + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    for m in tl.static_range(ROWS):
        if m == 0:  # (statements, not a conditional expression: older Triton)
            acc = acc0
        elif m == 1:
            acc = acc1
        elif m == 2:
            acc = acc2
        else:
            acc = acc3
        if not GROUPED:
            acc = acc * sc
        if GLU:
            _glu_store(acc, y_ptr + m * stride_ym, pid_n, N // 2, PRECISE, BLOCK_N)
        elif PARTIAL:
            tl.store(y_ptr + (pid_k * ROWS + m) * N + rn, acc, mask=n_ok)
        else:
            if HAS_BIAS:
                acc = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _glu_store(acc, y_row, pid_n, F, PRECISE: tl.constexpr, BLOCK_N: tl.constexpr):
    """A GLU program's (BLOCK_N,) sums, (gate, up) pairs, -> silu(gate) * up at its
    BLOCK_N / 2 columns of one row of y, rounded as gate_up's output, then eager_fused's
    silu * up kernel, would round them."""
    dt = y_row.dtype.element_ty
    gate, up = tl.split(tl.reshape(acc.to(dt), (BLOCK_N // 2, 2)))
    cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_row + cols, eager_fused.silu_times(gate, up, dt, PRECISE), mask=cols < F)


@triton.jit
def _splitk_sum_kernel(p_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y[m] = sum over splits of the float32 partials (SPLIT, M, N), in split order."""
    enter(PDL)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1)
    ok = rn < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + (s * M + m) * N + rn, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tinygemm_dequant_kernel(p_ptr, sz_ptr, w_ptr, N, K, KT, GROUP: tl.constexpr,
                             TILES: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """W (N, K) in w's dtype from tinygemm's int4 layout (wquant_torch.tinygemm_pack, CUDA)
    and its (G, N, 2) (scale, zero) table: w = (c - 8) scale + zero. Word [n / 8, k / (16
    TILES), lane, w] holds in nibble j the code of n = 8 (n / 8) + lane / 4 and k = 16
    TILES (k / (16 TILES)) + 32 w + 2 (lane % 4) + 8 (j % 4) + j / 4 (measured on an H200
    from _convert_weight_to_int4pack of index patterns, torch 2.11; wquant_torch.
    tinygemm_layout packs by this rule and checks it against the op once a process).
    Each output tile is written in row order; its words are read eight times each, from L1."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rn < N)[:, None] & (rk < K)[None, :]
    n = rn[:, None]
    k = rk[None, :]
    r = k % 32
    lane = (n % 8) * 4 + (r % 8) // 2
    word = ((n // 8) * KT + k // (16 * TILES)) * (32 * (TILES // 2)) + lane * (TILES // 2) \
        + (k % (16 * TILES)) // 32
    j = r // 8 + 4 * (r % 2)
    code = (tl.load(p_ptr + word, mask=ok, other=0) >> (4 * j)) & 0xF
    at = ((k // GROUP) * N + n) * 2
    scale = tl.load(sz_ptr + at, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(sz_ptr + at + 1, mask=ok, other=0.0).to(tl.float32)
    w = (code.to(tl.float32) - 8.0) * scale + zero
    tl.store(w_ptr + n.to(tl.int64) * K + k, w.to(w_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nibble(words, sz, J: tl.constexpr, DT: tl.constexpr):
    """Weights of nibble J of each word, (c - 8) s + z in DT: c - 8 exactly as 2^23 + c
    read as float32 minus 2^23 + 8 (no int -> float unit); (s, z) of each word's group
    as one word of two bf16 (s low)."""
    c = (((words >> (4 * J)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    s = (sz << 16).to(tl.float32, bitcast=True)
    return (c * s + (sz & -65536).to(tl.float32, bitcast=True)).to(DT)


@triton.jit
def _mma_words(rows, sz_rows, kt, kt_hi, n_ok, KTILE: tl.constexpr, GROUP: tl.constexpr,
               N_STRIDE, g_of):
    """A k-tile's words (BLOCK_N, 2 TILES) and each word's (scale, zero) word (zeros past
    kt_hi: the prefetch past the last tile)."""
    ok = n_ok[:, None] & (tl.zeros_like(n_ok)[:, None] + kt < kt_hi)
    words = tl.load(rows + kt * KTILE, mask=ok, other=0)
    sz = tl.load(sz_rows + ((kt * KTILE + g_of) // GROUP)[None, :] * N_STRIDE, mask=ok,
                 other=0)
    return words, sz


@triton.jit
def _tinygemm_mma_kernel(x_ptr, p_ptr, sz_ptr, y_ptr, M, N, KT, KS, stride_xm, stride_ym,
                         GROUP: tl.constexpr, TILES: tl.constexpr, PREFETCH: tl.constexpr,
                         PARTIAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_M: tl.constexpr, PDL: tl.constexpr):
    """y^T (BLOCK_N, BLOCK_M) = W x^T over k-tiles [pid_k KS, +KS) of tinygemm's int4
    layout (the rule above) and its (G, N) table of (scale, zero) bf16 pairs read as one
    word, through tl.dot with W as the left operand (BLOCK_N >= 64 rows of W; x's few
    rows padded to BLOCK_M >= 16). A row's 16 TILES codes of a k-tile are its 2 TILES
    consecutive words (lane = 4 (n % 8) + l, word r = l TILES / 2 + w): each thread
    dequantizes whole words, their nibbles interleaved in registers to codes p = 8 r + j
    (nibble j), and x's tile (loaded in k's order, contiguous) is permuted to the same
    order, k = 32 w + 8 (j % 4) + 2 l + j / 4. PREFETCH: the next tile's words and table
    loaded into registers before this one is reduced (with num_stages 1: Triton's own
    pipelining stages them through shared memory in a layout whose reads conflict). PDL:
    a dependent launch (gpu.dependent)."""
    enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    KW: tl.constexpr = 2 * TILES               # words of a row in a k-tile
    KTILE: tl.constexpr = 16 * TILES           # its codes
    HALF: tl.constexpr = TILES // 2
    r = tl.arange(0, KW)
    rows = p_ptr + ((rn // 8) * KT * KTILE + (rn % 8) * KW)[:, None] + r[None, :]
    sz_rows = sz_ptr + rn[:, None]
    g_of = 32 * (r % HALF)                     # each word's first k in its k-tile
    xs = x_ptr + rm[None, :] * stride_xm + tl.arange(0, KTILE)[:, None]
    DT = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    kt_lo = pid_k * KS
    kt_hi = tl.minimum(kt_lo + KS, KT)
    if PREFETCH:
        words_n, sz_n = _mma_words(rows, sz_rows, kt_lo, kt_hi, n_ok, KTILE, GROUP, N, g_of)
    for kt in range(kt_lo, kt_hi):
        if PREFETCH:
            words, sz = words_n, sz_n
            words_n, sz_n = _mma_words(rows, sz_rows, kt + 1, kt_hi, n_ok, KTILE, GROUP, N,
                                       g_of)
        else:
            words, sz = _mma_words(rows, sz_rows, kt, kt_hi, n_ok, KTILE, GROUP, N, g_of)
        # nibble j of word r at p = 8 r + j: three interleaves, the nibbles bit-reversed
        w = tl.interleave(
            tl.interleave(tl.interleave(_nibble(words, sz, 0, DT), _nibble(words, sz, 4, DT)),
                          tl.interleave(_nibble(words, sz, 2, DT), _nibble(words, sz, 6, DT))),
            tl.interleave(tl.interleave(_nibble(words, sz, 1, DT), _nibble(words, sz, 5, DT)),
                          tl.interleave(_nibble(words, sz, 3, DT), _nibble(words, sz, 7, DT))))
        x = tl.load(xs + kt * KTILE, mask=m_ok[None, :], other=0.0)
        x = tl.reshape(tl.permute(tl.reshape(x, (HALF, 4, 4, 2, BLOCK_M)), (2, 0, 3, 1, 4)),
                       (KTILE, BLOCK_M))
        if IEEE:
            acc += tl.dot(w, x, input_precision="ieee")
        else:
            acc += tl.dot(w, x)
    if PARTIAL:
        out = y_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None]
    else:
        out = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def _sum_splits(partials: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y (M, N) = the sum of the float32 split-K partials (SPLIT, M, N) (+ bias)."""
    split, m, n = partials.shape
    blk = 1024
    _splitk_sum_kernel[(triton.cdiv(n, blk), m)](
        partials, bias if bias is not None else partials, y, m, n, y.stride(0), SPLIT=split,
        HAS_BIAS=bias is not None, BLOCK=blk, num_warps=4, **dependent(y.device))


def tinygemm_dequant(packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int,
                     group: int, tiles: int, dtype: torch.dtype) -> torch.Tensor:
    """W (N, K) in ``dtype`` from tinygemm's packed int4 and (G, N, 2) table."""
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    bn, bk = 32, 128
    _tinygemm_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        packed, scales_zeros, w, n, k, k // (16 * tiles), GROUP=group, TILES=tiles,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4, enable_fp_fusion=False)  # (c - 8) s, then + z:
    return w                                                # tinygemm's and the tests' roundings


def tinygemm_mma(x2: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
                 group: int, tiles: int, cfg: MmaConfig) -> torch.Tensor:
    """y (M, N) in x2's dtype = x2 (M, K) @ W^T, W in tinygemm's packed int4 and (G, N, 2)
    table (x2 contiguous; K a multiple of 16 tiles). ``cfg``: wquant_triton.mma_config."""
    m, k = x2.shape
    kt = k // (16 * tiles)
    # shapes only (no device reads: safe inside CUDA graphs); a wrong tile count or table
    # would read the words in another order and give wrong numbers without an error
    if (k % (16 * tiles) or k % group or n % 8 or x2.stride(1) != 1
            or tuple(packed.shape) != (n // 8, kt, 32, tiles // 2)
            or tuple(scales_zeros.shape) != (k // group, n, 2)):
        raise ValueError(f"tinygemm_mma: x {tuple(x2.shape)} (strides {x2.stride()}), packed "
                         f"{tuple(packed.shape)}, table {tuple(scales_zeros.shape)} do not "
                         f"match N={n}, group {group}, {tiles} inner k-tiles")
    if scales_zeros.dtype != torch.bfloat16:
        raise TypeError("tinygemm_mma reads a bfloat16 (scale, zero) table, not "
                        f"{scales_zeros.dtype}")
    ks = -(-kt // cfg.split)
    split = -(-kt // ks)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=y.device)
    extra = {} if cfg.stages is None else {"num_stages": cfg.stages}
    extra.update(dependent(y.device))
    _tinygemm_mma_kernel[(triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))](
        x2, packed, scales_zeros.view(torch.int32), out, m, n, kt, ks, x2.stride(0),
        y.stride(0), GROUP=group, TILES=tiles, PREFETCH=cfg.prefetch, PARTIAL=split > 1,
        IEEE=x2.dtype == torch.float32, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
        num_warps=cfg.warps, **extra)
    if split > 1:
        _sum_splits(out, None, y)
    return y


def _gemv_split(cfg: GemvConfig, kind: str, scale: torch.Tensor, group: int,
                k: int) -> tuple[int, int, int, int | None, bool, int]:
    """(split, bytes a K range, BLOCK_K, group bytes or None, WIDE_G, code bytes a row) of
    ``cfg``."""
    kb = wquant_triton.code_bytes(kind, k)
    grouped = scale.shape[1] > 1 or kind == "int4"
    group_b = (group // 2 if kind == "int4" else group) if grouped else None
    bk, wide = tile_k(cfg, kind, group_b)
    split = max(1, min(cfg.split, -(-kb // bk)))
    ks = -(-kb // (split * bk)) * bk            # bytes per K range, whole tiles
    return -(-kb // ks), ks, bk, group_b, wide, kb


def gemv(x2: torch.Tensor, y: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor,
         offset: torch.Tensor | None, bias: torch.Tensor | None, group: int, n: int, k: int,
         cfg: GemvConfig, glu: bool = False) -> None:
    """y (M, N) = x2 (M, K) @ W^T + bias through ``_gemv_kernel`` (M <= GEMV_MAX_M); glu:
    y (M, N / 2) = silu(gate) * up of that product (``glu_fits`` first)."""
    m = x2.shape[0]
    split, ks, bk, group_b, wide, kb = _gemv_split(cfg, kind, scale, group, k)
    grouped = group_b is not None
    xk, xdt = _x_operand(x2, kind, k)
    qv = q.view(torch.uint8) if kind == "int8" else q
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=y.device)
    extra = {} if cfg.stages is None else {"num_stages": cfg.stages}
    extra.update(dependent(y.device))
    early = wquant_triton.L2_EARLY
    if early and (early < 128 or early & (early - 1)):
        raise ValueError(f"wquant_triton.L2_EARLY is {early}: give 0 or a power of two >= 128")
    first = wquant_triton.first_early(kind, m, grouped, extra["PDL"])
    biased = (kind == "int8" and not cfg.native and not grouped and cfg.defer and m == 1
              and x2.dtype == torch.bfloat16 and wquant_triton.int8_biased(ks, bk))
    rows = n // 2 if glu else n  # GLU: a program's BLOCK_N rows are BLOCK_N / 2 outputs
    _gemv_kernel[(triton.cdiv(rows, cfg.block_n // 2 if glu else cfg.block_n), split)](
        xk, qv, scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, kb, k, n, ks,
        xk.stride(0), q.stride(0), scale.stride(0), y.stride(0),
        GROUP_B=group_b or 1, KIND=KIND_IDS[kind], GROUPED=grouped,
        HAS_BIAS=bias is not None, ROWS=m, PARTIAL=split > 1, EVEN_K=kb % bk == 0 and
        ks % bk == 0, XDT=xdt, NATIVE=cfg.native and kind != "int4",
        GROUP_SUMS=cfg.group_sums and kind == "int4", PREFETCH=cfg.prefetch,
        DEFER=cfg.defer and not (cfg.group_sums and kind == "int4"), WIDE_G=wide,
        BLOCK_N=cfg.block_n, BLOCK_K=bk, EARLY=early, FIRST=first, GLU=glu,
        PRECISE=glu and not interpreted(), BIASED=biased, num_warps=cfg.warps, **extra)
    if split > 1:
        _sum_splits(out, bias, y)


def _glu_cut(cfg: GemvConfig, m: int, kind: str, scale: torch.Tensor, group: int, n: int,
             k: int) -> bool:
    """Whether GLU runs ``cfg`` for m rows: int8 / fp8 GEMV rows, an even N, pairs a
    program (BLOCK_N >= 2), one K range (no split-K partials)."""
    return (0 < m <= GEMV_MAX_M and kind != "int4" and n % 2 == 0 and cfg.block_n >= 2
            and _gemv_split(cfg, kind, scale, group, k)[0] == 1)


def glu_fits(x2: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor, group: int,
             n: int, k: int) -> GemvConfig | None:
    """The GemvConfig with which ``_gemv_kernel`` writes silu(gate) * up of this gate | up
    product itself (GLU), or None where ``launch`` would not take the GEMV for these rows
    (int8_rows, the GEMM's tiles) or the rule's cut does not fit it (``_glu_cut``)."""
    m = x2.shape[0]
    if (not 0 < m <= GEMV_MAX_M
            or kind == "int8" and wquant_triton.int8_rows(m) and _int8_rows(x2, q, scale, n)):
        return None
    cfg = gemv_config(kind, m, n, k, group, *device_traits(x2.device))
    return cfg if _glu_cut(cfg, m, kind, scale, group, n, k) else None


def launch_glu(x: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor | None, group: int, n: int, k: int,
               config: GemvConfig | None = None) -> torch.Tensor:
    """llamadist.kernels.wquant_triton.launch_glu (the contract is there)."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if config is not None:
        if not _glu_cut(config, x2.shape[0], kind, scale, group, n, k):
            raise ValueError(f"launch_glu: {config.label()} does not fit {kind} "
                             f"({x2.shape[0]} rows, N {n}, K {k}): give one K range, "
                             f"BLOCK_N >= 2, an even N, 1-{GEMV_MAX_M} rows, int8 / fp8")
        cfg = config
    else:
        cfg = glu_fits(x2, kind, q, scale, group, n, k) if wquant_triton.GLU else None
    if cfg is None:  # the product, then the separate silu * up kernel
        return eager_fused.silu_mul(launch(x, kind, q, scale, offset, None, group, n, k))
    y = torch.empty(x2.shape[0], n // 2, dtype=x.dtype, device=x.device)
    gemv(x2, y, kind, q, scale, offset, None, group, n, k, cfg, glu=True)
    return y.view(*x.shape[:-1], n // 2)


def _int8_rows(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, n: int) -> bool:
    """Whether kernels.cuda_int8 takes this int8 call (its shapes, and it runs here)."""
    return cuda_int8.supports(x2, q, scale, n) and cuda_int8.ok(x2.device)


def launch(x: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor,
           offset: torch.Tensor | None, bias: torch.Tensor | None, group: int,
           n: int, k: int, config: GemvConfig | str | None = None) -> torch.Tensor:
    """llamadist.kernels.wquant_triton.launch (the contract is there)."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if (kind == "int8" and config is None and bias is None and wquant_triton.int8_rows(m)
            and _int8_rows(x2, q, scale, n)):  # the CUDA tensor-core rows (cuda_int8)
        return cuda_int8.launch(x2, q, scale, n).view(*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    if m <= GEMV_MAX_M and config not in ("v0", "dot") and not (kind == "int4" and group % 2):
        cfg = config or gemv_config(kind, m, n, k, group, *device_traits(x.device))
        gemv(x2, y, kind, q, scale, offset, bias, group, n, k, cfg)
        return y.view(*x.shape[:-1], n)
    dot, bm, bn, bk, warps = _blocks(GEMV_MAX_M + 1 if config == "dot" else m, kind)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    per_row = scale.shape[1] == 1 and kind != "int4"
    _wq_kernel[grid](x2, q, scale, offset if offset is not None else scale,
                     bias if bias is not None else scale, y, m, n, k,
                     x2.stride(0), q.stride(0), scale.stride(0), y.stride(0),
                     GROUP=group, KIND=KIND_IDS[kind], PER_ROW=per_row,
                     HAS_BIAS=bias is not None, DOT=dot, IEEE=x.dtype == torch.float32,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y.view(*x.shape[:-1], n)
