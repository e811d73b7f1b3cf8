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

__all__ = ["cuda_kernel", "sdpa_lse", "aligned_bias", "BIAS_ALIGN"]

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
    None -> out (B, H, T, D) in q's dtype, lse (B, H, T) fp32."""
    t, d = q.shape[-2:]
    if causal and (bias is not None or t != k.shape[-2]):
        raise ValueError("causal fused attention takes T == S and no bias")
    kind = cuda_kernel(q.dtype, d, bias is not None)
    if kind == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)[:2]
    elif kind == "efficient":
        ab = None if bias is None else aligned_bias(bias, q.shape[1], q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, ab, True, 0.0, causal, scale=scale)[:2]
    else:
        raise ValueError(f"no fused CUDA attention for {q.dtype} with head_dim {d}")
    return out, lse[..., :t].float()  # the efficient kernel pads lse to 32 rows
