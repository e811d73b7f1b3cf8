"""Split-KV ("flash-decoding") attention for one query token over a static KV cache.

The CUDA-graph decode step attends over the whole preallocated cache (static shapes),
and SDPA's kernels give one thread block per (sequence, KV head): at batch 1 the 8 KV
heads of Llama-3-8B keep 8 of an H100's 132 multiprocessors busy, and every step pays
for all ``max_seq_len`` slots whatever the live length. This kernel reads the live
length (``start + 1``) from the device, so a captured graph stays valid as the
sequence grows, splits those slots over ``SPLITS`` programs per (sequence, KV head),
and skips the slots not yet written; a second kernel merges the splits' partial
softmaxes. The G query heads that share a KV head are
the rows of one matrix product per tile, so each K/V tile is read once for all of them.

Registered as the custom op ``llamadist::decode_attention`` so that torch.compile keeps
it as one opaque call inside the compiled decoder layer.
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the SDPA path serves
    triton = None

BLOCK_N = 64  # KV slots per tile
MAX_SPLITS = 64
launches = 0  # calls that ran the kernel (captured graphs replay without calling again)


def usable(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel serves this call: CUDA, Triton present, a power-of-two head
    size tl.dot accepts, and no mask or an additive (B, 1, 1, S) one."""
    d = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dim() == 4
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and keys.dtype == q.dtype and 16 <= d <= 256 and d & (d - 1) == 0
            and (mask is None or (mask.is_floating_point() and mask.dim() == 4
                                  and mask.shape[1] == mask.shape[2] == 1
                                  and mask.stride(-1) == 1)))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(multiprocessors: int, rows: int, max_slots: int) -> int:
    """Programs per (sequence, KV head) for ``rows`` = B * H_kv of them over a cache of
    ``max_slots`` slots: about two per multiprocessor in all (``want`` rounded up), a power
    of two (the merge kernel's tile), never more than the cache has tiles (a split past
    the last tile would only read nothing) nor MAX_SPLITS."""
    want = -(-2 * multiprocessors // rows)
    tiles = -(-max_slots // BLOCK_N)
    up = 1 << math.ceil(math.log2(max(1, want)))   # smallest power of two >= want
    down = 1 << math.floor(math.log2(max(1, tiles)))  # largest power of two <= tiles
    return min(MAX_SPLITS, up, down)


if triton is not None:
    @triton.jit
    def _split_kernel(Q, K, V, Mask, Start, Cos, Sin, Acc, ML,
                      sq_b, sq_h, sq_g, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sc_b,
                      n_bh, H_KV, G, qk_scale,
                      D: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr,
                      SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, ROPE: tl.constexpr,
                      IEEE: tl.constexpr):
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

        row = (bh * SPLITS + split) * G + offs_g  # partials laid out (B*H_kv, SPLITS, G)
        keep = offs_g < G
        tl.store(Acc + row[:, None] * D + offs_d[None, :], acc, mask=keep[:, None])
        tl.store(ML + row, m_i, mask=keep)
        tl.store(ML + n_bh * SPLITS * G + row, l_i, mask=keep)


    @triton.jit
    def _merge_kernel(Acc, ML, Out, so_b, so_h, so_g, n_bh, H_KV, G,
                      D: tl.constexpr, SPLITS: tl.constexpr):
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


def _launch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor | None, start: torch.Tensor, cos: torch.Tensor | None,
            sin: torch.Tensor | None) -> torch.Tensor:
    global launches
    launches += 1
    b, h_kv, g, d = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode attention needs K/V with a contiguous last dimension")
    splits = num_splits(_multiprocessors(q.device.index or 0), b * h_kv, keys.shape[2])
    n_bh = b * h_kv
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
    _split_kernel[(n_bh, splits)](
        q, keys, values, q if mask is None else mask, start,
        cos if rope else q, sin if rope else q, acc, ml,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), sm_b,
        cos.stride(0) if rope and cos.shape[0] > 1 else 0,
        n_bh, h_kv, g, d ** -0.5 * 1.4426950408889634,
        D=d, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK=BLOCK_N, SPLITS=splits,
        HAS_MASK=mask is not None, ROPE=rope, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2)
    _merge_kernel[(n_bh * g,)](acc, ml, out, out.stride(0), out.stride(1), out.stride(2),
                               n_bh, h_kv, g, D=d, SPLITS=splits, num_warps=4)
    return out


if triton is not None:
    @torch.library.custom_op("llamadist::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             mask: torch.Tensor | None, start: torch.Tensor,
                             cos: torch.Tensor | None, sin: torch.Tensor | None
                             ) -> torch.Tensor:
        return _launch(q, keys, values, mask, start, cos, sin)

    @_decode_attention_op.register_fake
    def _(q, keys, values, mask, start, cos, sin):
        return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None, start: torch.Tensor,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """q (B, H_kv, G, D) against slots [0, start] of keys/values (B, H_kv, S, D), with
    an additive mask (B, 1, 1, S) or None -> (B, H_kv, G, D). With cos/sin (B, 1, 1, D),
    q is rotated (RoPE, rotate-half convention) in the kernel as it is loaded, which
    saves the separate elementwise kernel. Check ``usable`` first."""
    return torch.ops.llamadist.decode_attention(q, keys, values, mask, start, cos, sin)
