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

Below G assignments the grouped GEMM reads more weights than the step needs: a decode
step of Mixtral (8 experts, top-2) at batch 1 needs 2 experts' weights per layer and reads
8. ``expert_path`` chooses, from the static shapes, between it and the routed expert GEMV
(llamadist.kernels.moe_routed), which reads only the experts routed to; ``expert_sum``
(what the kernel pass installs) runs the one chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamadist.kernels import moe_routed

ROUTED, GROUPED = "routed", "grouped"


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


def expert_path(n: int, k: int, groups: int, routed_usable: bool = True) -> str:
    """Which kernel computes N = ``n`` tokens' experts, k = ``k`` of them each, over
    ``groups`` held experts: ROUTED when its A = n * k assignments are fewer than the
    groups, else GROUPED. Why: the routed GEMV reads one expert's weights per assignment
    (at most A experts), the grouped GEMM every held expert's (G) whatever the counts; at
    A >= G the routed kernel could read as much or more (a token per expert), and the
    grouped GEMM's tensor-core tiles serve many rows of an expert at once. Mixtral (G = 8,
    k = 2): N = 1-3 routed, 4 and more grouped (a prefill too: by its token count, so a
    prompt of 1-3 tokens takes the routed kernel). Shapes are static per CUDA-graph
    bucket and N is the bucket's rows (powers of two: batch 3 runs in the 4-row bucket,
    grouped), so the choice is made when a step is traced or captured. ``routed_usable``: moe_routed.usable on the weights' device."""
    return ROUTED if routed_usable and n * k < groups else GROUPED


def expert_sum(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor, slot: torch.Tensor | None = None,
               routed: bool = False) -> torch.Tensor:
    """grouped_expert_sum's contract, by the kernel ``expert_path`` chooses for these
    shapes (``routed``: whether the routed kernel may serve, moe_routed.usable)."""
    n, k = index.shape
    if expert_path(n, k, w13.shape[0], routed) == ROUTED:
        return moe_routed.routed_expert_sum(x, weights, index, w13, w2, slot)
    return grouped_expert_sum(x, weights, index, w13, w2, slot)

