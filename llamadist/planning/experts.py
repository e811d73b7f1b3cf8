"""Which experts each expert-parallel rank holds, counted for planning (pure: no torch).

A stage's ``ep`` ranks split each MoE layer's experts into shares (``expert_shares``:
contiguous, the first ``E % ep`` ranks one more; or ``memory_shares``: in proportion to
what each rank's device can give them). With hot-expert replicas (``--hot-experts N
--expert-load FILE``, experts over data-parallel replicas) every rank also holds copies
of each layer's N most-loaded experts (``hot_experts``) that a rank of its tensor-parallel
index owns (parallel.expert: ``placement[ep_rank % tp::tp]``). ``ExpertPlacement`` says
what rank r holds in layer l, so the cost model counts the busiest rank's bytes (not the
average 1 / ep) and ``plan`` prints each rank's.

Which shares a run uses is decided once, by ``run_shares`` (``--expert-split even|memory``;
by default by memory when the EP ranks' ``--max-memory`` budgets differ, else even), and
``run_placement`` builds the placement the planner counts from it; the front hands the
same shares to every rank (Layout.expert_shares -> RankSpec -> the worker's grid expert
pass -> parallel.expert), so the plan and the run agree on every rank's experts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llamadist.planning.units import PlanningError, format_bytes


def expert_shares(num_experts: int, ep_size: int) -> list[list[int]]:
    """Global expert indices per EP rank: contiguous, as even as possible (the first
    ``num_experts % ep_size`` ranks one more)."""
    if not 1 <= ep_size <= num_experts:
        raise PlanningError(f"ep={ep_size} must be between 1 and the model's "
                            f"{num_experts} experts per layer")
    base, extra = divmod(num_experts, ep_size)
    return _contiguous([base + (1 if r < extra else 0) for r in range(ep_size)])


def memory_shares(num_experts: int, budgets: Sequence[float]) -> list[list[int]]:
    """Contiguous shares in proportion to ``budgets`` (the bytes each rank's device can
    give its experts), every rank at least one expert; the rounding (largest remainders)
    goes to the ranks with the most room. Devices of equal budgets get expert_shares'."""
    ep = len(budgets)
    if not 1 <= ep <= num_experts:
        raise PlanningError(f"{ep} ranks for {num_experts} experts per layer: give between "
                            f"1 and {num_experts}")
    if min(budgets) <= 0:
        raise PlanningError(f"expert budgets must be positive, got {list(budgets)}")
    total = float(sum(budgets))
    want = [num_experts * b / total for b in budgets]
    counts = [max(1, math.floor(w)) for w in want]
    while sum(counts) > num_experts:   # the floors of 1 took too many: from the most over
        r = max((r for r in range(ep) if counts[r] > 1), key=lambda r: counts[r] - want[r])
        counts[r] -= 1
    while sum(counts) < num_experts:
        r = max(range(ep), key=lambda r: (want[r] - counts[r], budgets[r], -r))
        counts[r] += 1
    return _contiguous(counts)


EXPERT_SPLITS = ("even", "memory")


def run_shares(num_experts: int, ep: int, budgets: Sequence[float] | None = None,
               split: str | None = None) -> list[list[int]]:
    """The experts each of ``ep`` ranks owns in a run (the one place that decides it):
    ``split`` "even" (expert_shares), "memory" (memory_shares over ``budgets``, one per EP
    rank) or None: by memory when ``budgets`` are given and differ, else even."""
    if split is not None and split not in EXPERT_SPLITS:
        raise PlanningError(f"--expert-split must be one of {', '.join(EXPERT_SPLITS)}, "
                            f"got {split!r}")
    if budgets is not None and len(budgets) != ep:
        raise PlanningError(f"{len(budgets)} expert budgets for ep={ep}: give one per EP "
                            f"rank")
    if split is None:
        split = "memory" if budgets is not None and len(set(budgets)) > 1 else "even"
    if split == "even":
        return expert_shares(num_experts, ep)
    if budgets is None:
        raise PlanningError(f"--expert-split memory needs each EP rank's budget: give "
                            f"--max-memory one per EP rank ({ep} per stage)")
    return memory_shares(num_experts, budgets)


def _contiguous(counts: Sequence[int]) -> list[list[int]]:
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def hot_experts(load: Mapping[int, Sequence[int]], n: int) -> dict[int, list[int]]:
    """The ``n`` most-loaded experts of each layer from per-expert token counts (the
    counters of model.moe.routing_counts, or a run's ``expert_load``; ties: the lower
    index): the replicas every rank can hold."""
    if n < 0:
        raise PlanningError(f"hot experts: n must be >= 0, got {n}")
    return {int(layer): sorted(sorted(range(len(c)), key=lambda e: (-c[e], e))[:n])
            for layer, c in load.items()}


def read_expert_load(path: str, num_experts: int) -> dict[int, list[int]]:
    """{layer: tokens per expert} from a JSON file (a run's ``expert_load``), checked."""
    try:
        with open(path) as f:
            raw = json.load(f)
        load = {int(layer): [int(c) for c in counts] for layer, counts in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise PlanningError(f"--expert-load {path}: not a JSON object of "
                            f"{{layer: [tokens per expert]}} ({e})") from e
    bad = sorted(layer for layer, counts in load.items() if len(counts) != num_experts)
    if bad:
        raise PlanningError(f"--expert-load {path}: layer(s) {bad} do not count "
                            f"the model's {num_experts} experts")
    return load


@dataclass(frozen=True)
class ExpertPlacement:
    """The experts of every EP rank of a stage. ``shares``: the experts each rank owns
    (every expert exactly once); ``hot``: (layer, experts) pairs, each layer's experts
    that ranks hold besides their share; ``tp``: the tensor-parallel ranks inside each
    data-parallel replica (rank r = d * tp + t replicates only the hot experts that a
    rank of TP index t owns, as parallel.expert does)."""

    num_experts: int
    shares: tuple[tuple[int, ...], ...]
    hot: tuple[tuple[int, tuple[int, ...]], ...] = ()
    tp: int = 1

    def __post_init__(self):
        seen = sorted(e for share in self.shares for e in share)
        if seen != list(range(self.num_experts)):
            raise PlanningError(f"expert placement {[list(s) for s in self.shares]} must hold "
                                f"each of the {self.num_experts} experts exactly once")
        if self.tp < 1 or self.ep % self.tp:
            raise PlanningError(f"expert placement over {self.ep} ranks: tp={self.tp} must "
                                f"divide it")

    @classmethod
    def build(cls, num_experts: int, ep: int, hot: Mapping[int, Sequence[int]] | None = None,
              tp: int = 1, shares: Sequence[Sequence[int]] | None = None) -> "ExpertPlacement":
        """``shares`` None: expert_shares(num_experts, ep); ``hot``: {layer: experts}."""
        shares = expert_shares(num_experts, ep) if shares is None else shares
        if len(shares) != ep:
            raise PlanningError(f"expert placement of {len(shares)} ranks for ep={ep}")
        bad = sorted({e for v in (hot or {}).values() for e in v
                      if not 0 <= e < num_experts})
        if bad:
            raise PlanningError(f"hot experts {bad}: experts are 0..{num_experts - 1}")
        return cls(num_experts, tuple(tuple(s) for s in shares),
                   tuple(sorted((int(k), tuple(sorted(set(v)))) for k, v in (hot or {}).items()
                                if v)), tp)

    @property
    def ep(self) -> int:
        return len(self.shares)

    def hot_of(self, layer: int) -> tuple[int, ...]:
        return dict(self.hot).get(layer, ())

    def held(self, rank: int, layer: int) -> tuple[int, ...]:
        """The experts rank ``rank`` holds in ``layer``: its share and its replicas."""
        own = set(self.shares[rank])
        group = {e for r in range(rank % self.tp, self.ep, self.tp) for e in self.shares[r]}
        return tuple(sorted(own | (set(self.hot_of(layer)) & group)))

    def counts(self, layers: Sequence[int]) -> list[list[int]]:
        """Experts held per rank (rows) per layer of ``layers`` (columns)."""
        return [[len(self.held(r, layer)) for layer in layers] for r in range(self.ep)]


    def describe(self, layers: Sequence[int]) -> str:
        """The busiest rank's experts per layer over ``layers``, with and without the hot
        replicas (for refusals)."""
        counts = self.counts(layers)
        r = max(range(self.ep), key=lambda r: (sum(counts[r]), -r))
        own, most = len(self.shares[r]), max(counts[r], default=0)
        return (f"EP rank {r} holds up to {most} experts per layer ({own} of its own + "
                f"{most - own} hot replicas; {max(map(len, self.shares))} at most without "
                f"replicas)")


def replicas_refusal(error: PlanningError, placement: ExpertPlacement | None,
                     num_layers: int) -> PlanningError:
    """``error`` (a plan that does not fit) saying how many experts the busiest EP rank
    holds with its hot replicas, when there are replicas; else ``error`` itself."""
    if placement is None or not placement.hot:
        return error
    return PlanningError(f"{error}; counted with the hot-expert replicas (--hot-experts): "
                         f"{placement.describe(range(num_layers))}")


def run_placement(num_experts: int, ep: int, tp: int, hot: int | None,
                  expert_load: str | None, budgets: Sequence[float] | None = None,
                  split: str | None = None) -> ExpertPlacement | None:
    """The experts a run with ``--ep ep --tp tp --hot-experts hot --expert-load FILE
    --expert-split split`` loads on each rank (the worker's grid_expert_pass: run_shares
    over the tp x dp ranks, EP rank d * tp + t with ``budgets`` in that order, each
    layer's ``hot`` busiest experts replicated), for the planner to count; None when the
    experts do not span replicas (ep <= tp: the tensor-parallel pass's even shares) or
    when the shares are the even ones and no rank holds a replica (the planner then
    counts expert_shares, the same)."""
    if ep <= tp:
        return None
    shares = run_shares(num_experts, ep, budgets, split)
    if not hot and shares == expert_shares(num_experts, ep):
        return None
    load = read_expert_load(expert_load, num_experts) if hot and expert_load else {}
    return ExpertPlacement.build(num_experts, ep, hot_experts(load, hot) if hot else None, tp,
                                 shares)


def _span(experts: Sequence[int]) -> str:
    """Contiguous expert indices as "experts 0-4" (one: "expert 5")."""
    if len(experts) == 1:
        return f"expert {experts[0]}"
    if list(experts) == list(range(experts[0], experts[-1] + 1)):
        return f"experts {experts[0]}-{experts[-1]}"
    return "experts " + ",".join(map(str, experts))


def expert_rank_lines(stages: Sequence[tuple[int, int]], placement: ExpertPlacement,
                      expert_bytes: float, moe_layers: Sequence[int]) -> list[str]:
    """`plan`'s lines: per stage [start, end) and EP rank, the experts held per layer (own
    + hot replicas) and their bytes over the stage's MoE layers (``expert_bytes``: one
    expert of one layer, ``moe_layers``: the MoE layers' indices); the busiest rank is
    the one the stage's memory counts. Shares other than the even ones (--expert-split
    memory) come first, each rank's experts by index."""
    lines = []
    if [list(s) for s in placement.shares] != expert_shares(placement.num_experts,
                                                            placement.ep):
        lines.append("expert shares per EP rank (uneven, every MoE layer): " + "; ".join(
            f"rank {r}: {_span(s)}" for r, s in enumerate(placement.shares)))
    moe = set(moe_layers)
    for i, (s, e) in enumerate(stages):
        layers = [layer for layer in range(s, e) if layer in moe]
        if not layers:
            continue
        held = placement.counts(layers)
        nbytes = [sum(row) * expert_bytes for row in held]
        busiest = max(range(placement.ep), key=lambda r: nbytes[r])
        groups: list[tuple[list[int], str]] = []   # consecutive ranks that hold alike
        for r, row in enumerate(held):
            own = len(placement.shares[r])
            extra = sum(row) - own * len(layers)
            hot = f" + {extra / len(layers):.3g} hot" if extra else ""
            what = f"{own}{hot} experts/layer, {format_bytes(nbytes[r])}"
            if groups and groups[-1][1] == what:
                groups[-1][0].append(r)
            else:
                groups.append(([r], what))
        parts = [(f"rank {g[0]}" if len(g) == 1 else f"ranks {g[0]}-{g[-1]}") + f": {what}"
                 + (" each" if len(g) > 1 else "") for g, what in groups]
        lines.append(f"experts of stage {i} (layers {s}..{e - 1}) per EP rank: "
                     f"{'; '.join(parts)} (memory counts rank {busiest}'s)")
    return lines
