"""The Triton code of llamadist.kernels.decode_attention (see its docstring): the split
kernel over the static cache, the merge kernel, and their launch. Imported only through
llamadist.kernels.gpu.load, on the custom op's first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels.decode_attention import BLOCK_N, _multiprocessors, num_splits
from llamadist.kernels.gpu.dependent import dependent, enter


@triton.jit
def _split_kernel(Q, K, V, Mask, Start, Cos, Sin, Acc, ML, Out,
                  sq_b, sq_h, sq_g, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sc_b,
                  so_b, so_h, so_g, n_bh, H_KV, G, qk_scale,
                  D: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr,
                  SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, ROPE: tl.constexpr,
                  IEEE: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H_KV
    h = bh % H_KV
    length = tl.load(Start).to(tl.int32) + 1  # slots [0, start] hold tokens
    per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK)
    q_rows = Q + b * sq_b + h * sq_h + offs_g[:, None] * sq_g
    q = tl.load(q_rows + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    if ROPE:  # q * cos + rotate_half(q) * sin, rotate_half(q) = (-q[D/2:], q[:D/2])
        half = D // 2
        q_swap = tl.load(q_rows + ((offs_d + half) % D)[None, :], mask=offs_g[:, None] < G,
                         other=0.0).to(tl.float32)
        cos = tl.load(Cos + b * sc_b + offs_d).to(tl.float32)
        sin = tl.load(Sin + b * sc_b + offs_d).to(tl.float32)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        q = (q.to(tl.float32) * cos[None, :] + q_swap * (sign * sin)[None, :]).to(q.dtype)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + offs_n
        live = n < hi
        k = tl.load(k_base + n[:, None] * sk_s + offs_d[None, :], mask=live[:, None],
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # log2 domain: exp2(s) = e^(q.k / sqrt(D))
        if HAS_MASK:
            am = tl.load(Mask + b * sm_b + n, mask=live, other=0.0).to(tl.float32)
            s = s + am[None, :] * 1.4426950408889634
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * sv_s + offs_d[None, :], mask=live[:, None],
                    other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    keep = offs_g < G
    if SPLITS == 1:  # the whole cache in this program: the output itself, no merge
        out = acc / l_i[:, None]  # the merge's sums over one split, to the bit
        tl.store(Out + b * so_b + h * so_h + offs_g[:, None] * so_g + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=keep[:, None])
        return
    row = (bh * SPLITS + split) * G + offs_g  # partials laid out (B*H_kv, SPLITS, G)
    tl.store(Acc + row[:, None] * D + offs_d[None, :], acc, mask=keep[:, None])
    tl.store(ML + row, m_i, mask=keep)
    tl.store(ML + n_bh * SPLITS * G + row, l_i, mask=keep)


@triton.jit
def _merge_kernel(Acc, ML, Out, so_b, so_h, so_g, n_bh, H_KV, G,
                  D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    enter(PDL)
    pid = tl.program_id(0)
    g = pid % G
    bh = pid // G
    b = bh // H_KV
    h = bh % H_KV
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    row = (bh * SPLITS + offs_s) * G + g
    m_s = tl.load(ML + row)
    l_s = tl.load(ML + n_bh * SPLITS * G + row)
    m = tl.max(m_s, 0)
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m))
    acc = tl.load(Acc + row[:, None] * D + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(Out + b * so_b + h * so_h + g * so_g + offs_d, out.to(Out.dtype.element_ty))


def launch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           mask: torch.Tensor | None, start: torch.Tensor, cos: torch.Tensor | None,
           sin: torch.Tensor | None) -> torch.Tensor:
    """The op's body: decode_attention's contract (llamadist.kernels.decode_attention)."""
    b, h_kv, g, d = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode attention needs K/V with a contiguous last dimension")
    splits = num_splits(_multiprocessors(q.device.index or 0), b * h_kv, keys.shape[2])
    n_bh = b * h_kv
    # the splits' partials (one split: never written, the kernel writes out itself)
    acc = torch.empty(n_bh, splits, g, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(2, n_bh, splits, g, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h_kv, g, d, dtype=q.dtype, device=q.device)
    # Absent inputs are passed as q, never read (HAS_MASK / ROPE are False).
    # A mask or cos/sin of batch 1 broadcasts over the batch (row stride 0).
    sm_b = mask.stride(0) if mask is not None and mask.shape[0] > 1 else 0
    rope = cos is not None
    if rope:
        cos, sin = cos.reshape(cos.shape[0], d), sin.reshape(sin.shape[0], d)  # (B, D)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    dep = dependent(q.device)
    _split_kernel[(n_bh, splits)](
        q, keys, values, q if mask is None else mask, start,
        cos if rope else q, sin if rope else q, acc, ml, out,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), sm_b,
        cos.stride(0) if rope and cos.shape[0] > 1 else 0,
        out.stride(0), out.stride(1), out.stride(2),
        n_bh, h_kv, g, d ** -0.5 * 1.4426950408889634,
        D=d, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK=BLOCK_N, SPLITS=splits,
        HAS_MASK=mask is not None, ROPE=rope, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2, **dep)
    if splits == 1:  # the split kernel wrote the output
        return out
    _merge_kernel[(n_bh * g,)](acc, ml, out, out.stride(0), out.stride(1), out.stride(2),
                               n_bh, h_kv, g, D=d, SPLITS=splits, num_warps=4, **dep)
    return out
