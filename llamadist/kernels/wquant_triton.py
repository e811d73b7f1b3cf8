"""Triton kernels for weight-only quantized linears (formats of llamadist.kernels.wquant).

One kernel, y (M, N) = x (M, K) @ W^T + bias, W read as its codes and dequantized in
registers (float32 scale and offset math), accumulated in float32:

* GEMV (M <= GEMV_MAX_M, decode): each program owns BLOCK_N output channels and walks K,
  multiplying and reducing in registers (no tensor cores: the step is bound by reading W).
* GEMM (larger M: big decode batches, prefill): BLOCK_M x BLOCK_N tiles through
  ``tl.dot`` on the dequantized W tile in x's dtype.

int4 bytes hold inputs 2j and 2j + 1, so each step loads BLOCK_K bytes once and meets the
low nibbles with x's even inputs and the high ones with the odd inputs (two half-width
products, no shuffles). int8 and fp8 with one scale per output channel multiply the raw
codes (exact in bf16 / fp16) and scale the accumulator once at the end; grouped int8 and
int4 scale every weight. fp8 e4m3 bits decode with integer arithmetic (exact, no float
subnormals), so the same code runs on any GPU Triton supports and in Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors), where the tests check it.

No host synchronisation and shapes fixed by the tensors: the launch is captured inside the
CUDA-graph decode path like any kernel. ``packed_linear`` is also registered as the torch
custom op ``llamadist::packed_linear`` (opaque to torch.compile).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the dequantizing fallback of kernels.wquant serves
    triton = None

KIND_IDS = {"int8": 0, "int4": 1, "fp8": 2}
GEMV_MAX_M = 4  # rows at most through the GEMV; more go through tl.dot tiles


if triton is not None:
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


def _blocks(m: int, kind: str) -> tuple[bool, int, int, int, int]:
    """(dot, BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M rows. BLOCK_K counts bytes of W
    per row per step (int4: twice as many inputs)."""
    if m <= GEMV_MAX_M:
        bm = 1 if m == 1 else (2 if m == 2 else 4)
        bk = 128 if bm > 1 else 256
        return False, bm, 16, bk // 2 if kind == "int4" else bk, 4
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 64 if bm <= 64 else 128
    return True, bm, bn, 32 if kind == "int4" else 64, 4 if bm <= 64 else 8


def launch(x: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor,
           offset: torch.Tensor | None, bias: torch.Tensor | None, group: int,
           n: int, k: int) -> torch.Tensor:
    """y (..., N) = x (..., K) @ W^T + bias with W given by its packed tensors."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    dot, bm, bn, bk, warps = _blocks(m, kind)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    per_row = scale.shape[1] == 1 and kind != "int4"
    _wq_kernel[grid](x2, q, scale, offset if offset is not None else scale,
                     bias if bias is not None else scale, y, m, n, k,
                     x2.stride(0), q.stride(0), scale.stride(0), y.stride(0),
                     GROUP=group, KIND=KIND_IDS[kind], PER_ROW=per_row,
                     HAS_BIAS=bias is not None, DOT=dot, IEEE=x.dtype == torch.float32,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y.view(*x.shape[:-1], n)


def _op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
        bias: torch.Tensor | None, kind: int, group: int, n: int, k: int) -> torch.Tensor:
    return launch(x, list(KIND_IDS)[kind], q, scale, offset, bias, group, n, k)


def _op_shape(x, q, scale, offset, bias, kind, group, n, k):
    return x.new_empty(*x.shape[:-1], n)


packed_linear_op = None
if triton is not None and hasattr(torch.library, "custom_op"):
    packed_linear_op = torch.library.custom_op("llamadist::packed_linear", _op,
                                               mutates_args=())
    packed_linear_op.register_fake(_op_shape)


def packed_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for a kernels.wquant.PackedWeight ``w`` on x's device."""
    call = packed_linear_op or _op
    return call(x, w.q, w.scale, w.offset, bias, KIND_IDS[w.kind], w.group,
                w.shape[0], w.shape[1])
