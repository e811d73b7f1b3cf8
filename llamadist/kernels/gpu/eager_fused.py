"""The Triton code of llamadist.kernels.eager_fused (see its docstring): residual add +
RMSNorm, SiLU(gate) * up, and rotate-half RoPE of q and k, each one kernel that reproduces
the eager PyTorch formula's roundings (float32 arithmetic, a cast to the activation dtype
wherever the eager formula's separate kernels store a tensor). Imported only through
llamadist.kernels.gpu.load, on the first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from llamadist.kernels.gpu import interpreted
from llamadist.kernels.gpu.dependent import dependent, enter


@triton.jit
def _add_rms_norm_kernel(X, R, S, Y, W, sx, sr, ss, sy, D, eps,
                         BLOCK: tl.constexpr, HAS_R: tl.constexpr, PDL: tl.constexpr):
    # One program per row: s = x + r (stored: the new residual stream), then
    # y = w * (s32 * rsqrt(mean(s32^2) + eps)).to(dtype), as RMSNorm.forward.
    enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    keep = offs < D
    x = tl.load(X + row * sx + offs, mask=keep, other=0.0)
    if HAS_R:
        r = tl.load(R + row * sr + offs, mask=keep, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * ss + offs, x, mask=keep)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=0) / D
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=keep, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(Y + row * sy + offs, y.to(Y.dtype.element_ty), mask=keep)


@triton.jit
def silu_times(gate, up, dt, PRECISE: tl.constexpr):
    """silu(gate).to(dt) * up in dt, as F.silu(gate) * up rounds it (gate, up: values of
    dtype dt; each op in float32). PRECISE (compiled): CUDA's expf and a rounded
    division, as PyTorch's silu kernel; tl.exp and "/" are approximate there (fp16
    outputs 2 ulps off, seen on the H200). The interpreter has no libdevice, and its
    numpy exp is accurate already."""
    gate = gate.to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    act = tl.math.div_rn(gate, 1.0 + e).to(dt)
    return (act.to(tl.float32) * up.to(tl.float32)).to(dt)


@triton.jit
def _silu_mul_kernel(GU, OUT, sg, so, F, BLOCK: tl.constexpr, PRECISE: tl.constexpr,
                     PDL: tl.constexpr):
    # Program (row, block of F columns): out = silu(gate).to(dtype) * up, gate = GU[:, :F],
    # up = GU[:, F:], as F.silu(gate) * up (``silu_times``).
    enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < F
    gate = tl.load(GU + row * sg + cols, mask=keep, other=0.0)
    up = tl.load(GU + row * sg + F + cols, mask=keep, other=0.0)
    out = silu_times(gate, up, OUT.dtype.element_ty, PRECISE)
    tl.store(OUT + row * so + cols, out, mask=keep)


@triton.jit
def _rotate_heads(X, O, sx_n, sx_h, so_n, n, H, cos, sin, offs_d, partner, sign,
                  D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr):
    # The H heads of token n: o = x * cos + rotate_half(x) * sin, each product and the sum
    # rounded to x's dtype as the eager formula's three kernels do: bitwise the same, as
    # long as the compiler does not contract a product and the sum into one FMA (it did,
    # in bf16 too: hundreds to thousands of ulps where the sum cancels, on the H200): the launch
    # turns that off (enable_fp_fusion=False).
    offs_h = tl.arange(0, H_PAD)
    keep = (offs_h < H)[:, None] & (offs_d < D)[None, :]
    rows = X + n * sx_n + offs_h[:, None] * sx_h
    x = tl.load(rows + offs_d[None, :], mask=keep, other=0.0)
    half = tl.load(rows + partner[None, :], mask=keep, other=0.0).to(tl.float32) * sign[None, :]
    dt = O.dtype.element_ty
    a = (x.to(tl.float32) * cos[None, :]).to(dt)
    b = (half * sin[None, :]).to(dt)
    out = a.to(tl.float32) + b.to(tl.float32)
    tl.store(O + n * so_n + offs_h[:, None] * D + offs_d[None, :], out.to(dt), mask=keep)


@triton.jit
def _rope_kernel(Q, K, QO, KO, CS, SN, sq_n, sq_h, sk_n, sk_h, sc_n, H, H_KV,
                 D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
                 HKV_PAD: tl.constexpr, PDL: tl.constexpr):
    # One program per token: its q heads and its k heads, cos/sin read once.
    enter(PDL)
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    half_d = D // 2
    # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
    partner = tl.where(offs_d < half_d, offs_d + half_d, offs_d - half_d)
    sign = tl.where(offs_d < half_d, -1.0, 1.0)
    cos = tl.load(CS + n * sc_n + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(SN + n * sc_n + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, sq_n, sq_h, H * D, n, H, cos, sin, offs_d, partner, sign,
                  D, H_PAD, D_PAD)
    _rotate_heads(K, KO, sk_n, sk_h, H_KV * D, n, H_KV, cos, sin, offs_d, partner, sign,
                  D, HKV_PAD, D_PAD)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) as (N, D) with a contiguous last dimension (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The front module's add_rms_norm (llamadist.kernels.eager_fused)."""
    if residual is not None and residual.dtype != x.dtype:  # the sum promotes: eager's add
        x = x + residual
        return x, add_rms_norm(x, None, weight, eps)[1]
    d = x.shape[-1]
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    s2 = torch.empty_like(x2) if residual is not None else x2
    y2 = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                     device=x.device)
    block = max(16, triton.next_power_of_2(d))
    if x2.shape[0]:
        dep = dependent(x.device)
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, s2, y2, weight, x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0),
            d, float(eps), BLOCK=block, HAS_R=residual is not None,
            num_warps=min(16, max(1, block // 512)), **dep)
    s = s2.view(x.shape) if residual is not None else x
    return s, y2.view(x.shape)


# Columns per program: 1024 (8 per thread of 4 warps: 16-byte bf16 loads), or 256 where
# that would leave most of an H200's 132 multiprocessors idle (decode: a few rows).
SILU_BLOCK, SILU_BLOCK_SMALL = 1024, 256


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The front module's silu_mul (llamadist.kernels.eager_fused)."""
    f = gate_up.shape[-1] // 2
    gu = _rows(gate_up)
    out = torch.empty(gu.shape[0], f, dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0] and f:
        block = SILU_BLOCK if gu.shape[0] * f >= 2 * 132 * SILU_BLOCK else SILU_BLOCK_SMALL
        block = min(block, max(16, triton.next_power_of_2(f)))
        dep = dependent(gu.device)
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(f, block))](
            gu, out, gu.stride(0), out.stride(0), f, BLOCK=block, PRECISE=not interpreted(),
            num_warps=max(1, min(4, block // 256)), **dep)
    return out.view(*gate_up.shape[:-1], f)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The front module's rope (llamadist.kernels.eager_fused)."""
    n, h, d = q.shape
    h_kv = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.reshape(n, d), sin.reshape(n, d)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty(n, h, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(n, h_kv, d, dtype=k.dtype, device=k.device)
    if n:
        d_pad = max(16, triton.next_power_of_2(d))
        h_pad = max(2, triton.next_power_of_2(h))
        dep = dependent(q.device)
        _rope_kernel[(n,)](
            q, k, qo, ko, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), h, h_kv, D=d, D_PAD=d_pad, H_PAD=h_pad,
            HKV_PAD=max(2, triton.next_power_of_2(h_kv)),
            num_warps=max(1, min(8, h_pad * d_pad // 1024)), enable_fp_fusion=False, **dep)
    return qo, ko
