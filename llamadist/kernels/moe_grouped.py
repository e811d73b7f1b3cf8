"""Mixture-of-experts experts as two grouped GEMMs over stacked expert weights, with
static shapes and no host sync, so a decode step that contains it can be captured in a
CUDA graph (the expert loop of llamadist.model.moe reads each expert's token count back
to the host and gathers data-dependent row counts).

For A = N * k assignments (token n, slot j) -> expert index[n, j]:

    order  = argsort(index.flatten())          (A,)  assignments grouped by expert
    offs   = cumsum(tokens per expert)         (G,)  int32, end row of each group
    h      = grouped_mm(x[rows], W13[g]^T)     (A, 2F) gate | up of each assignment
    y      = grouped_mm(silu(gate) * up, W2[g]^T)   (A, D)
    out[n] = sum_j weights[n, j] * y[(n, j)]   (index_add_ in float32)

``torch._grouped_mm`` (PyTorch >= 2.8) runs a CUTLASS grouped GEMM on CUDA (bf16, Hopper
and newer) reading each expert's weights once per step whatever its token count, and a
reference implementation elsewhere (the CPU tests check the math through it). Nothing
here knows the model: llamadist.runtime.kernel_passes stacks the weights and installs it.

Experts not held (an expert-parallel share): ``slot`` maps global expert ids to local
groups; assignments to experts held elsewhere sort last, past the last group's end, and
are masked out of the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped kernel serves weights of ``dtype`` on ``device``: CUDA with
    ``torch._grouped_mm`` and bf16 on a Hopper-or-newer GPU (what its CUTLASS kernel takes)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def grouped_expert_sum(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor,
                       slot: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, D), weights (N, k) float32, index (N, k) global expert ids, w13 (G, 2F, D)
    (gate rows then up rows, each group's as nn.Linear stores them), w2 (G, D, F), slot
    (E,) long: the group of each global expert, -1 where not held (None: expert e is
    group e) -> (N, D) in x's dtype: the weighted sum over the held experts."""
    n, k = index.shape
    groups = w13.shape[0]
    flat = index.flatten()  # (A,)
    group = flat if slot is None else slot[flat]
    held = group >= 0
    key = torch.where(held, group, groups)  # not held: after every group
    order = key.argsort(stable=True)  # (A,) grouped by expert, token-major within one
    counts = torch.zeros(groups + 1, dtype=torch.int32, device=x.device)
    counts.index_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offs = counts[:groups].cumsum(0, dtype=torch.int32)  # (G,) end of each group's rows
    rows = order // k  # (A,) the token of each sorted assignment
    h = torch._grouped_mm(x[rows], w13.transpose(1, 2), offs=offs)  # (A, 2F)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # (A, D)
    # rows past the last group's end are not written by the grouped GEMM: masked, not
    # multiplied (uninitialised memory may hold NaN)
    w = torch.where(held[order], weights.flatten()[order], 0.0)  # (A,) float32
    y = torch.where(held[order, None], y.float() * w[:, None], 0.0)
    out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, y)
    return out.to(x.dtype)
