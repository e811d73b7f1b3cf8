"""Partition strategies: turn a ModelProfile and one DeviceSpec per stage into a Plan.

uniform  equal layer counts, remainder to the first stages (as the seed does)
memory   minimise the largest fraction of a device's usable budget in use (so fill
         proportionally to budgets); error if some device must overflow
compute  minimise the slowest stage's predicted decode time (exact min-max DP)
mixed    like compute, but only over splits where every stage fits its budget
custom   explicit boundaries ("0:7,7:19,19:30", [(0, 7), ...]) or a saved plan file

One cost model (:mod:`llamadist.planning.cost`) serves all of them and the auto planner, so
predicted times are comparable across strategies.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Sequence

from llamadist.config import ModelConfig
from llamadist.planning.checks import grid_problems, plan_problems
from llamadist.planning.cost import CostModel, headroom_bytes
from llamadist.planning.devices import DeviceSpec
from llamadist.planning.experts import ExpertPlacement
from llamadist.planning.plan import Plan, Stage, validate_stages
from llamadist.planning.profile import ModelProfile
from llamadist.planning.units import PlanningError, format_bytes

STRATEGIES = ("uniform", "memory", "compute", "mixed", "custom")
Boundaries = str | Path | Sequence[tuple[int, int]]
_RANGES_RE = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")
_EPS = 1e-9


# ---- exact contiguous partition (DP) ----------------------------------
def partition_dp(num_layers: int, k: int, cost: Callable[[int, int, int], float],
                 bound: float | None = None) -> tuple[float, list[int]]:
    """Split layers [0, num_layers) into k non-empty contiguous stages; cost(i, s, e) is stage
    i holding [s, e) (inf = not allowed). Without ``bound``: minimise the largest stage cost.
    With ``bound``: minimise the sum of squared costs among splits whose every cost <= bound
    (the tie-break that spreads slack evenly once the bottleneck is fixed).
    Returns (objective, stage end indices); objective is inf when nothing is allowed.
    O(k * L^2) cost calls."""
    inf = math.inf
    limit = None if bound is None else bound * (1 + _EPS) + 1e-300

    def combine(prev: float, c: float) -> float:
        if limit is None:
            return max(prev, c)
        return inf if c > limit else prev + c * c

    best = [[inf] * (num_layers + 1) for _ in range(k)]
    arg = [[-1] * (num_layers + 1) for _ in range(k)]
    for e in range(1, num_layers - k + 2):
        best[0][e] = combine(0.0, cost(0, 0, e))
    for i in range(1, k):
        lo, hi = i + 1, num_layers - (k - 1 - i)
        ends = [num_layers] if i == k - 1 else range(lo, hi + 1)
        for e in ends:
            for s in range(i, e):
                if best[i - 1][s] == inf:
                    continue
                v = combine(best[i - 1][s], cost(i, s, e))
                if v < best[i][e]:
                    best[i][e], arg[i][e] = v, s
    if best[k - 1][num_layers] == inf:
        return inf, []
    ends, e = [num_layers], num_layers
    for i in range(k - 1, 0, -1):
        e = arg[i][e]
        ends.append(e)
    return best[k - 1][num_layers], ends[::-1]


def _balanced(num_layers: int, k: int, cost: Callable[[int, int, int], float]
              ) -> tuple[float, list[int]]:
    """Min-max split, then the most even split with that same bottleneck."""
    worst, ends = partition_dp(num_layers, k, cost)
    if worst == math.inf:
        return worst, ends
    _, even = partition_dp(num_layers, k, cost, bound=worst)
    return worst, even or ends


# ---- plan assembly -----------------------------------------------------
def _build_plan(profile: ModelProfile, devices: Sequence[DeviceSpec], ends: list[int],
                strategy: str, model: CostModel, headroom: float | int,
                formats: Sequence[str | None] | None = None) -> Plan:
    k, stages, start = len(devices), [], 0
    for i, (dev, end) in enumerate(zip(devices, ends)):
        first, last = i == 0, i == k - 1
        stages.append(Stage(
            index=i, start=start, end=end, device=dev.name, has_embed=first, has_head=last,
            weight_bytes=model.at(i).weight_bytes(start, end, first, last, model.tp,
                                                  model.extra_layer_bytes),
            kv_bytes=model.kv_bytes(start, end, share=model.kv_share),
            predicted_time_s=model.at(i).time(dev, start, end, first, last),
            weight_format=formats[i] if formats else None,
            budget_bytes=dev.memory_bytes, headroom_bytes=headroom_bytes(dev, headroom)))
        start = end
    plan = Plan(model=profile.model, num_layers=profile.num_layers, stages=tuple(stages),
                strategy=strategy, dtype=profile.dtype, batch_size=model.batch,
                max_seq_len=model.context)
    return plan.validate()


def _fits_cost(model: CostModel, devices: Sequence[DeviceSpec], usable: list[int]
               ) -> Callable[[int, int, int], float]:
    """Stage cost = fraction of the usable budget in use (inf when no budget is usable)."""
    k = len(devices)

    def cost(i: int, s: int, e: int) -> float:
        if usable[i] <= 0:
            return math.inf
        return model.at(i).memory(s, e, i == 0, i == k - 1) / usable[i]
    return cost


def _shortfall_error(model: CostModel, devices: Sequence[DeviceSpec], usable: list[int],
                     headroom: float | int) -> PlanningError:
    """Explain why no split fits: the worst device of the most memory-balanced split, with
    its shortfall in bytes, and how many layers would fit at all."""
    k, n = len(devices), model.profile.num_layers
    for dev, u in zip(devices, usable):
        if u <= 0:
            return PlanningError(
                f"device {dev.name} has no usable memory (budget {dev.memory_bytes} bytes, "
                f"headroom {headroom_bytes(dev, headroom)} bytes)")
    cost = _fits_cost(model, devices, usable)
    _, ends = _balanced(n, k, cost)
    worst, starts = None, [0] + ends[:-1]
    for i, (s, e) in enumerate(zip(starts, ends)):
        need = model.at(i).memory(s, e, i == 0, i == k - 1)
        if worst is None or need - usable[i] > worst[0]:
            worst = (need - usable[i], i, s, e, need)
    short, i, s, e, need = worst
    dev = devices[i]
    fit = _layers_that_fit(n, k, cost)
    fits = (f"the model fits in {fit} of {n} layers on these devices" if fit else
            f"not even one layer per device fits ({n} layers, {k} devices)")
    total = sum(model.at(j).memory(s_, e_, j == 0, j == k - 1)
                for j, (s_, e_) in enumerate(zip(starts, ends)))
    fits += (f"; in total the stages need {total} bytes and the budgets leave {sum(usable)} "
             f"bytes after headroom")
    return PlanningError(
        f"device {dev.name} (stage {i}, layers {s}..{e - 1}) needs {format_bytes(short)} more "
        f"(needs {need} bytes, budget {dev.memory_bytes} bytes, of which "
        f"{headroom_bytes(dev, headroom)} bytes are headroom for activations); {fits} "
        f"(weights {_formats(model)}, KV cache for batch {model.batch} x "
        f"{model.context} tokens)")


def _formats(model: CostModel) -> str:
    """The weights' format for messages: the dtype, or the stages' --quantize formats."""
    if model.profile.has_stored:
        return "as the checkpoint stores them (--weights native), the rest " + model.profile.dtype
    if not any(model.stage_models):
        return model.profile.dtype
    return f"{model.profile.dtype}, decoder layers in each stage's weight format"


def _layers_that_fit(n: int, k: int, cost: Callable[[int, int, int], float]) -> int:
    """Largest m <= n such that the first m layers (plus embed and head) fit, 0 if none.
    Binary search is exact because decoder layers of one model are identical, so fitting m
    layers implies fitting m - 1 (drop one layer from a stage holding two)."""
    lo, hi = k - 1, n           # invariant: fits(lo) (or lo == k - 1), not fits(hi + 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if partition_dp(mid, k, cost)[0] <= 1 + _EPS:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= k else 0


# ---- strategies --------------------------------------------------------
def uniform_ends(num_layers: int, k: int) -> list[int]:
    base, extra = divmod(num_layers, k)
    ends, end = [], 0
    for i in range(k):
        end += base + (1 if i < extra else 0)
        ends.append(end)
    return ends


def _memory_ends(model: CostModel, devices: Sequence[DeviceSpec], usable: list[int],
                 headroom: float | int) -> list[int]:
    worst, ends = _balanced(model.profile.num_layers, len(devices),
                            _fits_cost(model, devices, usable))
    if worst > 1 + _EPS:
        raise _shortfall_error(model, devices, usable, headroom)
    return ends


def _compute_ends(model: CostModel, devices: Sequence[DeviceSpec],
                  usable: list[int] | None) -> list[int]:
    """Min-max predicted time; with ``usable`` (mixed) only splits that fit are allowed."""
    k = len(devices)

    def cost(i: int, s: int, e: int) -> float:
        first, last = i == 0, i == k - 1
        if usable is not None and model.at(i).memory(s, e, first, last) > usable[i]:
            return math.inf
        return model.at(i).time(devices[i], s, e, first, last)
    return _balanced(model.profile.num_layers, k, cost)[1]   # [] when nothing fits


def parse_boundaries(text: str) -> list[tuple[int, int]]:
    """"0:7,7:19,19:30" -> [(0, 7), (7, 19), (19, 30)] (half-open layer ranges)."""
    if not _RANGES_RE.match(text):
        raise PlanningError(f"cannot parse boundaries {text!r}; expected half-open layer "
                            f"ranges start:end separated by commas, e.g. 0:7,7:19,19:30")
    return [tuple(int(x) for x in part.split(":")) for part in text.split(",")]


def _custom_ranges(boundaries: Boundaries | None, num_layers: int) -> list[tuple[int, int]]:
    if boundaries is None:
        raise PlanningError("strategy 'custom' needs boundaries (e.g. 0:7,7:19,19:30) "
                            "or a plan JSON file")
    if isinstance(boundaries, Path) or (isinstance(boundaries, str)
                                        and not _RANGES_RE.match(boundaries)
                                        and (boundaries.endswith(".json")
                                             or Path(boundaries).is_file())):
        plan = Plan.load(boundaries)
        if plan.num_layers != num_layers:
            raise PlanningError(f"plan file {boundaries} is for {plan.num_layers} layers but "
                                f"the model has {num_layers} layers")
        return list(plan.boundaries)
    if isinstance(boundaries, str):
        return parse_boundaries(boundaries)
    return [(int(s), int(e)) for s, e in boundaries]


def _custom_ends(boundaries: Boundaries | None, devices: Sequence[DeviceSpec],
                 num_layers: int) -> list[int]:
    ranges = _custom_ranges(boundaries, num_layers)
    if len(ranges) != len(devices):
        raise PlanningError(f"{len(ranges)} custom stages ({boundaries}) but {len(devices)} "
                            f"devices ({', '.join(d.name for d in devices)}); give one range "
                            f"per device")
    k = len(ranges)
    validate_stages([Stage(i, s, e, d.name, i == 0, i == k - 1)
                     for i, ((s, e), d) in enumerate(zip(ranges, devices))], num_layers)
    return [e for _, e in ranges]


def make_plan(profile: ModelProfile, devices: Sequence[DeviceSpec],
              strategy: str | None = "uniform", boundaries: Boundaries | None = None,
              batch_size: int = 1, max_seq_len: int | None = None,
              headroom: float | int = 0.1, tp: int = 1,
              config: ModelConfig | None = None, ep: int = 1, cp: int = 1,
              formats: Sequence[str | None] | None = None,
              experts: ExpertPlacement | None = None) -> Plan:
    """One stage per entry of ``devices``, in order. ``max_seq_len`` (default: the profile's
    seq_len) and ``batch_size`` size the KV cache; ``headroom`` is reserved on every device
    for activations: a float in [0, 1) is a fraction of its budget, otherwise bytes.

    ``tp`` > 1: each stage is a tensor-parallel group of ``tp`` devices like the one named,
    and every memory and time is one device's shard (``config`` says how KV heads split).
    ``ep`` > 1: a mixture-of-experts model's experts are spread over ``ep`` ranks per stage
    (each device holds 1 / ep of them; tensor parallelism keeps them whole); a stage's
    memory counts its busiest EP rank: ceil(E / ep) experts per layer, or the most that
    ``experts`` (planning.experts.ExpertPlacement: uneven shares, hot-expert replicas)
    puts on one rank.
    ``cp`` > 1: each stage's KV cache is split over ``cp`` context-parallel ranks.
    ``formats``: each stage's weight format (--quantize: int8 / int4 / fp8, None as the
    profile's dtype); memory and time count that format's bytes for the stage's layers.

    ``strategy`` None is the default a user gets: custom when ``boundaries`` are given, else
    uniform when its even split fits every budget, else mixed (speed- and memory-aware).

    memory and mixed refuse to return a plan that does not fit; uniform, compute and custom
    return it with its shortfalls so ``plan`` can show them: callers about to run pass the
    plan through :func:`llamadist.planning.checks.check_fits`."""
    if strategy is None:
        return _default_plan(profile, devices, boundaries, batch_size, max_seq_len, headroom,
                             tp, config, ep, cp, formats, experts)
    if strategy not in STRATEGIES:
        raise PlanningError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if boundaries is not None and strategy != "custom":
        raise PlanningError(f"--boundaries go with the custom strategy, not {strategy!r}: drop "
                            "--strategy or pass --strategy custom")
    devices, n = list(devices), profile.num_layers
    if not devices:
        raise PlanningError("no devices to plan for")
    problems = grid_problems(n, None, len(devices))   # the run commands' check, pp = stages
    if problems:
        raise PlanningError(f"devices {', '.join(d.name for d in devices)}: {problems[0]}")
    context = profile.seq_len if max_seq_len is None else max_seq_len
    if batch_size < 1 or context < 1:
        raise PlanningError(f"batch_size and max_seq_len must be positive, got {batch_size} "
                            f"and {context}")
    model = CostModel.build(profile, batch_size, context, tp, config, ep, cp, experts)
    if (formats and any(formats)) or profile.has_stored:
        formats = formats or [None] * len(devices)
        if len(formats) != len(devices):
            raise PlanningError(f"{len(formats)} weight formats for {len(devices)} devices")
        model = model.with_formats(formats, [d.kind for d in devices])
    usable = [d.memory_bytes - headroom_bytes(d, headroom) for d in devices]
    if strategy == "uniform":
        ends = uniform_ends(n, len(devices))
    elif strategy == "memory":
        ends = _memory_ends(model, devices, usable, headroom)
    elif strategy == "compute":
        ends = _compute_ends(model, devices, None)
    elif strategy == "mixed":
        ends = _compute_ends(model, devices, usable)
        if not ends:
            raise _shortfall_error(model, devices, usable, headroom)
    else:
        ends = _custom_ends(boundaries, devices, n)
    return _build_plan(profile, devices, ends, strategy, model, headroom, formats)


def _default_plan(profile: ModelProfile, devices: Sequence[DeviceSpec],
                  boundaries: Boundaries | None, batch_size: int, max_seq_len: int | None,
                  headroom: float | int, tp: int, config: ModelConfig | None,
                  ep: int = 1, cp: int = 1, formats: Sequence[str | None] | None = None,
                  experts: ExpertPlacement | None = None) -> Plan:
    rest = (batch_size, max_seq_len, headroom, tp, config, ep, cp, formats, experts)
    if boundaries is not None:
        return make_plan(profile, devices, "custom", boundaries, *rest)
    even = make_plan(profile, devices, "uniform", None, *rest)
    if not plan_problems(even):
        return even
    try:
        return make_plan(profile, devices, "mixed", None, *rest)
    except PlanningError:
        return even  # nothing fits: the even split, whose shortfalls callers show or refuse
