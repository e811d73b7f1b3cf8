"""Partial attention with its log-sum-exp on CUDA, through PyTorch's fused kernels.

Context parallelism merges attention over disjoint key sets by their log-sum-exp
(llamadist.parallel.context), so it needs a kernel that returns (out, lse) without
materialising the scores. PyTorch's scaled-dot-product kernels do, behind private aten
ops whose schemas are the same in torch 2.11 and 2.13:

* ``aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
  return_debug_mask, *, scale)`` -> (out, logsumexp (B, H, T) fp32, ...): FlashAttention-2,
  fp16/bf16 only, no mask;
* ``aten._scaled_dot_product_efficient_attention(q, k, v, attn_bias, compute_log_sumexp,
  dropout_p, is_causal, *, scale)`` -> (out, logsumexp (B, H, ceil(T/32)*32) fp32, ...):
  the memory-efficient kernel, fp32 too, with an additive bias (rows 16-element aligned).

Both take q (B, H, T, D) and k/v (B, H, S, D) with the same head count (GQA is arranged
by the caller) and accumulate in fp32; ``is_causal`` is used only with T == S, where
top-left and bottom-right alignment agree. The lse is the natural log, as on the CPU.
Other inputs (fp64, a head size over 256 or not a multiple of 8) have no fused kernel:
``cuda_kernel`` says None and the caller takes the materialised fp32 reference.
"""

from __future__ import annotations

import torch

__all__ = ["cuda_kernel", "sdpa_lse", "aligned_bias", "kv_splits", "split_kv",
           "BIAS_ALIGN"]

_HALF = (torch.float16, torch.bfloat16)

# The memory-efficient kernel reads bias rows in 16-element vectors: a row stride that is
# not a multiple of 16 is refused (F.scaled_dot_product_attention pads the same way).
BIAS_ALIGN = 16


def cuda_kernel(dtype: torch.dtype, head_dim: int, biased: bool) -> str | None:
    """The fused kernel for q of ``dtype`` with ``head_dim``: "flash" (fp16/bf16, no bias),
    "efficient" (fp32, or a bias), None (no fused kernel: fp64, odd head sizes)."""
    if head_dim % 8 or head_dim > 256:
        return None
    if dtype in _HALF and not biased:
        return "flash"
    if dtype in _HALF or dtype == torch.float32:
        return "efficient"
    return None


def aligned_bias(bias: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """bias (B, T, S) additive -> a (B, heads, T, S) view in ``dtype`` whose rows start
    16-element aligned (the heads broadcast, stride 0)."""
    b, t, s = bias.shape
    store = torch.zeros(b, 1, t, -(-s // BIAS_ALIGN) * BIAS_ALIGN, dtype=dtype,
                        device=bias.device)
    store[..., :s] = bias.unsqueeze(1)
    return store[..., :s].expand(b, heads, t, s)


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             causal: bool = False, bias: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused CUDA call: q (B, H, T, D), k/v (B, H, S, D) of q's dtype, T, S > 0;
    causal only with T == S; bias (B, T, S) additive (finite somewhere in each row) or
    None -> out (B, H, T, D) in q's dtype, lse (B, H, T) fp32. A biased call with few
    query rows over many keys is split along the keys (``split_kv``)."""
    t, d = q.shape[-2:]
    if causal and (bias is not None or t != k.shape[-2]):
        raise ValueError("causal fused attention takes T == S and no bias")
    if cuda_kernel(q.dtype, d, bias is not None) is None:
        raise ValueError(f"no fused CUDA attention for {q.dtype} with head_dim {d}")
    if bias is not None:
        n = kv_splits(q.shape[0] * q.shape[1], t, k.shape[-2])
        if n > 1:
            return split_kv(q, k, v, scale, bias, n, _one)
    return _one(q, k, v, scale, causal, bias)


def _one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
         bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if cuda_kernel(q.dtype, q.shape[-1], bias is not None) == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        ab = None if bias is None else aligned_bias(bias, q.shape[1], q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, ab, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., :q.shape[-2]].float()  # the efficient kernel pads lse to 32 rows


# A biased decode (a batch of queries against keys padded to the longest, masked by
# length) runs in the memory-efficient kernel, which gives each (batch, head, 64 query
# rows) one thread block and walks all the keys in it: 8 sequences x 8 KV heads of a
# decode fill 64 blocks of an H200's 132 SMs (0.58 TB/s of K/V at 32k keys, against 4.1
# TB/s for the unmasked flash kernel, which splits the keys itself). Splitting the keys
# into chunks merged by their lse gives the GPU more blocks: 0.78 TB/s there (an H200,
# torch 2.11). The rest of the gap would need a split-KV kernel over the paged blocks
# that returns the lse.
SPLIT_BLOCKS = 256  # aim: at least this many thread blocks
SPLIT_MIN_KEYS = 1024  # keys per chunk, at least


def kv_splits(heads: int, t: int, s: int) -> int:
    """Key chunks for a biased call of ``heads`` (batch x heads) with T query rows over S
    keys: 1 (no split) when the call fills the GPU already or the keys are few; a
    divisor of S near the wanted count when there is one."""
    blocks = heads * -(-t // 64)
    if blocks >= SPLIT_BLOCKS or s < 2 * SPLIT_MIN_KEYS:
        return 1
    n = min(s // SPLIT_MIN_KEYS, -(-SPLIT_BLOCKS // blocks))
    # a divisor of S keeps the chunks views of k/v (else the batch's chunks are copied)
    return next((m for m in range(n, max(1, n // 2), -1) if s % m == 0), n)


def split_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             bias: torch.Tensor, n: int, call) -> tuple[torch.Tensor, torch.Tensor]:
    """``call(q, k, v, scale, False, bias)`` over n equal key chunks at once (the batch
    becomes B x n; views of k/v when n divides S or B == 1) plus the S mod n keys left
    over, merged exactly
    by log-sum-exp. A row that sees no key of a chunk gets weight 0 there (it attends the
    chunk unmasked, then is zeroed), so the kernel never meets an all -inf row."""
    b, h, t, d = q.shape
    s = k.shape[-2]
    c = s // n
    s0 = n * c

    def chunked(x):  # (B, H, S0, D) view -> (B * n, H, c, D) view
        return x[..., :s0, :].unflatten(2, (n, c)).transpose(1, 2).flatten(0, 1)

    parts = [(q.unsqueeze(1).expand(b, n, h, t, d).flatten(0, 1), chunked(k), chunked(v),
              bias[..., :s0].unflatten(2, (n, c)).transpose(1, 2).flatten(0, 1), n)]
    if s0 < s:
        parts.append((q, k[..., s0:, :], v[..., s0:, :], bias[..., s0:], 1))
    outs, lses = [], []
    for qp, kp, vp, bp, m in parts:
        seen = torch.isfinite(bp).any(-1)  # (B * m, T)
        bp = torch.where(seen.unsqueeze(-1), bp, torch.zeros_like(bp))
        out, lse = call(qp, kp, vp, scale, False, bp)  # (B * m, H, T, D), (B * m, H, T)
        seen = seen.unsqueeze(1)  # (B * m, 1, T)
        outs.append(out.float().masked_fill(~seen.unsqueeze(-1), 0).unflatten(0, (b, m)))
        lses.append(lse.masked_fill(~seen, float("-inf")).unflatten(0, (b, m)))
    out, lse = torch.cat(outs, 1), torch.cat(lses, 1)  # (B, n [+ 1], H, T, D), (..., T)
    total = torch.logsumexp(lse, 1)  # (B, H, T); -inf where no chunk has a key
    w = torch.exp(lse - torch.where(torch.isfinite(total), total, 0).unsqueeze(1))
    return (w.unsqueeze(-1) * out).sum(1).to(q.dtype), total
