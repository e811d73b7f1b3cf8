"""Process groups: one small object per parallel dimension, like vLLM's GroupCoordinator.

The world is the (dp, pp, tp) grid of :mod:`llamadist.distributed.grid` (TP innermost).
Each dimension gets a :class:`Group` with a *device* group (NCCL on GPU, gloo on CPU) for
tensors and a *CPU* gloo group for metadata and control, so a small header never waits
behind a GPU kernel and a dead peer is noticed by gloo's socket even when NCCL would hang.
Nothing here is global state: :class:`ParallelGroups` is built once and passed explicitly.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llamadist.config import DEFAULT_TIMEOUT_S, default_devices
from llamadist.distributed.grid import coords, cp_index, grid_size, group_ranks

log = logging.getLogger(__name__)

# Generous limit for waits that may legitimately be long (weights loading on another rank,
# a chat user typing): a dead peer still fails them at once, through the closed socket.
CONTROL_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class Group:
    """This rank's view of one group: global ranks in order, and the two process groups."""
    name: str
    ranks: list[int]
    rank: int  # global rank of this process
    device_group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def rank_in_group(self) -> int:
        return self.ranks.index(self.rank)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def first_rank(self) -> int:
        return self.ranks[0]

    @property
    def next_rank(self) -> int:
        """Global rank after this one (wrapping: the last stage's next is the first)."""
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank_in_group - 1) % self.world_size]


@dataclass
class DistContext:
    """What torchrun (or our launcher) told this process, and the device it computes on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # of the device groups: "nccl" or "gloo"


class ParallelGroups:
    """The pp, tp and dp groups of this rank, plus a world-wide CPU ``control`` group
    (requests, results, statistics) with a long timeout. ``expert_parallel`` adds the
    ``ep`` group: the tp x dp ranks of this rank's stage, which share its experts
    (llamadist.parallel.expert); every rank must pass the same value. ``cp`` > 1 adds
    the ``cp`` groups (the ranks that split each long request's sequence, one per stage
    and TP index) and ``stage`` (the cp x tp ranks of one stage of one replica, to which
    the stage's leader fans a step out)."""

    def __init__(self, ctx: DistContext, pp: int, tp: int = 1, dp: int = 1,
                 timeout: float = DEFAULT_TIMEOUT_S, expert_parallel: bool = False,
                 cp: int = 1):
        nproc, pp = grid_size(ctx.world_size, pp, tp, dp, cp)
        self.ctx, self.pp_size, self.tp_size, self.dp_size = ctx, pp, tp, dp
        self.cp_size = cp
        self.rank = ctx.rank
        self.dp_index, self.pp_index, self.tp_index = coords(ctx.rank, pp, tp, dp, cp)
        self.cp_index = cp_index(ctx.rank, tp, cp)
        limit = datetime.timedelta(seconds=timeout)
        self.timeout = timeout
        # new_group is collective over the whole world: every rank creates every group, in
        # the same order, and keeps the one it belongs to.
        self.groups: dict[str, Group] = {}
        dims = ("tp", "pp", "dp") + (("ep",) if expert_parallel else ()) + \
            (("cp", "stage") if cp > 1 else ())
        for dim in dims:
            for ranks in group_ranks(dim, pp, tp, dp, cp):
                dev = dist.new_group(ranks, timeout=limit, backend=ctx.backend)
                cpu = dist.new_group(ranks, timeout=limit, backend="gloo")
                if ctx.rank in ranks:
                    self.groups[dim] = Group(dim, ranks, ctx.rank, dev, cpu)
        self.control = dist.new_group(list(range(nproc)), timeout=CONTROL_TIMEOUT,
                                      backend="gloo")
        # The engine's step messages between the front (rank 0) and every replica's ranks:
        # point to point, apart from the control group's collectives.
        self.steps = Group("steps", list(range(nproc)), ctx.rank, None,
                           dist.new_group(list(range(nproc)), timeout=limit, backend="gloo"))
        log.info("rank %d: dp %d/%d, pp %d/%d, cp %d/%d, tp %d/%d on %s", ctx.rank,
                 self.dp_index, dp, self.pp_index, pp, self.cp_index, cp, self.tp_index, tp,
                 ctx.device)

    @property
    def pp(self) -> Group:
        return self.groups["pp"]

    @property
    def tp(self) -> Group:
        return self.groups["tp"]

    @property
    def dp(self) -> Group:
        return self.groups["dp"]

    @property
    def cp(self) -> Group:
        if "cp" not in self.groups:
            raise RuntimeError("no context-parallel group: build ParallelGroups with cp > 1")
        return self.groups["cp"]

    @property
    def stage(self) -> Group:
        """The ranks a step is fanned out to at this stage: cp x tp (the TP group when
        cp == 1)."""
        return self.groups.get("stage", self.groups["tp"])

    @property
    def ep(self) -> Group:
        if "ep" not in self.groups:
            raise RuntimeError("no expert-parallel group: build ParallelGroups with "
                               "expert_parallel=True")
        return self.groups["ep"]

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_driver(self) -> bool:
        """Global rank 0 (first stage, tp 0, replica 0): reads input, prints output."""
        return self.rank == 0

    def named(self) -> dict[tuple[str, str], dist.ProcessGroup]:
        """Every process group of this rank by (dimension, "device" | "cpu"): the names
        under which ``unbind_groups`` remembers a module's group across worlds."""
        out = {("control", "cpu"): self.control, ("steps", "cpu"): self.steps.cpu_group}
        for dim, g in self.groups.items():
            out[(dim, "device")], out[(dim, "cpu")] = g.device_group, g.cpu_group
        return {k: pg for k, pg in out.items() if pg is not None}

    def describe(self) -> str:
        cp = f" cp {self.cp_index}" if self.cp_size > 1 else ""
        return (f"rank {self.rank} = dp {self.dp_index} pp {self.pp_index}{cp} tp "
                f"{self.tp_index} on {self.ctx.device}")


# The attributes through which a module keeps a process group: the tensor-parallel linears,
# embedding and head (parallel.tensor), the expert blocks (parallel.expert).
GROUP_ATTRS = ("group", "reduce_group")
Bound = list[tuple[nn.Module, str, tuple[str, str]]]


def unbind_groups(model: nn.Module, groups: ParallelGroups) -> Bound:
    """Take every process group of ``groups`` out of ``model``'s modules (set to None) and
    say where each was, by name (``ParallelGroups.named``), for ``rebind_groups``. A
    survivor of a lost peer (runtime.worker.Session.rejoin) must drop every reference to
    the broken world's groups: gloo closes a group's sockets only when it is freed, which
    is what fails a peer still blocked on this rank. A group that is none of ``groups``'
    is refused: it could not be found again in the next world."""
    names = {id(pg): key for key, pg in groups.named().items()}
    bound: Bound = []
    for module in model.modules():
        for attr in GROUP_ATTRS:
            pg = getattr(module, attr, None)
            if not isinstance(pg, dist.ProcessGroup):
                continue  # absent, None, or another meaning of the name (a quant group)
            if id(pg) not in names:
                raise ValueError(f"{type(module).__name__}.{attr} holds a process group that "
                                 f"is not one of {groups.describe()}'s")
            bound.append((module, attr, names[id(pg)]))
    for module, attr, _ in bound:
        setattr(module, attr, None)
    return bound


def rebind_groups(bound: Bound, groups: ParallelGroups) -> None:
    """Give the modules ``unbind_groups`` emptied the groups of the same names in the new
    world ``groups`` (the same grid, so the same names exist and hold the same ranks)."""
    named = groups.named()
    missing = sorted({key for _, _, key in bound} - set(named))
    if missing:
        raise ValueError(f"the new world has no {missing} group(s) for the stage's modules")
    for module, attr, key in bound:
        setattr(module, attr, named[key])


def init_distributed(timeout: float = DEFAULT_TIMEOUT_S,
                     device: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). ``device``: "cuda" asks for cuda:LOCAL_RANK
    (falls back to CPU with a warning when CUDA is absent); anything else means CPU.
    More local ranks than GPUs (a test on one GPU) share them round-robin; NCCL refuses two
    ranks on one GPU, so tensors then travel through host memory over gloo."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or default_devices(processes=True)
    kinds = {d.strip().split(":")[0] for d in device.split(",") if d.strip()}
    if len(kinds) > 1:
        raise ValueError(f"--devices {device} mixes device kinds; over processes give one kind "
                         "(cpu, or cuda: each rank takes cuda:LOCAL_RANK), or run a mixed list "
                         "such as cuda:0,cpu in one process (without --nproc/--pp)")
    want_cuda = bool(device) and "cuda" in device
    if want_cuda and not torch.cuda.is_available():
        log.warning("rank %d: CUDA asked for but not available; running on CPU", rank)
        want_cuda = False
    if want_cuda:
        n_gpus = torch.cuda.device_count()
        dev = torch.device("cuda", local_rank % n_gpus)
        torch.cuda.set_device(dev)
        backend = "nccl"
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > n_gpus:
            log.warning("rank %d: %s local ranks share %d GPU(s); stage messages go through "
                        "host memory (gloo), not NCCL", rank, os.environ["LOCAL_WORLD_SIZE"],
                        n_gpus)
            backend = "gloo"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    # NVLink SHARP multicast stays off: it needs fabric features the hosts may lack.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        # Joining waits for every rank; a slow host start is allowed the control timeout.
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=max(timeout, 300.0)),
                                **kwargs)
    return DistContext(rank, world, local_rank, dev, backend)
