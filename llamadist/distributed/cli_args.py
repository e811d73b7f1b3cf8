"""Command-line flags for running over processes (kept free of torch imports: the CLI
parser must stay fast to build)."""

from __future__ import annotations

import argparse
import os

DEFAULT_TIMEOUT_S = 60.0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_grid_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("processes (pipeline over torch.distributed)")
    g.add_argument("--pp", type=positive_int, help="pipeline stages, one process each (default: "
                   "nproc / (tp x dp))")
    g.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks per stage")
    g.add_argument("--dp", type=positive_int, default=1, help="data-parallel replicas")
    return g


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = add_grid_args(p)
    g.add_argument("--nproc", type=positive_int, help="start this many local worker processes "
                   "(default: pp x tp x dp); not needed under torchrun")
    g.add_argument("--micro-batches", type=int, help="micro-batches in flight through the "
                   "pipeline (default: the number of stages, at most one per prompt)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a rank waits for a silent peer before every process exits "
                   f"(default {DEFAULT_TIMEOUT_S:.0f})")


def wants_distributed(args: argparse.Namespace) -> bool:
    """Run over processes: asked for on the command line, or started by torchrun."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    sizes = (getattr(args, "nproc", None), getattr(args, "pp", None), getattr(args, "tp", 1),
             getattr(args, "dp", 1))
    return any((v or 1) > 1 for v in sizes)


def launch_workers(kind: str, args: argparse.Namespace) -> int:
    """From the user's shell: check the grid, then start the local workers, which rerun
    this command line as ranks. Torch is never imported here (a faster start)."""
    from llamadist.distributed.grid import grid_size
    from llamadist.distributed.launch import launch
    nproc, _ = grid_size(args.nproc, args.pp, args.tp, args.dp)  # refuse a bad grid early
    if getattr(args, "shape", None) or isinstance(getattr(args, "batch", 0), list):
        raise ValueError("--shape and lists of batch sizes run in one process; drop "
                         "--nproc/--pp/--tp/--dp")
    argv = getattr(args, "argv", None)
    if argv is None:
        raise ValueError("cannot start workers: the command line is unknown (use torchrun)")
    return launch(["-m", "llamadist", *argv], nproc, stdin_to_rank0=kind == "chat")


def in_worker() -> bool:
    """True inside a process started by torchrun or by the local launcher."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
