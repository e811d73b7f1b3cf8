"""One rank's worker session: join the world, build the groups, agree on the layout, load this
rank's stage (a ``StageRank``), and exchange setup and results with rank 0 over the control
group (the steps themselves travel as runtime.stage_rank describes).

Rank 0 alone decides (plans the layout, tokenizes, validates, picks the sampling seed) and
broadcasts; every other rank follows, so planning that discovers free memory cannot give
two ranks two different layouts.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from llamadist.config import DEFAULT_TIMEOUT_S, RuntimeConfig
from llamadist.distributed.faults import PeerError, Watchdog
from llamadist.distributed.groups import ParallelGroups, init_distributed
from llamadist.parallel.expert import expert_parallel_pass, hot_experts, read_expert_load
from llamadist.parallel.tensor import tensor_parallel_pass
from llamadist.planning.cost import ep_auto_crossover
from llamadist.planning.profile import profile
from llamadist.runtime.compiled_layer import load_done
from llamadist.runtime.stage import Stage, build_stage, build_tp_stage, parse_dtype
from llamadist.runtime.stage_rank import StageRank
from llamadist.weights.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def setup_worker_logging(rank: int, verbose: bool) -> None:
    """Rank-tagged records on stderr; INFO only from rank 0 unless LLAMADIST_LOG_ALL_RANKS."""
    all_ranks = os.environ.get("LLAMADIST_LOG_ALL_RANKS") == "1"
    level = logging.INFO if verbose and (rank == 0 or all_ranks) else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    fmt = f"[rank {rank} %(relativeCreated)d ms] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)


@dataclass(frozen=True)
class RankSpec:
    """What every rank must agree on before loading (rank 0 decides and broadcasts)."""
    layer_ranges: tuple[tuple[int, int], ...]  # half-open, one per pipeline stage
    dtype: str
    runtime: RuntimeConfig  # rank 0's, max_seq_len resolved
    num_blocks: int         # paged KV blocks per stage (the same block ids on every stage)
    block_size: int
    ep: int = 1             # ranks a stage's experts spread over (> tp: across replicas)
    # with ep > tp: the experts each EP rank d * tp + t owns (the front's planning.experts.
    # run_shares, e.g. by memory); () = the even shares
    expert_shares: tuple[tuple[int, ...], ...] = ()


def build_rank_stage(ckpt: Checkpoint, spec: RankSpec, groups: ParallelGroups,
                     progress: bool = False) -> Stage:
    """Build and load only this rank's stage (and only its TP shard of it, and its share of
    the experts), with the kernels ``spec.runtime`` asks for and no static KV cache (the
    paged one comes next)."""
    start, stop = spec.layer_ranges[groups.pp_index]
    rt = spec.runtime
    kw = dict(has_embed=groups.pp_index == 0, has_head=groups.pp_index == groups.pp_size - 1,
              lanes=0, progress=progress, runtime=rt)
    dtype, device = parse_dtype(spec.dtype), groups.ctx.device
    if spec.ep > groups.tp_size:  # experts over the stage's tp x dp ranks (TP x DP = EP)
        replicas = (hot_experts(read_expert_load(rt.expert_load, ckpt.config.num_experts),
                                rt.hot_experts) if rt.hot_experts else None)
        kw.update(grid_expert_pass(ckpt.config, groups, spec.ep, rt.ep_dispatch, spec.dtype,
                                   replicas, spec.expert_shares or None))
        return build_stage(ckpt, range(start, stop), device, dtype, rt.max_batch,
                           rt.max_seq_len, **kw)
    if groups.tp_size > 1:
        return build_tp_stage(ckpt, range(start, stop), device, dtype, rt.max_batch,
                              rt.max_seq_len, groups.tp.device_group, groups.tp_index,
                              groups.tp_size, **kw)
    return build_stage(ckpt, range(start, stop), device, dtype, rt.max_batch, rt.max_seq_len,
                       **kw)


def grid_expert_pass(config, groups: ParallelGroups, ep: int, dispatch: str = "auto",
                     dtype: str = "bfloat16", replicas: dict | None = None,
                     shares: tuple | None = None) -> dict:
    """build_stage's keywords for rank (dp d, tp t) of a stage whose experts spread over
    all its tp x dp ranks: attention tensor-parallel within the replica (when tp > 1), the
    expert shares ``d * tp + t`` of ``ep``, tokens dispatched over the DP group as
    ``dispatch`` says (RuntimeConfig.ep_dispatch; "auto" by planning.cost.
    ep_auto_crossover) and the partial sums added over the TP group (parallel.expert);
    ``replicas``: {layer: hot experts every rank holds too}; ``shares``: the experts of
    every EP rank (planning.experts.run_shares, e.g. by memory; None: the even shares),
    which the dispatch routes by (each expert to its owner, not E / ep arithmetic)."""
    if ep != groups.tp_size * groups.dp_size:
        raise ValueError(f"ep={ep} spans replicas, so it must be tp x dp = "
                         f"{groups.tp_size * groups.dp_size}")
    crossover = 0
    if dispatch == "auto":
        kind = "gpu" if groups.ctx.device.type == "cuda" else "cpu"
        crossover = ep_auto_crossover(profile(config, dtype), groups.dp_size, kind)
    tp = tensor_parallel_pass(config, groups.tp.device_group, groups.tp_index,
                              groups.tp_size) if groups.tp_size > 1 else {}
    return {**tp, **expert_parallel_pass(
        config, groups.dp.device_group, groups.dp_index * groups.tp_size + groups.tp_index,
        ep, dispatch, before=tp.get("prepare"),
        reduce_group=groups.tp.device_group if groups.tp_size > 1 else None,
        crossover=crossover, replicas=replicas,
        placement=None if shares is None else [list(s) for s in shares])}


@dataclass
class Session:
    groups: ParallelGroups
    watchdog: Watchdog
    timeout: float
    rank_stage: StageRank | None = None

    @classmethod
    def start(cls, pp: int | None = None, tp: int = 1, dp: int = 1,
              timeout: float = DEFAULT_TIMEOUT_S,
              device: str | None = None, cp: int = 1) -> "Session":
        ctx = init_distributed(timeout, device)
        groups = ParallelGroups(ctx, pp, tp, dp, timeout, cp=cp)
        return cls(groups, Watchdog(ctx.rank, timeout), timeout)

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def is_driver(self) -> bool:
        return self.groups.is_driver

    def broadcast(self, obj: Any, what: str = "the next request") -> Any:
        """Rank 0's ``obj`` on every rank (others pass None). No deadline: a chat user may
        think for minutes; a dead rank 0 still fails it at once (closed socket)."""
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.groups.control)
        except RuntimeError as e:
            raise PeerError(0, f"lost a peer while waiting for {what}: "
                               f"{str(e).splitlines()[0][:160]}") from e
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.groups.world_size if self.is_driver else None
        # No deadline either: a data-parallel replica may finish long before another.
        try:
            dist.gather_object(obj, out, dst=0, group=self.groups.control)
        except RuntimeError as e:
            raise PeerError(-1, f"lost a peer while gathering results: "
                                f"{str(e).splitlines()[0][:160]}") from e
        return out

    def barrier(self, what: str) -> None:
        """Every rank here (control group: no deadline, a dead rank still fails it)."""
        try:
            dist.barrier(group=self.groups.control)
        except RuntimeError as e:
            raise PeerError(-1, f"lost a peer while waiting for {what}: "
                                f"{str(e).splitlines()[0][:160]}") from e

    def load(self, ckpt: Checkpoint, spec: RankSpec, progress: bool = False,
             record_logits: bool = False, front_link: Any = None) -> StageRank:
        """Build this rank's stage (only its layers, only its TP shard) with its paged KV
        cache, ready to run steps. ``front_link``: the front's connection when the front
        is not rank 0 (distributed.link.WorkerLink)."""
        if len(spec.layer_ranges) != self.groups.pp_size:
            raise ValueError(f"{len(spec.layer_ranges)} stages planned for "
                             f"pp={self.groups.pp_size}")
        stage = build_rank_stage(ckpt, spec, self.groups, progress=progress)
        load_done()  # the weights are in: the host's switch interval as it was
        log.info("%s: layers [%d, %d) loaded", self.groups.describe(), stage.layers.start,
                 stage.layers.stop)
        self.rank_stage = StageRank(self.groups, stage, spec.runtime, self.timeout,
                                    self.watchdog, record_logits=record_logits,
                                    front_link=front_link)
        self.rank_stage.init_paged(spec.num_blocks, spec.block_size)
        # Loading times differ by stage; --timeout bounds a step, not a slow neighbour's load.
        self.barrier("every rank to load its stage")
        return self.rank_stage

    def rejoin(self, port: int) -> None:
        """After a lost peer (gloo: cli.rejoin): leave the broken world and form a new one
        on rendezvous ``port`` with the restarted worker, same rank, same grid. This rank's
        stage keeps its weights (its TP shard) and its KV cache memory (whose contents the
        replay recomputes); only its links, and the groups its TP modules hold, are new
        (StageRank.leave / rejoin). Returns when every rank of the new world has its stage
        (the new worker's ``load`` barrier)."""
        g = self.groups
        grid, device = (g.pp_size, g.tp_size, g.dp_size, g.cp_size), g.ctx.device.type
        # Every reference to the old groups goes first: gloo closes a group's sockets only
        # when the group is freed, and that is what fails a survivor still blocked on
        # this rank (one whose own peer is alive), so it follows at once.
        self.rank_stage.leave()
        self.groups = g = None
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - the world is broken anyway
            log.debug("destroy_process_group after a lost peer: %s", e)
        gc.collect()
        os.environ["MASTER_PORT"] = str(port)
        ctx = init_distributed(self.timeout, device)
        self.groups = ParallelGroups(ctx, grid[0], grid[1], grid[2], self.timeout,
                                     cp=grid[3])
        self.rank_stage.rejoin(self.groups)
        self.barrier("every rank to load its stage")

    def close(self) -> None:
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - shutting down; nothing to recover
            log.debug("destroy_process_group: %s", e)
