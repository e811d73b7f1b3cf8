"""From placement flags to a checked Layout, in the front process, before any worker starts
or any weight loads: the process grid, the model's divisibility, the layer split and every
stage's memory, or the auto planner's choice."""

from __future__ import annotations

import argparse
import os
import sys

from llamadist.cli.args import grid_flags, in_worker
from llamadist.config import ModelConfig, RuntimeConfig, default_devices
from llamadist.planning.checks import GridError, check_ep, check_grid
from llamadist.planning.experts import ExpertPlacement
from llamadist.planning.layout import Layout, resolve_layout, stage_devices
from llamadist.planning.plan import Plan
from llamadist.planning.units import PlanningError

LAYOUT_ENV = "LLAMADIST_LAYOUT"  # the front process's Layout, handed to the workers it starts


def auto_layout(config: ModelConfig, args: argparse.Namespace, runtime: RuntimeConfig,
                max_seq_len: int, batch: int) -> Layout:
    """`--auto`: the planner's best tp x pp x dp and layer split for --devices (with
    --fit-bits, and the one weight format it fits in, as `plan --auto --fit-bits`
    chooses it; the Layout's ``why`` then ends with the bits line `plan` prints)."""
    from llamadist.planning.auto import auto_plan
    from llamadist.planning.bits import (auto_bits_note, auto_fit_bits, auto_profile,
                                         check_fit_bits)
    from llamadist.planning.devices import check_devices_present, parse_devices
    from llamadist.planning.profile import profile
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
    kw = dict(objective="latency", batch_size=batch, max_seq_len=max_seq_len, config=config,
              top=1)
    note = ""
    if getattr(args, "fit_bits", False):
        check_fit_bits(runtime.quantize, auto=True)
        fmt, cands = auto_fit_bits(prof, specs, kinds, **kw)
        note = auto_bits_note(prof, fmt, kinds)
    else:
        # the weights as the run will load them (--quantize: one format for every device)
        prof, fmt = auto_profile(prof, runtime.quantize, kinds)
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
                  max_seq_len: int, batch: int) -> Layout:
    """The run's layout from its flags; every check that can fail does so here."""
    if getattr(args, "auto", False):
        layout = auto_layout(config, args, runtime, max_seq_len, batch)
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
    nproc, pp, tp, dp = check_grid(config, nproc, pp, tp, dp, cp)
    ep = check_ep(config, tp, dp, ep)
    experts = check_expert_flags(args, config, ep, tp)   # hot replicas: counted per rank
    fit_bits = getattr(args, "fit_bits", False)
    placement = dict(strategy=args.strategy, max_memory=args.max_memory,
                     device_speed=args.device_speed, boundaries=args.boundaries, plan=args.plan,
                     max_seq_len=max_seq_len, quantize=runtime.quantize, fit_bits=fit_bits,
                     experts=experts)
    if nproc == 1:  # the engine keeps at most runtime.max_batch sequences resident
        layout = resolve_layout(config, devices=args.devices,
                                max_batch=min(batch, runtime.max_batch),
                                dtype=runtime.dtype_for(args.devices or default_devices()),
                                **placement)
        return _said(layout, fit_bits)
    wanted = args.devices or (",".join(Plan.load(args.plan).devices) if args.plan
                              else default_devices(processes=True))
    given = [d.strip() for d in wanted.split(",") if d.strip()]
    if len({d.split(":")[0] for d in given}) > 1:
        raise PlanningError(f"--devices {wanted} mixes device kinds; over processes give one "
                            f"kind (cpu, or cuda: each rank takes cuda:LOCAL_RANK), or run a "
                            f"mixed list such as cuda:0,cpu in one process (without "
                            f"--nproc/--pp/--tp/--dp)")
    names = stage_devices(wanted, pp, gpus=cuda_count() if "cuda" in given[0] else None)
    # over processes every rank takes one --quantize: --fit-bits gives all stages one format
    placed = _said(resolve_layout(config, devices=names, max_batch=-(-batch // dp), tp=tp,
                                  cp=cp, ep=ep, dtype=runtime.dtype_for(names),
                                  one_format=True, **placement), fit_bits)
    if placed.pp != pp:
        raise PlanningError(f"the plan has {placed.pp} stages but the grid has {pp} pipeline "
                            f"stages (--pp)")
    # A bare kind (--devices cuda) stays bare: each rank then takes cuda:LOCAL_RANK.
    devices = placed.devices if len(given) == pp else tuple(given * pp)
    return Layout(placed.layer_ranges, devices, tp, dp, nproc, placed.why, plan=placed.plan,
                  cp=cp, ep=ep)


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
    for flag in ("ep_dispatch", "hot_experts"):
        if getattr(args, flag, None):
            name = "--" + flag.replace("_", "-")
            raise GridError(f"{name} {getattr(args, flag)} goes with experts spread over "
                            f"data-parallel replicas, which --auto does not plan (each "
                            f"replica keeps its experts, ep = tp): drop {name}, or give --dp "
                            f"and --ep tp x dp instead of --auto")


def check_expert_flags(args: argparse.Namespace, config: ModelConfig, ep: int,
                       tp: int) -> ExpertPlacement | None:
    """--ep-dispatch and --hot-experts need experts spread over replicas (ep > tp); the
    --expert-load file is read and checked here, before any process starts. Returns the
    experts each EP rank will hold with its hot replicas (planning.experts.
    ExpertPlacement), for the planner to count; None without --hot-experts."""
    for flag in ("ep_dispatch", "hot_experts"):
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
                         getattr(args, "expert_load", None))
