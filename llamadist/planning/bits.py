"""Bits per stage: when a model does not fit its devices in its dtype, choose each device's
weight format (--quantize) so that it does, as little quantized as possible.

The ladder is none -> int8 -> int4 (``LADDER``): int8 is the 8-bit format every device kind
runs (GPUs: int8 codes, one scale a row; the CPU: GGUF Q8_0 blocks); fp8 has int8's bytes on
a GPU, so it never fits where int8 does not and is left to an explicit --quantize. Every
device of one name gets one format, because a run's --quantize is keyed by device.

Search, least aggressive first: assignments of ladder steps to devices are taken in tiers of
(most aggressive step used, how many devices use it, sum of steps); the first tier with an
assignment that fits (the strategy's split, every stage within its budget after headroom)
wins, and inside it the one that quantizes the fewest decoder layers (weighted by step),
then the one that quantizes the slowest devices (quantizing a slow device also cuts the
bytes it reads per step). The cost reported is bytes only: bytes saved per layer and in
total, predicted by the one cost model. Quality is not predicted; measure it with
``llamadist perplexity MODEL --quantize FMT``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from llamadist.config import QUANTIZE_HEAD_ALONE, ConfigError, parse_quantize
from llamadist.planning.checks import plan_problems
from llamadist.planning.devices import DeviceSpec
from llamadist.planning.plan import KIND_FORMATS, Plan, format_problem
from llamadist.planning.profile import ModelProfile, layer_bytes, quantized_profile
from llamadist.planning.units import PlanningError, format_bytes

LADDER: tuple[str | None, ...] = (None, "int8", "int4")   # least to most aggressive
MAX_GROUPS = 6   # devices searched one by one; more are grouped by kind (3^6 assignments)


@dataclass(frozen=True)
class BitsChoice:
    """The plan that fits and, per stage, the format chosen (None: the profile's dtype)."""

    plan: Plan
    formats: tuple[str | None, ...]
    tried: int                      # assignments costed


def _groups(devices: Sequence[DeviceSpec]) -> list[list[int]]:
    """Stage indices that must share a format: one device name each (by kind past
    MAX_GROUPS names, so the search stays small)."""
    by_name: dict[str, list[int]] = {}
    for i, d in enumerate(devices):
        by_name.setdefault(d.name, []).append(i)
    if len(by_name) <= MAX_GROUPS:
        return list(by_name.values())
    by_kind: dict[str, list[int]] = {}
    for i, d in enumerate(devices):
        by_kind.setdefault(d.kind, []).append(i)
    return list(by_kind.values())


def _check_ladder(devices: Sequence[DeviceSpec]) -> None:
    for d in devices:
        allowed = KIND_FORMATS.get(d.kind, ())
        if not all(f in allowed for f in LADDER if f):
            raise PlanningError(f"device {d.name} ({d.kind}) runs {', '.join(allowed) or 'no'} "
                                f"quantized formats; choosing bits needs int8 and int4")


def _tiers(n_groups: int) -> list[list[tuple[int, ...]]]:
    """Every assignment of ladder steps to groups, in tiers of equal aggressiveness
    (top step, groups at it, sum of steps), least aggressive first."""
    tiers: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}
    for a in itertools.product(range(len(LADDER)), repeat=n_groups):
        top = max(a)
        tiers.setdefault((top, a.count(top) if top else 0, sum(a)), []).append(a)
    return [tiers[k] for k in sorted(tiers)]


def check_fit_bits(quantize: str | None, auto: bool = False) -> None:
    """--fit-bits chooses the formats itself: refuse an explicit --quantize beside it (the
    same words for `plan` and the run commands)."""
    if quantize is not None:
        what = "the weight format" if auto else "each device's weight format"
        raise PlanningError(f"--fit-bits chooses {what}: drop --quantize {quantize} (or "
                            f"drop --fit-bits)")


def choose_bits(profile: ModelProfile, devices: Sequence[DeviceSpec],
                strategy: str | None = None, one_format: bool = False,
                **plan_kw: Any) -> BitsChoice:
    """The least aggressive formats per device that make ``strategy``'s plan fit
    (``plan_kw``: make_plan's keywords, e.g. batch_size, max_seq_len, headroom, tp).
    ``one_format``: every stage gets the same format (stages over processes, each rank
    on its own device, take one --quantize). Raises PlanningError with the numbers when
    even int4 everywhere does not fit."""
    from llamadist.planning.strategies import make_plan   # strategies imports checks, plan
    devices = list(devices)
    _check_ladder(devices)
    groups = [list(range(len(devices)))] if one_format else _groups(devices)
    # slowest first: rank 0 is the slowest group (quantizing it is preferred)
    speed = [min(devices[i].mem_bandwidth for i in g) for g in groups]
    rank = {g: r for r, g in enumerate(sorted(range(len(groups)), key=lambda j: speed[j]))}
    tried = 0

    def attempt(a: tuple[int, ...]) -> Plan | None:
        nonlocal tried
        tried += 1
        formats = [None] * len(devices)
        for g, step in zip(groups, a):
            for i in g:
                formats[i] = LADDER[step]
        # The default strategy's even split would quantize more layers than needed: the
        # speed- and memory-aware split keeps the fewest layers on slow (quantized) devices.
        how = "mixed" if strategy is None and any(formats) else strategy
        try:
            plan = make_plan(profile, devices, how, formats=formats, **plan_kw)
        except PlanningError:
            return None
        return None if plan_problems(plan) else plan

    top = (len(LADDER) - 1,) * len(groups)
    if attempt(top) is None:
        raise _refusal(profile, devices, strategy, plan_kw)
    for tier in _tiers(len(groups)):
        fits = [(a, p) for a, p in ((a, attempt(a)) for a in tier) if p is not None]
        if fits:
            a, plan = min(fits, key=lambda ap: (_quantized_layers(ap[1]),
                                                sum(s * rank[g] for g, s in enumerate(ap[0]))))
            return BitsChoice(plan, tuple(s.weight_format for s in plan.stages), tried)
    raise AssertionError("the all-int4 assignment fitted but no tier did")  # unreachable


def _quantized_layers(plan: Plan) -> int:
    """Decoder layers quantized, each weighted by its ladder step (int4 counts twice)."""
    return sum(s.num_layers * LADDER.index(s.weight_format) for s in plan.stages)


def _refusal(profile: ModelProfile, devices: Sequence[DeviceSpec], strategy: str | None,
             plan_kw: dict[str, Any]) -> PlanningError:
    """Even int4 everywhere does not fit: say by how much (the memory strategy's
    shortfall message, which names the device, its need and its budget)."""
    from llamadist.planning.strategies import make_plan
    int4 = [LADDER[-1]] * len(devices)
    total = sum(layer_bytes(r, LADDER[-1], "cuda", profile.bytes_per_param)
                for r in profile.layers)
    try:  # the memory strategy raises the closest split's shortfall, with its numbers
        make_plan(profile, devices, "memory", formats=int4,
                  **{k: v for k, v in plan_kw.items() if k != "boundaries"})
        problems = plan_problems(make_plan(profile, devices, strategy, formats=int4, **plan_kw))
        why = (f"{problems[0] if problems else 'no split'} (the {strategy} split; "
               f"--strategy memory or mixed would fit in int4)")
    except PlanningError as e:
        why = str(e)
    return PlanningError(
        f"the model does not fit these devices ({', '.join(d.name for d in devices)}) even "
        f"with every decoder layer in int4 (decoder layers {format_bytes(total)} in int4 "
        f"against {format_bytes(sum(r.weight_bytes for r in profile.layers))} in "
        f"{profile.dtype}; embedding and head stay {profile.dtype}): {why}; give more "
        f"devices or memory (--max-memory), a shorter --max-seq-len or a smaller "
        f"--batch-size")


def bits_report(plan: Plan, profile: ModelProfile, devices: Sequence[DeviceSpec]) -> list[str]:
    """Per stage: its format, the bytes a decoder layer takes and saves in it, the bytes the
    stage saves and holds; then the totals. Bytes only: no accuracy is predicted."""
    row, nbytes = profile.layers[0], profile.bytes_per_param
    # a quantized checkpoint under --weights native: its layers as the run holds them
    stored = "as --weights native holds it" if profile.has_stored else profile.dtype
    lines, saved_all = [], 0
    for s, d in zip(plan.stages, devices):
        if s.weight_format is None:
            lines.append(f"stage {s.index} ({s.device}, layers {s.start}..{s.end - 1}): "
                         f"{stored}, not quantized; weights {format_bytes(s.weight_bytes)}")
            continue
        per = [layer_bytes(r, None, d.kind, nbytes)
               - layer_bytes(r, s.weight_format, d.kind, nbytes)
               for r in profile.layers[s.start:s.end]]
        saved_all += sum(per)
        q = layer_bytes(row, s.weight_format, d.kind, nbytes)
        lines.append(f"stage {s.index} ({s.device}, layers {s.start}..{s.end - 1}): "
                     f"{s.weight_format}, {format_bytes(q)} per decoder layer instead of "
                     f"{format_bytes(layer_bytes(row, None, d.kind, nbytes))} {stored} "
                     f"({format_bytes(per[0])} saved per "
                     f"layer, {format_bytes(sum(per))} over its {s.num_layers} layers); "
                     f"weights {format_bytes(s.weight_bytes)}")
    total = sum(s.weight_bytes for s in plan.stages)
    quantized = sum(s.num_layers for s in plan.stages if s.weight_format)
    lines.append(f"bits: {quantized} of {plan.num_layers} decoder layers quantized, "
                 f"{format_bytes(saved_all)} saved; weights {format_bytes(total)} in all "
                 f"(predicted bytes; quality is not predicted: measure it with llamadist "
                 f"perplexity MODEL --quantize ...)")
    return lines


def quantize_spec(plan: Plan) -> str | None:
    """The --quantize value that runs ``plan``'s formats ("cuda:0=none,cpu=int8"; None
    when no stage is quantized)."""
    if not any(s.weight_format for s in plan.stages):
        return None
    seen: dict[str, str] = {}
    for s in plan.stages:
        seen.setdefault(s.device, s.weight_format or "none")
    return ",".join(f"{d}={f}" for d, f in seen.items())


def auto_fit_bits(profile: ModelProfile, devices: Sequence[DeviceSpec] | None,
                  kinds: Sequence[str], head: bool = False,
                  **auto_kw: Any) -> tuple[str | None, list]:
    """The auto planner over formats: the first of LADDER (one format for every device)
    whose profile some layout fits, and that layout's candidates. ``kinds``: the device
    kinds present (each format's bytes are the largest of theirs); ``head``
    (--quantize-head): the head in that format too."""
    from llamadist.planning.auto import auto_plan
    last: PlanningError | None = None
    for fmt in LADDER:
        try:
            return fmt, auto_plan(quantized_profile(profile, fmt, kinds, head), devices,
                                  **auto_kw)
        except PlanningError as e:
            last = e
    raise PlanningError(f"even with every decoder layer in int4 {last}")


def auto_profile(profile: ModelProfile, quantize: str | None, kinds: Sequence[str],
                 head: bool = False) -> tuple[ModelProfile, str | None]:
    """(the profile the auto planner costs, the format) under ``--quantize`` (the spec as
    given): one format for every device, since the planner costs one profile for all of
    them, so a per-device spec is refused; a format a device kind cannot run is refused
    too. ``head`` (--quantize-head): the head in that format too (refused without one)."""
    if quantize is None:   # as stored (a quantized checkpoint's own formats) or dtype
        if head:
            raise PlanningError(QUANTIZE_HEAD_ALONE)
        return quantized_profile(profile, None, kinds), None
    try:
        table = parse_quantize(quantize)
    except ConfigError as e:
        raise PlanningError(str(e)) from None
    if set(table) != {"*"}:
        raise PlanningError(f"--auto with --quantize {quantize}: the automatic layout plans "
                            f"one weight format for every device; give one format "
                            f"(e.g. --quantize int4), or --fit-bits to let `plan` choose")
    fmt = table["*"]
    for kind in kinds:
        problem = format_problem(fmt, kind)
        if problem is not None:
            raise PlanningError(f"--quantize {fmt}: {problem}")
    return quantized_profile(profile, fmt, kinds, head), fmt


def auto_bits_note(profile: ModelProfile, fmt: str | None, kinds: Sequence[str]) -> str:
    """--auto --fit-bits: the one format chosen and the bytes it saves per decoder layer
    (a line of its own, starting with a newline)."""
    # a quantized checkpoint under --weights native: against its layers as stored
    held = "as --weights native holds it" if profile.has_stored else f"in {profile.dtype}"
    if fmt is None:
        return f"\nbits: the model fits {held}; no layer quantized"
    row, nbytes = profile.layers[0], profile.bytes_per_param
    q = max(layer_bytes(row, fmt, k, nbytes) for k in kinds)
    base = max(layer_bytes(row, None, k, nbytes) for k in kinds)
    return (f"\nbits: it does not fit {held}; every decoder layer in {fmt}: "
            f"{format_bytes(q)} per layer instead of {format_bytes(base)} "
            f"({format_bytes(base - q)} saved per layer, "
            f"{format_bytes((base - q) * profile.num_layers)} in all; predicted "
            f"bytes, quality is not predicted: measure it with llamadist perplexity)")
