"""The sparse mixture-of-experts feed-forward block (Mixtral): a router picks top-k of E
SwiGLU experts per token and the block returns their weighted sum.

Hugging Face names, as Mixtral checkpoints store them (one tensor per expert):

    block_sparse_moe.gate.weight              (E, D)  the router
    block_sparse_moe.experts.{e}.w1.weight    (F, D)  gate projection of expert e
    block_sparse_moe.experts.{e}.w3.weight    (F, D)  up projection
    block_sparse_moe.experts.{e}.w2.weight    (D, F)  down projection

The block is written in three replaceable parts, so other MoE families fit without a
rewrite: ``route`` (logits -> top-k weights and indices; the rule is a function of
ROUTINGS, chosen by ``ModelConfig.routing``), ``expert_sum`` (the weighted sum over the
experts this module holds) and an optional ``shared_expert`` added to every token.
``experts`` is keyed by *global* expert index, so a module holding only some experts
(the expert-parallel pass, llamadist.parallel.expert) keeps the checkpoint's names and
runs the same ``expert_sum`` over its share: its output is then a partial sum.

Plain PyTorch only (DESIGN principle 1): the expert loop gathers each expert's tokens
and computes them with nn.Linear; a grouped-GEMM kernel is a pass's business: it sets
``expert_fn`` (llamadist.runtime.kernel_passes.use_grouped_experts on CUDA), which then
computes ``expert_sum`` with static shapes and no host sync (``graph_safe``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import ModelConfig

# (router logits (N, E) float32, k) -> (weights (N, k) float32, expert indices (N, k) long)
Routing = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# (x (N, D), weights (N, k) float32, indices (N, k)) -> (N, D): expert_sum's contract
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_topk_norm(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's rule: softmax over all experts, keep the top k, renormalise them to sum
    to 1 (equal to a softmax over the k largest logits)."""
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    weights, index = torch.topk(probs, k, dim=-1)  # (N, k)
    return weights / weights.sum(dim=-1, keepdim=True), index


ROUTINGS: dict[str, Routing] = {"softmax_topk_norm": softmax_topk_norm}


class Expert(nn.Module):
    """One SwiGLU expert: w2(silu(w1 x) * w3 x), Mixtral's names."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)  # gate
        self.w2 = nn.Linear(inter, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter, bias=False)  # up
        self.w13: nn.Linear | None = None  # w1 | w3 in one matmul, set by llamadist.model.fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Route each token to ``top_k`` of ``num_experts`` experts; sum their outputs weighted
    by the router. ``experts``: the global indices held (default all); a module holding
    some returns the part of the sum its experts contribute."""

    def __init__(self, config: ModelConfig, experts: Sequence[int] | None = None):
        super().__init__()
        d, e = config.hidden_size, config.num_experts
        self.num_experts, self.top_k = e, config.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)  # the router: (N, D) -> (N, E)
        held = range(e) if experts is None else experts
        self.experts = nn.ModuleDict({str(i): Expert(d, config.intermediate_size)
                                      for i in held})
        self.routing: Routing = ROUTINGS[config.routing]
        # A module added to every token's output (Qwen2-MoE / DeepSeek style); none in
        # Mixtral. Its weights would load under its own HF name like any module.
        self.shared_expert: nn.Module | None = None
        # Tokens routed to each expert, (E,) long, while a caller counts (count_routing);
        # None: not counted.
        self.routed: torch.Tensor | None = None
        # expert_sum by a kernel (a grouped GEMM over stacked weights), set by a pass;
        # None: the loop below.
        self.expert_fn: ExpertFn | None = None

    @property
    def graph_safe(self) -> bool:
        """forward has static shapes and no host sync (a CUDA graph can capture it)."""
        return self.expert_fn is not None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> top-k weights (N, k) float32 and expert indices (N, k). The
        softmax runs in float32, as transformers' router does."""
        return self.routing(self.gate(x).float(), self.top_k)

    def expert_sum(self, x: torch.Tensor, weights: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] * expert[index[n, j]](x[n]) over the experts this module
        holds (every expert, or a pass's share of them): (N, D) in x's dtype."""
        if self.expert_fn is not None:
            return self.expert_fn(x, weights, index)
        out = torch.zeros_like(x)
        flat = index.flatten()  # (N*k,) one assignment per (token, slot), token-major
        order = flat.argsort(stable=True)  # assignments grouped by expert
        rows = order // index.shape[1]  # (N*k,) the token of each assignment
        w = weights.flatten()[order]  # (N*k,) float32
        # One host sync for every expert's count, instead of one per expert.
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            expert = self.experts[str(e)] if n and str(e) in self.experts else None
            if expert is not None:
                r = rows[start:start + n]  # (n_e,) distinct tokens: top-k experts differ
                y = expert(x[r]) * w[start:start + n, None]  # (n_e, D) float32
                out.index_add_(0, r, y.to(x.dtype))
            start += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, D): every token of the batch
        weights, index = self.route(x2)
        self.count(index)
        out = self.expert_sum(x2, weights, index)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x2)
        return out.view(shape)

    def count(self, index: torch.Tensor) -> None:
        """Add a step's routing (N, k) to ``routed`` when counting: on the device, without
        a host sync (bincount would read the largest index back), so a captured graph
        can count too."""
        if self.routed is not None:
            flat = index.flatten()
            self.routed.index_add_(0, flat, torch.ones_like(flat))


def count_routing(model: nn.Module) -> None:
    """Start (or restart from zero) counting the tokens routed to each expert in every
    SparseMoE of ``model``. A counter is zeroed in place once made: a captured CUDA graph
    keeps adding to the tensor it was captured with."""
    for module in model.modules():
        if isinstance(module, SparseMoE):
            if module.routed is not None:
                module.routed.zero_()
            else:
                module.routed = torch.zeros(module.num_experts, dtype=torch.long,
                                            device=module.gate.weight.device)


def routing_counts(model: nn.Module) -> dict[int, list[int]]:
    """{global layer index: tokens routed to each expert} of the counting SparseMoEs of a
    model (``model.layers.{i}.block_sparse_moe``); {} when none counts."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseMoE) and module.routed is not None:
            out[int(name.split("layers.")[1].split(".")[0])] = module.routed.tolist()
    return out
