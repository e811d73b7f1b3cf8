"""Expert parallelism as an explicit pass over a meta-built mixture-of-experts stage.

The ``ep`` ranks of one expert-parallel group split each MoE layer's experts: rank ``r``
holds ``expert_shares(E, ep)[r]`` (contiguous, the first ``E % ep`` ranks one more; or any
placement the caller gives, e.g. by device memory). The router (E x D, small) and
everything outside the MoE blocks stay as they were: replicated, or tensor-parallel when
the tensor-parallel pass ran first on the same ranks (attention TP, experts EP).

Because the experts are dropped from the meta model *before* loading, the loader reads
only this rank's experts (their checkpoint names are unchanged: ``experts`` is keyed by
global expert index).

How tokens meet their experts (``dispatch``):

    "replicated"  every rank holds the same (N, D) tokens (attention replicated or tensor-
                  parallel: its output is all-reduced). Each rank routes them (same
                  input, same router: the same choice everywhere), computes the weighted
                  sum over its own experts and one all-reduce adds the ranks' partial
                  sums: (N, D) per layer, the cost of one row-parallel layer.
    "gather"      each rank holds its own tokens (data-parallel attention). All-gather
                  the tokens (sizes first: ranks may hold different counts), route and
                  compute the local experts on all of them, reduce-scatter so each rank
                  gets back the full sum for its own rows. Communication grows with the
                  ranks' total tokens; an all-to-all of only the routed rows would move
                  k/E of that (the choice at large batch; not written yet).
                  With ``reduce_group`` (tensor-parallel attention inside each
                  data-parallel replica: the grid's TP x DP = EP), ``group`` is the DP
                  group (ranks of one TP index, different tokens) and the TP ranks of a
                  replica hold the same tokens but different experts: after the
                  reduce-scatter one all-reduce over ``reduce_group`` adds the TP ranks'
                  sums. Rank (d, t) of the grid holds ``expert_shares(E, tp*dp)[d*tp+t]``.

A data-parallel replica with nothing to compute in a step must still join its MoE
layers' collectives (``join_expert_collectives``: zero tokens through every gather
block), or the replicas that have work wait for it forever: the engine steps such
replicas in lockstep (engine.LLMEngine ``lockstep``).

Either way the result equals one process's SparseMoE up to the order of the float sums.
Order of the passes: build on meta -> pipeline cut -> (tensor parallel) ->
``apply_expert_parallel`` -> load -> setup_rope -> fuse -> kernel passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamadist.config import ModelConfig
from llamadist.model.llama import Llama
from llamadist.model.moe import SparseMoE

Group = dist.ProcessGroup | None
DISPATCHES = ("replicated", "gather")


class ExpertParallelError(ValueError):
    """A layout expert parallelism cannot serve, with the numbers."""


def expert_shares(num_experts: int, ep_size: int) -> list[list[int]]:
    """Global expert indices per EP rank: contiguous, as even as possible."""
    if not 1 <= ep_size <= num_experts:
        raise ExpertParallelError(f"ep={ep_size} must be between 1 and the model's "
                                  f"{num_experts} experts per layer")
    base, extra = divmod(num_experts, ep_size)
    starts = [r * base + min(r, extra) for r in range(ep_size + 1)]
    return [list(range(starts[r], starts[r + 1])) for r in range(ep_size)]


class ExpertParallelMoE(SparseMoE):
    """A SparseMoE holding only ``owned`` experts; ``forward`` combines the ranks' partial
    sums with the collectives of ``dispatch`` (see the module docstring)."""

    def __init__(self, config: ModelConfig, owned: Sequence[int], group: Group,
                 dispatch: str = "replicated", reduce_group: Group = None):
        super().__init__(config, owned)
        if dispatch not in DISPATCHES:
            raise ExpertParallelError(f"dispatch must be one of {', '.join(DISPATCHES)}, "
                                      f"got {dispatch!r}")
        if reduce_group is not None and dispatch != "gather":
            raise ExpertParallelError("reduce_group goes with the gather dispatch (TP ranks "
                                      "inside data-parallel replicas)")
        self.owned, self.group, self.dispatch = list(owned), group, dispatch
        self.reduce_group = reduce_group

    @property
    def graph_safe(self) -> bool:
        # the gather reads the ranks' token counts back to the host; the replicated
        # dispatch adds one all-reduce (NCCL captures it) to SparseMoE's
        return self.dispatch == "replicated" and self.expert_fn is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, D)
        if self.dispatch == "gather":
            out = self._gather_forward(x2)
            # the replica's TP ranks: same rows, other experts. Every TP rank of a replica
            # has the same (maybe zero) rows, so they all skip an empty reduce together.
            if self.reduce_group is not None and out.shape[0]:
                dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.reduce_group)
        else:
            weights, index = self.route(x2)  # the same on every rank
            self.count(index)
            out = self.expert_sum(x2, weights, index)  # (N, D) partial: this rank's experts
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        if self.shared_expert is not None:  # replicated: added once, after the reduce
            out = out + self.shared_expert(x2)
        return out.view(shape)

    def _gather_forward(self, x2: torch.Tensor) -> torch.Tensor:
        ranks = dist.get_world_size(self.group)
        n = torch.tensor([x2.shape[0]], dtype=torch.long, device=x2.device)
        sizes = [torch.empty_like(n) for _ in range(ranks)]
        dist.all_gather(sizes, n, group=self.group)  # token count of every rank
        counts = [int(s) for s in sizes]
        width = max(counts)
        if width == 0:  # no rank has a token (every rank knows: same sizes everywhere)
            return x2
        parts = [torch.empty(width, x2.shape[1], dtype=x2.dtype, device=x2.device)
                 for _ in range(ranks)]
        dist.all_gather(parts, F.pad(x2, (0, 0, 0, width - x2.shape[0])), group=self.group)
        tokens = torch.cat([p[:c] for p, c in zip(parts, counts)])  # (sum N_r, D)
        weights, index = self.route(tokens)
        self.count(index)  # every rank counts every rank's tokens
        partial = self.expert_sum(tokens, weights, index)  # (sum N_r, D)
        # Back into equal-width per-rank blocks for the reduce-scatter; trim the padding.
        blocks = list(partial.split(counts))
        blocks = [F.pad(b, (0, 0, 0, width - b.shape[0])) for b in blocks]
        mine = torch.empty(width, x2.shape[1], dtype=x2.dtype, device=x2.device)
        dist.reduce_scatter(mine, blocks, op=dist.ReduceOp.SUM, group=self.group)
        return mine[:x2.shape[0]]


def apply_expert_parallel(model: Llama, group: Group, ep_rank: int, ep_size: int,
                          dispatch: str = "replicated",
                          owned: Sequence[int] | None = None,
                          reduce_group: Group = None) -> Llama:
    """Replace every MoE block of a meta-built stage with this rank's ExpertParallelMoE,
    in place, before loading (a block an earlier pass made is replaced too); returns
    ``model``. ``owned``: the global expert indices this rank holds (default
    ``expert_shares(E, ep_size)[ep_rank]``)."""
    config = model.config
    if not config.is_moe:
        raise ExpertParallelError(f"expert parallelism needs a mixture-of-experts model; "
                                  f"{config.architecture} has none")
    owned = list(expert_shares(config.num_experts, ep_size)[ep_rank] if owned is None
                 else owned)
    if not owned or any(not 0 <= e < config.num_experts for e in owned):
        raise ExpertParallelError(f"rank {ep_rank}: experts {owned} are not a non-empty "
                                  f"subset of 0..{config.num_experts - 1}")
    if any(not p.is_meta for p in model.parameters()):
        raise ExpertParallelError("apply_expert_parallel must run on a meta-built model, "
                                  "before load_weights (each rank then reads only its experts)")
    with torch.device("meta"):
        for layer in model.model.layers.values():
            layer.block_sparse_moe = ExpertParallelMoE(config, owned, group, dispatch,
                                                       reduce_group)
    return model


def join_expert_collectives(model: Llama, dtype: torch.dtype) -> None:
    """This rank's share of a step it has no tokens for: zero rows through every
    gather-dispatch MoE block of the stage, in layer order, so the collectives of the
    other data-parallel replicas' ranks (which have tokens) complete."""
    for layer in model.model.layers.values():
        moe = layer.block_sparse_moe
        if isinstance(moe, ExpertParallelMoE) and moe.dispatch == "gather":
            moe(torch.empty(0, model.config.hidden_size, dtype=dtype,
                            device=moe.gate.weight.device))


def expert_parallel_pass(config: ModelConfig, group: Group, ep_rank: int, ep_size: int,
                         dispatch: str = "replicated",
                         before: Callable[[Llama], object] | None = None,
                         reduce_group: Group = None) -> dict:
    """The ``prepare`` keyword of ``runtime.stage.build_stage`` for this EP rank.
    ``before`` runs first: another pass's ``prepare``, such as the tensor-parallel pass's
    (whose MoE blocks this pass replaces; the caller passes its shard_fn and num_kv_heads
    too). ``reduce_group``: see the gather dispatch (module docstring)."""
    expert_shares(config.num_experts, ep_size)  # refuse a bad ep before any load

    def prepare(model: Llama) -> None:
        if before is not None:
            before(model)
        apply_expert_parallel(model, group, ep_rank, ep_size, dispatch,
                              reduce_group=reduce_group)
    return dict(prepare=prepare)
