"""Checks that refuse a request before any process starts or any weight loads: a layout the
model cannot take, and a plan whose stages do not fit their devices. Pure: the run
commands, ``plan`` and ``plan --auto`` all call these, so they refuse the same things with
the same words. Each message is one line naming the problem and the fix.
"""

from __future__ import annotations

from llamadist.config import ModelConfig
from llamadist.planning.plan import Plan, Stage
from llamadist.planning.tp_shapes import TensorParallelError, check_tp
from llamadist.planning.units import PlanningError, format_bytes


# ---- the process grid ----------------------------------------------------
class GridError(PlanningError):
    """A (pp, tp, dp, cp) grid that does not fit the number of processes."""


def _grid(tp: int, dp: int, cp: int, pp: int | None = None) -> str:
    """The grid's factors as messages name them (cp only when used: old words kept)."""
    return (f"pp={pp} x " if pp is not None else "") + f"tp={tp} x " + \
        (f"cp={cp} x " if cp != 1 else "") + f"dp={dp}"


def _procs(nproc: int, world: bool) -> str:
    """Where the process count came from, as messages name it: --nproc, or under torchrun
    its WORLD_SIZE (the user gave no --nproc to llamadist)."""
    return (f"WORLD_SIZE {nproc} (torchrun's --nproc-per-node x --nnodes)" if world
            else f"--nproc {nproc}")


def _start(n: int, world: bool) -> str:
    """How to run ``n`` processes: --nproc, or torchrun's own flags."""
    return (f"start torchrun with {n} processes in all (--nproc-per-node x --nnodes)"
            if world else f"give --nproc {n}")


def grid_size(nproc: int | None, pp: int | None, tp: int, dp: int,
              cp: int = 1, world: bool = False) -> tuple[int, int]:
    """-> (nproc, pp), filling in whichever was not given, or raise GridError. ``world``:
    ``nproc`` is torchrun's WORLD_SIZE, not a --nproc (messages name it so)."""
    for name, v in (("tp", tp), ("dp", dp), ("cp", cp), ("pp", pp), ("nproc", nproc)):
        if v is not None and v < 1:
            raise GridError(f"--{name} must be >= 1, got {v}")
    if pp is None:
        if nproc is None:
            return tp * dp * cp, 1
        if nproc % (tp * dp * cp):
            raise GridError(f"{_procs(nproc, world)} does not divide by {_grid(tp, dp, cp)}"
                            f" = {tp * dp * cp}: {_start(tp * dp * cp, world)} or a "
                            f"multiple of it")
        pp = nproc // (tp * dp * cp)
    total = pp * tp * dp * cp
    if nproc is not None and nproc != total:
        raise GridError(f"{_procs(nproc, world)} with {_grid(tp, dp, cp, pp)} = {total}: "
                        f"the grid must multiply to the number of processes")
    return total, pp


def grid_problems(num_layers: int, nproc: int | None, pp: int, tp: int = 1, dp: int = 1,
                  config: ModelConfig | None = None, cp: int = 1,
                  world: bool = False) -> list[str]:
    """Why a grid of ``pp`` stages x ``tp`` x ``cp`` x ``dp`` on ``nproc`` processes (None:
    not given) cannot run a model of ``num_layers`` layers; [] when it can. ``config``
    adds the tensor-parallel head checks (parallel.tensor's rules); ``world``: ``nproc``
    is torchrun's WORLD_SIZE."""
    problems = [f"--{name} must be >= 1, got {v}"
                for name, v in (("pp", pp), ("tp", tp), ("dp", dp), ("cp", cp),
                                ("nproc", nproc))
                if v is not None and v < 1]
    if problems:
        return problems
    total = pp * tp * dp * cp
    if nproc is not None and nproc != total:
        problems.append(f"{_procs(nproc, world)} but {_grid(tp, dp, cp, pp)} = {total}: "
                        f"{_start(total, world)} or a grid that multiplies to {nproc}")
    if pp > num_layers:
        problems.append(f"{pp} pipeline stages but the model has only {num_layers} layers "
                        f"(a stage holds at least one): use --pp {num_layers} or fewer")
    if config is not None and tp > 1:
        try:
            check_tp(config, tp)
        except TensorParallelError as e:
            problems.append(str(e))
    return problems


def check_grid(config: ModelConfig, nproc: int | None, pp: int | None, tp: int = 1,
               dp: int = 1, cp: int = 1, world: bool = False) -> tuple[int, int, int, int]:
    """-> (nproc, pp, tp, dp) with ``nproc`` or ``pp`` filled in when not given, or raise
    PlanningError naming every problem (tp against the heads, pp against the layers,
    nproc against pp x tp x cp x dp; ``world``: nproc is torchrun's WORLD_SIZE)."""
    if pp is None:  # filled in from nproc (GridError when it does not divide)
        _, pp = grid_size(nproc, None, tp, dp, cp, world)
    problems = grid_problems(config.num_layers, nproc, pp, tp, dp, config, cp, world)
    if problems:
        raise PlanningError("; ".join(problems))
    return pp * tp * dp * cp, pp, tp, dp


def grid_dp(tp: int, dp: int | None, ep: int | None) -> int:
    """--dp when given; else ``ep / tp`` when --ep asks for more ranks than --tp (the
    experts then span data-parallel replicas: TP x DP = EP), else 1."""
    if dp is not None:
        return dp
    if ep is None or ep <= tp:
        return 1
    if ep % tp:
        raise GridError(f"--ep {ep} is not a multiple of --tp {tp}: the experts of a stage "
                        f"spread over its tp x dp ranks, so give --ep {tp} x (replicas)")
    return ep // tp


def check_ep(config: ModelConfig, tp: int, dp: int, ep: int | None) -> int:
    """The ranks one stage's experts are spread over. ``ep`` None: the default, tp for a
    mixture-of-experts model with at least one expert per TP rank (parallel.tensor), else 1
    (experts whole). Given (--ep), it must be tp (each replica spreads its own experts
    over its TP ranks) or tp x dp (every rank of a stage holds a share: the data-parallel
    replicas step together), and at most the model's experts per layer."""
    if ep is None:
        return tp if config.is_moe and 1 < tp <= config.num_experts else 1
    if ep < 1:
        raise GridError(f"--ep must be >= 1, got {ep}")
    if ep > 1 and not config.is_moe:
        raise PlanningError(f"--ep {ep}: {config.architecture} has no experts; expert "
                            f"parallelism needs a mixture-of-experts model (Mixtral): drop --ep")
    if ep not in (tp, tp * dp):
        raise GridError(f"--ep {ep} with tp={tp} x dp={dp}: the experts spread over a "
                        f"stage's tensor-parallel ranks (--ep {tp}) or over all its "
                        f"tp x dp ranks (--ep {tp * dp}, attention data-parallel)")
    if ep > config.num_experts:
        raise PlanningError(f"--ep {ep} but {config.architecture} has {config.num_experts} "
                            f"experts per layer (a rank holds at least one): give --ep "
                            f"{config.num_experts} or fewer")
    return ep


# ---- memory ----------------------------------------------------------------
def stage_problem(stage: Stage) -> str | None:
    """One line when ``stage`` needs more than its device's usable budget, else None."""
    if not stage.shortfall_bytes:
        return None
    usable = stage.budget_bytes - stage.headroom_bytes
    return (f"stage {stage.index} on {stage.device} needs {format_bytes(stage.memory_bytes)} "
            f"for layers {stage.start}..{stage.end - 1} (weights "
            f"{format_bytes(stage.weight_bytes)} + KV cache {format_bytes(stage.kv_bytes)}) "
            f"but {stage.device} has {format_bytes(usable)} usable (budget "
            f"{format_bytes(stage.budget_bytes)} less {format_bytes(stage.headroom_bytes)} "
            f"headroom): {format_bytes(stage.shortfall_bytes)} short")


def plan_problems(plan: Plan) -> list[str]:
    """One line per stage over its device's budget ([] when every stage fits or the
    budgets are unknown). ``plan`` prints these under its table, then exits non-zero."""
    return [p for p in map(stage_problem, plan.stages) if p is not None]


def check_fits(plan: Plan) -> Plan:
    """Raise PlanningError naming each stage that does not fit (device, need, budget,
    shortfall) and the ways out; return ``plan`` when all fit. The KV cache is part of
    each stage's need, so a --max-seq-len or a batch too large for the devices fails
    here with the KV bytes in the message."""
    problems = plan_problems(plan)
    if problems:
        raise PlanningError(
            f"the plan does not fit: {'; '.join(problems)} (KV cache for batch "
            f"{plan.batch_size} x {plan.max_seq_len} tokens); give a larger --max-memory, "
            f"more devices, a smaller --max-seq-len or fewer prompts at once, or --strategy "
            f"memory")
    return plan
