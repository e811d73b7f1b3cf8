"""Which layers each rank runs: the planner's stages mapped onto the process grid.
Torch is imported only when CUDA devices must be counted (`llamadist plan` stays light)."""

from __future__ import annotations

import argparse

from llamadist.config import ModelConfig
from llamadist.distributed.grid import coords, grid_size


def stage_devices(devices: str | None, pp: int) -> list[str]:
    """The device names the planner sees, one per stage. ``--devices cuda`` (or cpu) means
    every rank uses its own cuda:LOCAL_RANK; the planner is told cuda:0..pp-1 (a single
    host's view, or identical hosts)."""
    names = [d.strip() for d in (devices or "cpu").split(",") if d.strip()]
    if len(names) == pp:
        return names
    if len(names) != 1:
        raise ValueError(f"--devices lists {len(names)} devices for --pp {pp}: give one per "
                         f"stage, or one kind (cpu or cuda) for all")
    if names[0].startswith("cuda"):
        import torch
        n = max(1, torch.cuda.device_count())
        return [f"cuda:{i % n}" for i in range(pp)]
    return [names[0]] * pp


def plan_layout(config: ModelConfig, pp: int, devices: str | None, *, strategy: str | None,
                max_memory: str | None, device_speed: str | None, boundaries: str | None,
                plan: str | None, dtype: str, max_batch: int, max_seq_len: int):
    """The api.Layout (one stage per pipeline rank) from the usual placement options."""
    from llamadist.api import resolve_layout
    layout = resolve_layout(config, devices=stage_devices(devices, pp), strategy=strategy,
                            max_memory=max_memory, device_speed=device_speed,
                            boundaries=boundaries, plan=plan, dtype=dtype, max_batch=max_batch,
                            max_seq_len=max_seq_len)
    if len(layout.layer_ranges) != pp:
        raise ValueError(f"the plan has {len(layout.layer_ranges)} stages but --pp is {pp}")
    return layout


def format_rank_table(stages: list[tuple[int, int]], devices: list[str], nproc: int | None,
                      pp: int | None, tp: int, dp: int) -> str:
    """Which global rank runs which stage (``stages``: half-open layer ranges)."""
    nproc, pp = grid_size(nproc, pp, tp, dp)
    if len(stages) != pp:
        raise ValueError(f"{len(stages)} stages planned for pp={pp}")
    lines = [f"ranks: {nproc} processes = dp {dp} x pp {pp} x tp {tp} (tp innermost)",
             f"{'rank':>5} {'dp':>3} {'pp':>3} {'tp':>3}  {'layers':>10}  {'holds':<11} device"]
    for rank in range(nproc):
        d, p, t = coords(rank, pp, tp, dp)
        start, stop = stages[p]
        extra = "+".join(x for x, on in (("embed", p == 0), ("head", p == pp - 1)) if on) or "-"
        dev = "cuda:LOCAL_RANK" if devices[p].startswith("cuda") else devices[p]
        lines.append(f"{rank:>5} {d:>3} {p:>3} {t:>3}  {f'[{start}, {stop})':>10}  "
                     f"{extra:<11} {dev}" + (f" (1/{tp} shard)" if tp > 1 else ""))
    return "\n".join(lines)


def plan_ranks_command(config: ModelConfig, args: argparse.Namespace, dtype: str,
                       max_seq: int) -> str:
    """`llamadist plan --pp N [--tp T --dp D]`: the stage table, then the rank table."""
    from llamadist.planning.commands import plan_command
    from llamadist.planning.plan import Plan
    _, pp = grid_size(getattr(args, "nproc", None), args.pp, args.tp, args.dp)
    devices = ",".join(stage_devices(args.devices, pp))
    strategy = args.strategy or ("custom" if args.boundaries else "uniform")
    common = (config, devices, args.max_memory, args.device_speed, strategy,
              args.boundaries, args.plan, args.batch_size, max_seq, dtype)
    text = plan_command(*common, args.json, args.save, args.plot)
    if args.json:
        return text
    plan = Plan.from_json(plan_command(*common, True))
    table = format_rank_table([(s.start, s.end) for s in plan.stages], list(plan.devices),
                              None, pp, args.tp, args.dp)
    return f"{text}\n\n{table}"
