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
                  ranks' total tokens: 2 (ep - 1) / ep of (sum N_r, D) per rank.
    "all_to_all"  each rank holds its own tokens. Route them locally; send each token
                  once to every rank holding one of its experts (``route_plan``: rows
                  grouped by destination, with the token's top-k ids and weights packed
                  into the same bytes), after one all-gather of a small header (rows to
                  each rank, tokens, tokens per expert). The receiver runs
                  SparseMoE.expert_sum on the rows (its experts only: a weighted partial
                  sum per row) and a second all-to-all sends them back; ``index_add_``
                  puts them on their tokens. Per rank only about N_r x (distinct ranks
                  among a token's k experts) rows travel, not every rank's tokens.
    "auto"        the header of "all_to_all" first; then, the same on every rank (every
                  rank has every count), "gather" for a step of at most ``crossover``
                  tokens over the ranks and "all_to_all" above (planning.cost.
                  ep_dispatch_crossover; benchmarks/moe_dispatch.py measures it).
                  With ``reduce_group`` (tensor-parallel attention inside each
                  data-parallel replica: the grid's TP x DP = EP), ``group`` is the DP
                  group (ranks of one TP index, different tokens) and the TP ranks of a
                  replica hold the same tokens but different experts: after the
                  reduce-scatter (or the all-to-all back) one all-reduce over
                  ``reduce_group`` adds the TP ranks' sums. Rank (d, t) of the grid holds
                  ``placement[d*tp+t]`` (default ``expert_shares(E, tp*dp)``; a run's is
                  planning.experts.run_shares', by memory when its ranks' budgets
                  differ); under "all_to_all" it sends rows only to ranks of its own TP
                  index (its TP peers send the rest).

Every dispatch finds an expert's rank in the owner map of the placement (``expert_owners``),
never by ``expert // (E / ep)``: uneven shares route as even ones do.

Hot experts (seed 004): under "all_to_all" (and "auto") ``replicas`` puts copies of chosen
experts (``hot_experts``: the most-loaded by the routing counters) on every rank besides
its share; a rank computes those for its own tokens and sends no row for them
(``assigned_weights`` zeroes the replicated slots of the rows that still travel; a
gathered step leaves each replicated expert to its owner).

Every rank of a token-local dispatch counts (``routed``) every rank's tokens: the gather
routes them all; the all-to-all's header carries each rank's tokens per expert. So one
rank's counters cover its replicas' traffic (what the front of one world reports).

A data-parallel replica with nothing to compute in a step must still join its MoE
layers' collectives (``join_expert_collectives``: zero tokens through every token-local
block), or the replicas that have work wait for it forever: the engine steps such
replicas in lockstep (engine.LLMEngine ``lockstep``).

Every way the result equals one process's SparseMoE up to the order of the float sums.
Order of the passes: build on meta -> pipeline cut -> (tensor parallel) ->
``apply_expert_parallel`` -> load -> setup_rope -> fuse -> kernel passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamadist.config import ModelConfig
from llamadist.model.llama import Llama
from llamadist.model.moe import SparseMoE
from llamadist.planning import experts as experts_plan
from llamadist.planning.units import PlanningError

Group = dist.ProcessGroup | None
DISPATCHES = ("replicated", "gather", "all_to_all", "auto")
TOKEN_LOCAL = ("gather", "all_to_all", "auto")  # each rank holds its own tokens


class ExpertParallelError(ValueError):
    """A layout expert parallelism cannot serve, with the numbers."""


def expert_shares(num_experts: int, ep_size: int) -> list[list[int]]:
    """Global expert indices per EP rank: contiguous, as even as possible (the planner's
    planning.experts.expert_shares, so a plan counts the experts each rank loads)."""
    with _as_ep_error():
        return experts_plan.expert_shares(num_experts, ep_size)


def expert_owners(placement: Sequence[Sequence[int]], num_experts: int) -> list[int]:
    """The rank holding each expert (-1: no rank of this placement) from the experts of
    every rank; an expert on two ranks is refused (the all-to-all needs one owner)."""
    owner = [-1] * num_experts
    for rank, experts in enumerate(placement):
        for e in experts:
            if not 0 <= e < num_experts:
                raise ExpertParallelError(f"placement: rank {rank} holds expert {e}, not "
                                          f"one of 0..{num_experts - 1}")
            if owner[e] >= 0:
                raise ExpertParallelError(f"placement: expert {e} is on ranks {owner[e]} "
                                          f"and {rank}")
            owner[e] = rank
    return owner


def route_plan(index: torch.Tensor, owner: torch.Tensor,
               ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows the all-to-all sends where. index (N, k) global expert ids, owner (E,)
    long: the rank of each expert (-1: none of these ranks) -> (tokens (P,) long: the
    token of each row sent, grouped by destination rank, ascending within one; counts
    (ranks,) long: rows per destination). A token goes once to each rank holding any of
    its experts: two of its experts on one rank share the row."""
    n = index.shape[0]
    dest = owner[index]  # (N, k)
    hit = torch.zeros(ranks + 1, n, dtype=torch.bool, device=index.device)
    token = torch.arange(n, device=index.device)[:, None].expand_as(dest)
    hit[torch.where(dest >= 0, dest, ranks), token] = True  # row `ranks`: nowhere here
    hit = hit[:ranks]  # (R, N)
    return hit.nonzero()[:, 1], hit.sum(dim=1)


def assigned_weights(index: torch.Tensor, weights: torch.Tensor, owner: torch.Tensor,
                     counts: Sequence[int]) -> torch.Tensor:
    """The routing weights each sent row carries: index, weights (P, k) of the rows in
    route_plan's order, ``counts`` rows per destination -> weights (P, k) with 0 for every
    slot another rank computes. Without replicas a receiver holds only the experts it owns,
    so this changes nothing; with a hot expert on every rank it keeps the receiver of a row
    from adding that expert a second time (the sender computes it locally)."""
    dest = torch.repeat_interleave(torch.arange(len(counts), device=index.device),
                                   torch.as_tensor(counts, device=index.device))  # (P,)
    return torch.where(owner[index] == dest[:, None], weights, torch.zeros_like(weights))


def hot_experts(load: Mapping[int, Sequence[int]], n: int) -> dict[int, list[int]]:
    """The ``n`` most-loaded experts of each layer from per-expert token counts (the
    counters of model.moe.routing_counts, or a run's ``expert_load``; ties: the lower
    index): the replicas ``apply_expert_parallel`` can put on every rank
    (planning.experts.hot_experts, which the planner counts)."""
    with _as_ep_error():
        return experts_plan.hot_experts(load, n)


def read_expert_load(path: str, num_experts: int) -> dict[int, list[int]]:
    """{layer: tokens per expert} from a JSON file (a run's ``expert_load``), checked."""
    with _as_ep_error():
        return experts_plan.read_expert_load(path, num_experts)


@contextmanager
def _as_ep_error():
    """The planner's placement errors as this module's (ExpertParallelError)."""
    try:
        yield
    except PlanningError as e:
        raise ExpertParallelError(str(e)) from None


def pack_rows(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (P, D), weights (P, k) float32, index (P, k) -> (P, bytes) uint8: one tensor, so
    one all-to-all carries the rows and their routing."""
    parts = (x.contiguous(), weights.float().contiguous(), index.long().contiguous())
    return torch.cat([t.view(torch.uint8) for t in parts], dim=1)


def unpack_rows(buf: torch.Tensor, dim: int, dtype: torch.dtype,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_rows undone: (P, bytes) uint8 -> x (P, D) of dtype, weights (P, k) float32,
    index (P, k) long."""
    xb = dim * torch.empty((), dtype=dtype).element_size()
    cuts = (xb, xb + 4 * k, xb + 12 * k)
    if buf.shape[1] != cuts[2]:
        raise ExpertParallelError(f"a packed row has {buf.shape[1]} bytes, expected "
                                  f"{cuts[2]} (D={dim}, {dtype}, k={k})")
    # copies: a column slice starts off the wider types' alignment (and an empty one
    # keeps the packed row's stride)
    x, w, i = (buf[:, a:b].clone(memory_format=torch.contiguous_format).view(t)
               for a, b, t in ((0, cuts[0], dtype), (cuts[0], cuts[1], torch.float32),
                               (cuts[1], cuts[2], torch.long)))
    return x, w, i


def _check_layout(config: ModelConfig, owned: Sequence[int], dispatch: str,
                  reduce_group: Group, placement: Sequence[Sequence[int]] | None,
                  crossover: int, replicas: Sequence[int]) -> tuple[list[int] | None, list[int]]:
    """ExpertParallelMoE's arguments checked -> (the owner of each expert or None, the
    replicas this group keeps)."""
    if dispatch not in DISPATCHES:
        raise ExpertParallelError(f"dispatch must be one of {', '.join(DISPATCHES)}, "
                                  f"got {dispatch!r}")
    if reduce_group is not None and dispatch not in TOKEN_LOCAL:
        raise ExpertParallelError("reduce_group goes with a token-local dispatch (TP "
                                  "ranks inside data-parallel replicas)")
    if crossover < 0:
        raise ExpertParallelError(f"crossover must be >= 0 tokens, got {crossover}")
    if dispatch in ("all_to_all", "auto"):
        if placement is None:
            raise ExpertParallelError(f"the {dispatch} dispatch needs the placement "
                                      f"of every rank of the group")
        if sorted(owned) not in [sorted(p) for p in placement]:
            raise ExpertParallelError(f"experts {list(owned)} are not one rank's share "
                                      f"of the placement {placement}")
    replicas = sorted(set(replicas))
    if replicas and dispatch not in ("all_to_all", "auto"):
        raise ExpertParallelError(f"replicas of hot experts go with the all_to_all or auto "
                                  f"dispatch, not {dispatch!r} (it would add a "
                                  f"replicated expert once per rank)")
    if any(not 0 <= e < config.num_experts for e in replicas):
        raise ExpertParallelError(f"replicas {replicas}: experts are 0.."
                                  f"{config.num_experts - 1}")
    owner = None if placement is None else expert_owners(placement, config.num_experts)
    # under TP x DP only the group whose ranks own an expert replicates it (the TP peers'
    # groups leave it to them: the TP all-reduce would add it again)
    return owner, [e for e in replicas if owner is not None and owner[e] >= 0]


class ExpertParallelMoE(SparseMoE):
    """A SparseMoE holding only ``owned`` experts; ``forward`` combines the ranks' partial
    sums with the collectives of ``dispatch`` (see the module docstring). ``placement``:
    the experts of every rank of ``group``, in group order (the all-to-all's
    destinations; needed by "all_to_all" and "auto"). ``crossover``: "auto" gathers a step
    of at most this many tokens over the group's ranks. ``replicas``: experts held by
    every rank of the group besides its share ("all_to_all", "auto"): under the
    all-to-all each rank computes them for its own tokens and no row travels for them;
    a gathered step leaves each to its owner."""

    def __init__(self, config: ModelConfig, owned: Sequence[int], group: Group,
                 dispatch: str = "replicated", reduce_group: Group = None,
                 placement: Sequence[Sequence[int]] | None = None, crossover: int = 0,
                 replicas: Sequence[int] = ()):
        owner, replicas = _check_layout(config, owned, dispatch, reduce_group, placement,
                                        crossover, replicas)
        super().__init__(config, sorted(set(owned) | set(replicas)))
        self.owned, self.group, self.dispatch = list(owned), group, dispatch
        self.reduce_group, self.crossover = reduce_group, crossover
        self.owner, self.replicas = owner, replicas
        self._owner_on: dict[torch.device, torch.Tensor] = {}
        self.rows_out = 0  # rows the all-to-all sent to other ranks (the traffic)
        # what each step's token-local forward chose, {"gather": n, "all_to_all": n}
        self.dispatched = {"gather": 0, "all_to_all": 0}

    @property
    def graph_safe(self) -> bool:
        # the token-local dispatches read the ranks' token counts back to the host; the
        # replicated dispatch adds one all-reduce (NCCL captures it) to SparseMoE's
        return self.dispatch == "replicated" and self.expert_fn is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, D)
        if self.dispatch in TOKEN_LOCAL:
            out = (self._gather_forward(x2) if self.dispatch == "gather"
                   else self._routed_forward(x2))
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

    def _gather_forward(self, x2: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """The gather dispatch; ``counts``: every rank's token count when already known."""
        ranks = dist.get_world_size(self.group)
        if counts is None:
            n = torch.tensor([x2.shape[0]], dtype=torch.long, device=x2.device)
            sizes = [torch.empty_like(n) for _ in range(ranks)]
            dist.all_gather(sizes, n, group=self.group)  # token count of every rank
            counts = [int(s) for s in sizes]
        width = max(counts)
        if width == 0:  # no rank has a token (every rank knows: same sizes everywhere)
            return x2
        self.dispatched["gather"] += 1
        parts = [torch.empty(width, x2.shape[1], dtype=x2.dtype, device=x2.device)
                 for _ in range(ranks)]
        dist.all_gather(parts, F.pad(x2, (0, 0, 0, width - x2.shape[0])), group=self.group)
        tokens = torch.cat([p[:c] for p, c in zip(parts, counts)])  # (sum N_r, D)
        weights, index = self.route(tokens)
        self.count(index)  # every rank counts every rank's tokens
        if self.replicas:  # a replica held everywhere is added once: by its owner
            me = dist.get_rank(self.group)
            theirs = torch.tensor([e in self.replicas and self.owner[e] != me
                                   for e in range(self.num_experts)], device=x2.device)
            weights = torch.where(theirs[index], torch.zeros_like(weights), weights)
        partial = self.expert_sum(tokens, weights, index)  # (sum N_r, D)
        # Back into equal-width per-rank blocks for the reduce-scatter; trim the padding.
        blocks = list(partial.split(counts))
        blocks = [F.pad(b, (0, 0, 0, width - b.shape[0])) for b in blocks]
        mine = torch.empty(width, x2.shape[1], dtype=x2.dtype, device=x2.device)
        dist.reduce_scatter(mine, blocks, op=dist.ReduceOp.SUM, group=self.group)
        return mine[:x2.shape[0]]

    def _routed_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """"all_to_all" and "auto": route locally, one all-gather of the row counts, then
        the all-to-all (or, "auto" at small steps, the gather)."""
        ranks, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        owner = self._owner_on.get(x2.device)
        if owner is None:  # a replicated expert's owner: this rank
            mine = [me if e in self.replicas else r for e, r in enumerate(self.owner)]
            owner = self._owner_on.setdefault(
                x2.device, torch.tensor(mine, dtype=torch.long, device=x2.device))
        weights, index = self.route(x2)  # (N, k)
        tokens, send = route_plan(index, owner, ranks)
        # (R + 1 + E,): rows to each rank, this rank's tokens, its tokens per expert
        head = torch.cat([send, send.new_tensor([x2.shape[0]]),
                          torch.bincount(index.flatten(), minlength=self.num_experts)])
        heads = [torch.empty_like(head) for _ in range(ranks)]
        dist.all_gather(heads, head, group=self.group)
        both = torch.stack(heads)  # (R, R + 1 + E)
        table = both[:, :ranks + 1].tolist()  # [src][dst] rows, [src][R] tokens
        total = sum(row[ranks] for row in table)
        if self.dispatch == "auto" and total <= self.crossover:
            return self._gather_forward(x2, [row[ranks] for row in table])
        if self.routed is not None:  # every rank's tokens, as the gather counts them
            self.routed += both[:, ranks + 1:].sum(dim=0)
        if not any(any(row[:ranks]) for row in table):  # nothing to send anywhere
            return torch.zeros_like(x2)
        self.dispatched["all_to_all"] += 1
        sent = send.tolist()
        self.rows_out += sum(sent) - sent[me]
        return self._exchange(x2, weights, index, tokens, sent, [row[me] for row in table],
                              owner)

    def _exchange(self, x2: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                  tokens: torch.Tensor, send: list[int], recv: list[int],
                  owner: torch.Tensor) -> torch.Tensor:
        """Rows to their experts' ranks and their partial sums back (two all-to-alls)."""
        rows_w = weights[tokens]
        if self.replicas:  # the receivers hold replicas too: only its own slots count
            rows_w = assigned_weights(index[tokens], rows_w, owner, send)
        payload = pack_rows(x2[tokens], rows_w, index[tokens])  # (P, bytes)
        got = payload.new_empty(sum(recv), payload.shape[1])
        dist.all_to_all_single(got, payload, recv, send, group=self.group)
        rx, rw, ri = unpack_rows(got, x2.shape[1], x2.dtype, self.top_k)
        partial = self.expert_sum(rx, rw, ri)  # (P_in, D): this rank's experts of each row
        back = partial.new_empty(tokens.shape[0], x2.shape[1])
        dist.all_to_all_single(back, partial, send, recv, group=self.group)
        out = torch.zeros_like(x2)
        out.index_add_(0, tokens, back)  # a token's rows from different ranks add up
        return out


def apply_expert_parallel(model: Llama, group: Group, ep_rank: int, ep_size: int,
                          dispatch: str = "replicated",
                          owned: Sequence[int] | None = None,
                          reduce_group: Group = None,
                          placement: Sequence[Sequence[int]] | None = None,
                          crossover: int = 0,
                          replicas: Mapping[int, Sequence[int]] | None = None) -> Llama:
    """Replace every MoE block of a meta-built stage with this rank's ExpertParallelMoE,
    in place, before loading (a block an earlier pass made is replaced too); returns
    ``model``. ``placement``: the experts of every EP rank (default ``expert_shares(E,
    ep_size)``; uneven ones, e.g. by device memory, are fine); ``owned``: this rank's
    (default ``placement[ep_rank]``). With ``reduce_group`` the EP ranks of ``group`` are
    those of this rank's TP index (EP rank d * tp + t, d over the group). ``replicas``:
    {global layer index: experts every rank holds besides its share} (``hot_experts``;
    all_to_all only), read from the checkpoint by every rank."""
    config = model.config
    if not config.is_moe:
        raise ExpertParallelError(f"expert parallelism needs a mixture-of-experts model; "
                                  f"{config.architecture} has none")
    if placement is not None:
        if len(placement) != ep_size:
            raise ExpertParallelError(f"placement has {len(placement)} ranks' experts, "
                                      f"ep={ep_size}")
        expert_owners(placement, config.num_experts)  # each expert once, all in range
    elif owned is None:
        placement = expert_shares(config.num_experts, ep_size)
    owned = list(placement[ep_rank] if owned is None else owned)
    if not owned or any(not 0 <= e < config.num_experts for e in owned):
        raise ExpertParallelError(f"rank {ep_rank}: experts {owned} are not a non-empty "
                                  f"subset of 0..{config.num_experts - 1}")
    if any(not p.is_meta for p in model.parameters()):
        raise ExpertParallelError("apply_expert_parallel must run on a meta-built model, "
                                  "before load_weights (each rank then reads only its experts)")
    mine = placement
    if placement is not None and reduce_group is not None:  # the group: one TP index
        tp = dist.get_world_size(reduce_group)
        mine = placement[ep_rank % tp::tp]
    replicas = dict(replicas or {})
    with torch.device("meta"):
        for i, layer in model.model.layers.items():
            layer.block_sparse_moe = ExpertParallelMoE(config, owned, group, dispatch,
                                                       reduce_group, mine, crossover,
                                                       replicas.get(int(i), ()))
    return model


def join_expert_collectives(model: Llama, dtype: torch.dtype) -> None:
    """This rank's share of a step it has no tokens for: zero rows through every
    token-local MoE block of the stage, in layer order, so the collectives of the
    other data-parallel replicas' ranks (which have tokens) complete."""
    for layer in model.model.layers.values():
        moe = layer.block_sparse_moe
        if isinstance(moe, ExpertParallelMoE) and moe.dispatch in TOKEN_LOCAL:
            moe(torch.empty(0, model.config.hidden_size, dtype=dtype,
                            device=moe.gate.weight.device))


def expert_parallel_pass(config: ModelConfig, group: Group, ep_rank: int, ep_size: int,
                         dispatch: str = "replicated",
                         before: Callable[[Llama], object] | None = None,
                         reduce_group: Group = None,
                         placement: Sequence[Sequence[int]] | None = None,
                         crossover: int = 0,
                         replicas: Mapping[int, Sequence[int]] | None = None) -> dict:
    """The ``prepare`` keyword of ``runtime.stage.build_stage`` for this EP rank.
    ``before`` runs first: another pass's ``prepare``, such as the tensor-parallel pass's
    (whose MoE blocks this pass replaces; the caller passes its shard_fn and num_kv_heads
    too). ``reduce_group``, ``placement``, ``crossover``, ``replicas``: see
    apply_expert_parallel and the module docstring."""
    expert_shares(config.num_experts, ep_size)  # refuse a bad ep before any load

    def prepare(model: Llama) -> None:
        if before is not None:
            before(model)
        apply_expert_parallel(model, group, ep_rank, ep_size, dispatch,
                              reduce_group=reduce_group, placement=placement,
                              crossover=crossover, replicas=replicas)
    return dict(prepare=prepare)
