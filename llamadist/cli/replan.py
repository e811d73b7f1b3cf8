"""``--on-failure replan``: after a lost worker, plan its replica again over the devices
that remain (one pipeline stage fewer: its tp x cp ranks' device slot is gone; over CPU
processes a device is a rank slot), with the same planner and checks as at the start, so
a layout that no longer fits is refused with the planner's reason.

With --dp the plan is the lost replica's alone: its requests move to the live replicas at
once (the front's fail-over), it is re-planned over its own devices left and started in
the background, and rejoins with fewer stages than the others (every replica keeps the
same KV blocks, which the engine's schedulers share the shape of). Where nothing is left
to re-plan (a one-stage replica) or the model no longer fits, that replica stays down
with the reason and the others serve on; the run fails only when no replica is left."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from llamadist.cli.jobs import Job
from llamadist.cli.layout import held_weights
from llamadist.config import ModelConfig
from llamadist.planning.layout import Layout, resolve_layout
from llamadist.planning.units import PlanningError


@dataclass
class Recovery:
    """One recovery, its phases in seconds (detect: from the lost worker's last sign of
    life to the front's decision; restart: new processes started and connected; reload:
    rendezvous and weights loaded; warmup: the restarted replica's CUDA graphs captured,
    0 on CPUs; replay: until every interrupted request had its next token again).
    ``layout``: the stages after a replan (``--on-failure replan``)."""
    replica: int
    cause: str
    detect_s: float = 0.0
    restart_s: float = 0.0
    reload_s: float = 0.0
    warmup_s: float = 0.0
    replay_s: float | None = None
    replayed: int = 0
    moved: int = 0  # requests moved to live replicas (data parallel)
    kept: int = 0  # workers that kept their stage and rejoined (cli.rejoin)
    detected_at: float = 0.0  # wall clock (time.time) of the decision
    layout: str | None = None


def check_replan(layout: Layout) -> None:
    """Refuse ``--on-failure replan`` where it cannot apply, before anything starts."""
    if layout.lockstep:
        raise PlanningError("--on-failure replan re-plans one replica while the others "
                            "serve; with the experts spread over the replicas (--ep > tp) "
                            "none can run without the others")


def replan(job: Job, args: argparse.Namespace, config: ModelConfig, lost_stage: int) -> Job:
    """``job`` with the pipeline planned again without stage ``lost_stage``'s device: one
    stage fewer, the layers split again by the run's strategy, every stage checked
    against its device's budget (PlanningError with the reason when nothing fits)."""
    lay, rt = job.layout, job.runtime
    if lay.pp < 2:
        raise PlanningError(f"no device is left for the model (it ran on {lay.pp} stage)")
    devices = [d for i, d in enumerate(lay.devices) if i != lost_stage]
    bare = len(set(lay.devices)) == 1 and ":" not in lay.devices[0]  # each rank its own
    names = [f"{d}:{i}" if bare and d == "cuda" else d for i, d in enumerate(devices)]
    def without_lost(flag: str | None) -> str | None:  # per-device lists lose its entry
        parts = flag.split(",") if flag else []
        return ",".join(p for i, p in enumerate(parts) if i != lost_stage) \
            if len(parts) == lay.pp else flag
    try:
        placed = resolve_layout(config, devices=names, max_batch=rt.max_batch, tp=lay.tp,
                                cp=lay.cp, ep=lay.ep, dtype=rt.dtype_for(names),
                                strategy=getattr(args, "strategy", None),
                                max_memory=without_lost(getattr(args, "max_memory", None)),
                                device_speed=without_lost(getattr(args, "device_speed", None)),
                                max_seq_len=job.max_seq_len, quantize=rt.quantize,
                                quantize_head=rt.quantize_head,
                                held=held_weights(getattr(args, "model", None), rt.weights,
                                                  dtype=rt.dtype_for(names)))
    except PlanningError as e:
        raise PlanningError(f"the model no longer fits the {len(names)} device(s) left: "
                            f"{e}") from None
    kept = tuple(devices) if not bare else (lay.devices[0],) * len(devices)
    new = Layout(placed.layer_ranges, kept, lay.tp, lay.dp,
                 lay.processes // lay.pp * placed.pp, why=f"re-planned without stage "
                 f"{lost_stage}", plan=placed.plan, cp=lay.cp, ep=lay.ep)
    return replace(job, layout=new)
