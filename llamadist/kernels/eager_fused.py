"""Fused Triton kernels for the decoder layer's elementwise work in eager steps.

The prefill and mixed steps of the engine run the model eagerly (their token counts
change every step, so they are not compiled), and so do the CUDA-graph decode steps of a
dense float model (RuntimeConfig.compile: compiled only where it pays). There each
elementwise op of the Llama formula is a kernel of its own
that reads and writes the whole activation: RMSNorm alone is pow, mean, add, rsqrt, mul,
two casts and the weight's mul; the residual add before it, SiLU and the gate's product,
RoPE's rotate_half (a cat) and its three products. On an H200 serving 256 requests to a
Llama-3-8B these took ~1.5 s of ~8.2 s of device time against 2.8 s for the matmuls. Each
function here is one kernel over the same data:

* ``add_rms_norm(x, residual, weight, eps)``: s = x + residual (stored: the residual
  stream) and RMSNorm(s), the norm in float32 (x32 * rsqrt(mean(x32^2) + eps)), cast to
  x's dtype, then times the weight, as ``llamadist.model.llama.RMSNorm``.
* ``silu_mul(gate_up)``: (N, 2F) -> (N, F) silu(gate) * up, the fused gate|up
  projection's halves (llamadist.model.fuse), silu in float32 as torch computes it.
* ``rope(q, k, cos, sin)``: q (N, H, D) and k (N, H_kv, D) rotated (rotate-half RoPE) by
  their token's cos/sin (N, D), into new contiguous tensors.

Each keeps the eager formula's roundings (every intermediate the eager ops store is cast
to the activation dtype here too; RoPE's products and sum are not contracted into FMAs,
SiLU takes CUDA's expf and a rounded division): on the H200 RoPE and SiLU * up equal
eager bitwise in bf16, fp16 and float32, RMSNorm within an ulp in bf16 / fp16 (its float32
sum's order, and Triton's approximate division for the mean where torch multiplies by
1/D; 4 ulps in float32).
Under torch.compile the model keeps its own formula, which Inductor fuses (the model
asks ``torch.compiler.is_compiling()``); these are plain functions, not custom ops.
The Triton code is in llamadist.kernels.gpu.eager_fused, imported on the first call.
"""

from __future__ import annotations

import torch

from llamadist.kernels import gpu

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels run for activations of ``dtype`` on ``device``: a CUDA device
    (or Triton's interpreter) with triton, and a float dtype Triton stores."""
    return dtype in DTYPES and gpu.runs_on(device)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D), residual like x or None, weight (D,) -> (s, RMSNorm(s)) with s = x +
    residual (x itself for None), both of x's shape; the norm in promote(x, weight)'s
    dtype, as the eager module's ``weight * normed`` gives."""
    return gpu.load("eager_fused").add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2F), gate then up -> silu(gate) * up (..., F) in its dtype."""
    return gpu.load("eager_fused").silu_mul(gate_up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, H, D), k (N, H_kv, D) (any strides with a contiguous last dimension: views of
    the fused qkv projection), cos/sin (N, D) or any shape of N * D elements, all of one
    dtype -> (q * cos + rotate_half(q) * sin, the same of k), contiguous."""
    return gpu.load("eager_fused").rope(q, k, cos, sin)
