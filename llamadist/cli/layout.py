"""From placement flags to a checked Layout, in the front process, before any worker starts
or any weight loads: the process grid, the model's divisibility, the layer split and every
stage's memory, or the auto planner's choice."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

from llamadist.cli.args import grid_flags, in_worker
from llamadist.config import ModelConfig, RuntimeConfig, default_devices
from llamadist.planning.checks import GridError, check_ep, check_grid
from llamadist.planning.experts import ExpertPlacement
from llamadist.planning.layout import Layout, resolve_layout, stage_devices
from llamadist.planning.plan import Plan
from llamadist.planning.units import PlanningError

LAYOUT_ENV = "LLAMADIST_LAYOUT"  # the front process's Layout, handed to the workers it starts


def held_weights(model: str | None, weights: str, ckpt=None,
                 dtype: str | None = None) -> dict | None:
    """--weights native (``weights``): per device kind, the bytes a run holds of each
    tensor it keeps in the checkpoint's own formats (weights.loader.native_bytes), which
    the planner counts (profile.native_profile); None for --weights float*, a checkpoint
    with no quantized tensor, or a named shape with no checkpoint of that name here
    (`plan smollm2-135m` counts the installed GGUF). ``ckpt``: the opened checkpoint,
    else ``model`` is opened; ``dtype``: the run's (a float checkpoint's 16-bit linears
    stay 16-bit on a CPU stage of a float32 run)."""
    from llamadist.config import NAMED_SHAPES
    if weights != "native" or (ckpt is None and model is None):
        return None
    from llamadist.weights.loader import held_bytes
    if ckpt is None:
        from llamadist.weights.checkpoint import open_checkpoint
        try:
            ckpt = open_checkpoint(model)
        except (ValueError, OSError):
            if model in NAMED_SHAPES:   # a shape only: planned in its dtype
                return None
            raise
    return held_bytes(ckpt, weights, dtype)


def auto_layout(config: ModelConfig, args: argparse.Namespace, runtime: RuntimeConfig,
                max_seq_len: int, batch: int, held: dict | None = None) -> Layout:
    """`--auto`: the planner's best tp x pp x dp and layer split for --devices (with
    --fit-bits, and the one weight format it fits in, as `plan --auto --fit-bits`
    chooses it; the Layout's ``why`` then ends with the bits line `plan` prints).
    ``held``: held_weights', the checkpoint's own formats counted in their bytes."""
    from llamadist.planning.auto import auto_plan
    from llamadist.planning.bits import (auto_bits_note, auto_fit_bits, auto_profile,
                                         check_fit_bits)
    from llamadist.planning.devices import check_devices_present, parse_devices
    from llamadist.planning.profile import native_profile, profile
    if in_worker():
        raise PlanningError("--auto chooses the number of processes itself: start llamadist "
                            "without torchrun (or give --pp/--tp/--dp instead of --auto)")
    refuse_expert_flags_with_auto(args)
    refuse_chosen_flags_with_auto(args)
    devices = args.devices or default_devices()
    check_devices_present([d.strip() for d in devices.split(",") if d.strip()])
    specs = parse_devices(devices, args.max_memory, args.device_speed)
    kinds = sorted({s.kind for s in specs})
    prof = profile(config, dtype=runtime.dtype_for(devices), seq_len=max_seq_len)
    if held:
        prof = native_profile(prof, held)
    kw = dict(objective="latency", batch_size=batch, max_seq_len=max_seq_len, config=config,
              top=1)
    note = ""
    if getattr(args, "fit_bits", False):
        check_fit_bits(runtime.quantize, auto=True)
        fmt, cands = auto_fit_bits(prof, specs, kinds, runtime.quantize_head, **kw)
        note = auto_bits_note(prof, fmt, kinds)
    else:
        # the weights as the run will load them (--quantize: one format for every device)
        prof, fmt = auto_profile(prof, runtime.quantize, kinds, runtime.quantize_head)
        cands = auto_plan(prof, specs, **kw)
    best = cands[0]
    nproc = best.num_devices
    used = [s.devices[0] for s in best.stages]
    kinds = {d.split(":")[0] for d in used}
    why = best.why
    if len(kinds) > 1 and best.tp == best.dp == 1:
        # A pipeline over mixed device kinds runs in one process (one backend per group).
        nproc, why = 1, why + " (mixed device kinds: the stages run in one process)"
    elif len(kinds) > 1:
        raise PlanningError(f"--auto chose tp={best.tp} dp={best.dp} over mixed device kinds "
                            f"({', '.join(used)}), which needs one kind per process group: "
                            f"give --devices of one kind")
    elif nproc > 1:
        used = [kinds.pop()] * len(used)  # each rank takes its own device (cuda:LOCAL_RANK)
    if nproc == 1 and len(specs) > 1 and len(kinds) == 1:
        why += f" (one process: it predicts the fastest step for {len(specs)} devices)"
    return Layout(tuple(range(s.start, s.end) for s in best.stages), tuple(used), best.tp,
                  best.dp, nproc, why + note, cp=best.cp,
                  ep=check_ep(config, best.tp, best.dp, None),
                  weight_formats=(fmt,) * len(best.stages) if fmt else ())


def decide_layout(config: ModelConfig, args: argparse.Namespace, runtime: RuntimeConfig,
                  max_seq_len: int, batch: int, ckpt=None) -> Layout:
    """The run's layout from its flags; every check that can fail does so here. The
    weights are counted as the run holds them (held_weights: ``ckpt``, else args.model)."""
    held = held_weights(getattr(args, "model", None), runtime.weights, ckpt,
                        runtime.dtype_for(args.devices or default_devices()))
    if getattr(args, "auto", False):
        layout = auto_layout(config, args, runtime, max_seq_len, batch, held)
        asked = getattr(args, "nproc", None)
        if asked is not None and asked != layout.processes:
            print(f"--auto: running {layout.processes} process(es), not --nproc {asked}: the "
                  f"planner chose the fastest layout that fits --devices", file=sys.stderr)
        cp = f" cp={layout.cp}" if layout.cp > 1 else ""
        print(f"auto layout: tp={layout.tp}{cp} pp={layout.pp} dp={layout.dp}, stages "
              f"{layout.bounds}, {layout.processes} process(es): {layout.why}", file=sys.stderr)
        return layout
    pp, tp, dp, ep = grid_flags(args)
    cp = getattr(args, "cp", 1)
    # Under torchrun the world is already there: its size is the process count.
    nproc = int(os.environ["WORLD_SIZE"]) if in_worker() else getattr(args, "nproc", None)
    nproc, pp, tp, dp = check_grid(config, nproc, pp, tp, dp, cp, world=in_worker())
    ep = check_ep(config, tp, dp, ep)
    # hot replicas and uneven shares (--expert-split, budgets per EP rank): counted per rank
    ranked = ep_ranks(args, config, pp, tp, ep)
    experts = ranked.placement
    fit_bits = getattr(args, "fit_bits", False)
    placement = dict(strategy=args.strategy, max_memory=ranked.max_memory,
                     device_speed=args.device_speed, boundaries=args.boundaries, plan=args.plan,
                     max_seq_len=max_seq_len, quantize=runtime.quantize, fit_bits=fit_bits,
                     quantize_head=runtime.quantize_head,
                     experts=experts, held=held)
    if nproc == 1:  # the engine keeps at most runtime.max_batch sequences resident
        layout = resolve_layout(config, devices=args.devices,
                                max_batch=min(batch, runtime.max_batch),
                                dtype=runtime.dtype_for(args.devices or default_devices()),
                                **placement)
        return _said(layout, fit_bits)
    wanted = ranked.devices or (",".join(Plan.load(args.plan).devices) if args.plan
                                else default_devices(processes=True))
    given = [d.strip() for d in wanted.split(",") if d.strip()]
    if len({d.split(":")[0] for d in given}) > 1:
        raise PlanningError(f"--devices {wanted} mixes device kinds; over processes give one "
                            f"kind (cpu, or cuda: each rank takes cuda:LOCAL_RANK), or run a "
                            f"mixed list such as cuda:0,cpu in one process (without "
                            f"--nproc/--pp/--tp/--dp)")
    if cp > 1 and len(given) > 1 and len(given) != pp:
        kind = given[0].split(":")[0]
        raise PlanningError(f"--devices {wanted} with --cp {cp}: context parallelism always "
                            f"runs over processes, one per CP rank, each on its own device; "
                            f"give --nproc {nproc} and --devices {kind} (one kind for every "
                            f"rank), or one device per pipeline stage ({pp})")
    names = stage_devices(wanted, pp, gpus=cuda_count() if "cuda" in given[0] else None)
    # over processes every rank takes one --quantize: --fit-bits gives all stages one format
    dtype = runtime.dtype_for(names)
    run = dict(devices=names, max_batch=-(-batch // dp), tp=tp, cp=cp, ep=ep, dtype=dtype,
               one_format=True)
    if ranked.budgets is not None:   # budgets per EP rank: shares by the room for experts
        first = resolve_layout(config, **run, **placement)
        experts = ranked_placement(args, config, ranked, first.plan, ep, tp, dtype,
                                   max_seq_len)
        placement["experts"] = experts
    placed = _said(resolve_layout(config, **run, **placement), fit_bits)
    if placed.pp != pp:
        raise PlanningError(f"the plan has {placed.pp} stages but the grid has {pp} pipeline "
                            f"stages (--pp)")
    if ranked.budgets is not None:
        check_rank_budgets(placed.plan, config, experts or ExpertPlacement.build(
            config.num_experts, ep, tp=tp), ranked.budgets, dtype, max_seq_len)
    # A bare kind (--devices cuda) stays bare: each rank then takes cuda:LOCAL_RANK.
    devices = placed.devices if len(given) == pp else tuple(given * pp)
    shares = tuple(experts.shares) if experts is not None and ep > tp else ()
    return Layout(placed.layer_ranges, devices, tp, dp, nproc, placed.why, plan=placed.plan,
                  cp=cp, ep=ep, expert_shares=shares)


def _said(layout: Layout, fit_bits: bool) -> Layout:
    """--fit-bits: print the formats chosen per stage (the lines `plan --fit-bits` prints)."""
    if fit_bits and layout.why:
        print(layout.why, file=sys.stderr)
    return layout


def cuda_count() -> int:
    """GPUs on this machine (a run on CUDA needs at least one)."""
    import torch
    n = torch.cuda.device_count()
    if n == 0:
        raise PlanningError("--devices cuda but this machine has no CUDA device; use --devices "
                            "cpu")
    return n


def refuse_chosen_flags_with_auto(args: argparse.Namespace) -> None:
    """--auto chooses the grid and the layer split itself: flags that say them (and plan's
    --plot, which draws one strategy's stages) would be ignored, so they are refused."""
    given = [flag for flag, on in (
        ("--strategy", getattr(args, "strategy", None)),
        ("--boundaries", getattr(args, "boundaries", None)),
        ("--plan", getattr(args, "plan", None)), ("--pp", getattr(args, "pp", None)),
        ("--tp", getattr(args, "tp", 1) > 1), ("--cp", getattr(args, "cp", 1) > 1),
        ("--dp", getattr(args, "dp", None)), ("--ep", getattr(args, "ep", None)),
        ("--plot", getattr(args, "plot", None))) if on]
    if given:
        raise GridError(f"--auto chooses tp x pp x dp and the layer split itself: drop "
                        f"{', '.join(given)}, or drop --auto and give the layout yourself")


def refuse_expert_flags_with_auto(args: argparse.Namespace) -> None:
    """The auto planner keeps each replica's experts to itself (ep = tp): flags for
    experts spread over replicas would be ignored, so they are refused."""
    for flag in ("ep_dispatch", "hot_experts", "expert_split"):
        if getattr(args, flag, None):
            name = "--" + flag.replace("_", "-")
            raise GridError(f"{name} {getattr(args, flag)} goes with experts spread over "
                            f"data-parallel replicas, which --auto does not plan (each "
                            f"replica keeps its experts, ep = tp): drop {name}, or give --dp "
                            f"and --ep tp x dp instead of --auto")


def check_expert_flags(args: argparse.Namespace, config: ModelConfig, ep: int,
                       tp: int, budgets: list[float] | None = None,
                       split: str | None = None) -> ExpertPlacement | None:
    """--ep-dispatch, --hot-experts and --expert-split need experts spread over replicas
    (ep > tp); the --expert-load file is read and checked here, before any process starts.
    Returns the experts each EP rank will hold (its share by planning.experts.run_shares:
    --expert-split, or ``split``, over ``budgets``, one per EP rank, and its hot replicas),
    for the planner to count and the ranks to load; None for the even shares without
    replicas."""
    for flag in ("ep_dispatch", "hot_experts", "expert_split"):
        if getattr(args, flag, None) and ep <= tp:
            name = "--" + flag.replace("_", "-")
            raise GridError(f"{name} {getattr(args, flag)} goes with experts spread over "
                            f"data-parallel replicas (--ep tp x dp, dp > 1); here ep={ep} "
                            f"with tp={tp}: each replica keeps its experts to itself. Drop "
                            f"{name}, or give --dp and --ep {tp} x dp")
    if getattr(args, "hot_experts", None):
        from llamadist.parallel.expert import read_expert_load
        read_expert_load(args.expert_load, config.num_experts)
    from llamadist.planning.experts import run_placement
    return run_placement(config.num_experts, ep, tp, getattr(args, "hot_experts", None),
                         getattr(args, "expert_load", None), budgets,
                         split or getattr(args, "expert_split", None))


class EpRanks(NamedTuple):
    """ep_ranks' answer: the stages' --devices and --max-memory as the planner takes them
    (one entry per stage), each stage's budget per EP rank (None: not given per rank) and
    the experts every EP rank holds (None: the even shares, no replicas); with budgets per
    rank, the even shares (and hot replicas) of a first plan: ranked_placement then
    gives the run's."""
    devices: str | None
    max_memory: str | None
    budgets: list[list[int]] | None
    placement: ExpertPlacement | None


def ep_ranks(args: argparse.Namespace, config: ModelConfig, pp: int | None, tp: int,
             ep: int) -> EpRanks:
    """--devices and --max-memory may name each EP rank of every stage when the experts
    spread over replicas (ep > tp): pp x ep entries, stage by stage, EP rank d * tp + t
    within one (``--devices cpu,cpu --max-memory 300MB,150MB`` with --nproc 2 --ep 2).
    The planner then sees one device per stage with its largest rank budget, the shares
    follow --expert-split (ranked_placement, after a first plan) and each rank is checked
    against its own budget (check_rank_budgets)."""
    devices, memory = args.devices, args.max_memory
    names = [d.strip() for d in (devices or "").split(",") if d.strip()]
    budgets = None
    entries = [m.strip() for m in memory.split(",")] if memory else []
    if pp and ep > max(tp, 1) and len(entries) == pp * ep:
        from llamadist.planning.devices import parse_memory
        if any(m.lower() in ("", "auto") for m in entries):
            raise PlanningError(f"--max-memory {memory}: budgets per EP rank must all be "
                                f"given (no 'auto' entries)")
        flat = [parse_memory(m) for m in entries]
        budgets = [flat[i * ep:(i + 1) * ep] for i in range(pp)]
        memory = ",".join(str(max(b)) for b in budgets)
    if pp and ep > max(tp, 1) and len(names) == pp * ep:
        stages = [names[i * ep:(i + 1) * ep] for i in range(pp)]
        if any(len(set(s)) > 1 for s in stages):
            raise PlanningError(f"--devices {devices}: the EP ranks of one stage name "
                                f"different devices; each rank takes its own device of "
                                f"one kind (give cpu or cuda for each)")
        devices = ",".join(s[0] for s in stages)
    if budgets is not None and getattr(args, "expert_split", None) is None \
            and len({b for stage in budgets for b in stage}) == 1:
        budgets = None   # alike: the even shares, the stages' budgets as given
    if budgets is None:
        return EpRanks(devices, memory, None, check_expert_flags(args, config, ep, tp))
    # the first plan's placement: the even shares, with the hot replicas
    first = check_expert_flags(args, config, ep, tp, [1] * ep, "even")
    return EpRanks(devices, memory, budgets, first)


def ranked_placement(args: argparse.Namespace, config: ModelConfig, ranked: EpRanks,
                     plan: Plan, ep: int, tp: int, dtype: str,
                     max_seq_len: int) -> ExpertPlacement | None:
    """The run's experts per EP rank (planning.experts.run_placement with --expert-split)
    given each rank's room for experts: its budget less the stage's headroom and what
    every rank of the stage holds alike (``plan``: a first plan with ranked.placement),
    per MoE layer, the smallest over the stages (one placement serves every stage)."""
    from llamadist.planning.profile import profile
    from llamadist.planning.units import format_bytes
    rows = profile(config, dtype=dtype, seq_len=max_seq_len).layers
    moe = [i for i, r in enumerate(rows) if r.num_experts]
    first = ranked.placement or ExpertPlacement.build(config.num_experts, ep, tp=tp)
    per = rows[moe[0]].expert_bytes / rows[moe[0]].num_experts if moe else 0.0
    rooms = [float("inf")] * ep
    for i, (stage, have) in enumerate(zip(plan.stages, ranked.budgets)):
        layers = [layer for layer in moe if stage.start <= layer < stage.end]
        if not layers:
            continue
        alike = stage.memory_bytes - max(sum(r) for r in first.counts(layers)) * per
        keep = stage.headroom_bytes / stage.budget_bytes if stage.budget_bytes else 0.0
        for r, budget in enumerate(have):
            room = budget * (1 - keep) - alike
            if room <= 0:
                raise PlanningError(
                    f"stage {i} EP rank {r}: its --max-memory {format_bytes(budget)} (less "
                    f"{keep:.0%} headroom) leaves no room for experts after the "
                    f"{format_bytes(alike)} every rank of the stage holds")
            rooms[r] = min(rooms[r], room / len(layers))
    if not moe or rooms[0] == float("inf"):
        return ranked.placement
    return check_expert_flags(args, config, ep, tp, rooms)


def check_rank_budgets(plan: Plan, config: ModelConfig, placement: ExpertPlacement,
                       budgets: list[list[int]], dtype: str, max_seq_len: int) -> None:
    """Every EP rank of every stage against its own budget (less the stage's headroom
    fraction): the stage's planned memory (its busiest rank's) less the experts that rank
    holds fewer than the busiest."""
    from llamadist.planning.profile import profile
    from llamadist.planning.units import format_bytes
    rows = profile(config, dtype=dtype, seq_len=max_seq_len).layers
    moe = [i for i, r in enumerate(rows) if r.num_experts]
    if not moe:
        return
    per = rows[moe[0]].expert_bytes / rows[moe[0]].num_experts
    for i, (stage, have) in enumerate(zip(plan.stages, budgets)):
        layers = [layer for layer in moe if stage.start <= layer < stage.end]
        held = [sum(row) for row in placement.counts(layers)]
        keep = stage.headroom_bytes / stage.budget_bytes if stage.budget_bytes else 0.0
        for r, budget in enumerate(have):
            need = stage.memory_bytes - (max(held) - held[r]) * per
            if need > budget * (1 - keep):
                each = held[r] // max(1, len(layers))
                raise PlanningError(
                    f"stage {i} EP rank {r}: needs {format_bytes(need)} ({each} experts per "
                    f"layer) but its --max-memory {format_bytes(budget)} leaves "
                    f"{format_bytes(budget * (1 - keep))} after {keep:.0%} headroom; "
                    f"shares {[len(s) for s in placement.shares]} experts per rank (give "
                    f"a larger --max-memory or more EP ranks; --expert-split memory, the "
                    f"default for budgets that differ, shares them by each rank's room)")
