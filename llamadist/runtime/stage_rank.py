"""One rank's stage in the multi-process engine: it runs each scheduled step on its layers
and passes it on. The scheduler lives in the front process (rank 0); the ranks only
compute, in the order steps were scheduled, so their paged KV caches agree.

    front (rank 0 = replica 0's stage 0, tp 0)
      │ StepWork ──► replica k's leader (stage 0, tp 0)   [steps group, CPU]
      │               ├─ StepWork ──► its TP peers          [tp group, CPU]
      │               └─ StepWork + hidden ──► stage 1 ──► … ──► last stage
      ◄────────────── sampled tokens (tp 0 of the last stage) [steps group, CPU]

* Every message of a step travels with its ``StepWork`` (host data, a few hundred bytes
  to a few KB), so each stage builds its own ``PagedBatch`` and nothing else is shared.
* Several steps may be in flight (one per stage): a stage runs whatever arrives, in order.
* Hidden states travel on the pipeline's device group (NCCL on GPU), only forward; tokens
  and step descriptions on CPU gloo groups (see distributed.p2p).
* The stage runs through ``runtime.engine.Engine`` like one process does: the same paged
  step, the same per-bucket CUDA graphs for decode steps, the same kernels.
* END (sent by the front when it closes) travels the same paths; every rank leaves.
* An empty step (no sequences: a replica with nothing to do in a lockstep round, when
  the experts span the data-parallel replicas) travels the same paths without a hidden
  state; each rank only joins its MoE layers' collectives, and no tokens come back.
* Deadlines: while its replica has work (a STEP seen, no IDLE since), a rank waits for the
  next message at most ``timeout`` seconds, so a rank that hangs is blamed by the next one;
  after IDLE (the front sends it when the replica has nothing left) it waits as long as
  it takes (a server with no clients); a dead peer still fails the wait at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llamadist.config import RuntimeConfig
from llamadist.distributed.faults import PeerError, Watchdog, collective_lost, fault_hook
from llamadist.distributed.grid import rank_of
from llamadist.distributed.kv_direct import ACK, DIRECT, fetch, tensor_address
from llamadist.distributed.groups import ParallelGroups, rebind_groups, unbind_groups
from llamadist.distributed.p2p import P2P, Kind, Message
from llamadist.parallel.expert import join_expert_collectives
from llamadist.runtime.cp_step import CPStep, forward_cp, gather_logits
from llamadist.runtime.engine import Engine
from llamadist.runtime.stage import Stage
from llamadist.runtime.step_work import StepWork, sample_step, take_pending

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


@dataclass
class RankStats:
    steps: int = 0
    compute_s: float = 0.0  # inside the stage (device time when runtime.timed, read
                            # from CUDA events without a sync; else the host's)
    wait_s: float = 0.0     # blocked receiving: this rank's bubble

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StageRank:
    groups: ParallelGroups
    stage: Stage
    runtime: RuntimeConfig
    timeout: float
    watchdog: Watchdog | None = None
    record_logits: bool = False  # keep the sampled rows' fp32 logits (tests)
    recorded: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    stats: RankStats = field(default_factory=RankStats)
    # the link to the front when the front is not rank 0 (distributed.link.WorkerLink:
    # P2P's interface; the front is its only peer); None: the steps group to rank 0
    front_link: Any = None

    def __post_init__(self) -> None:
        g = self.groups
        rt = self.runtime
        if g.tp_size > 1 and g.ctx.backend != "nccl":
            rt = rt.replace(cuda_graphs=False)  # a gloo all-reduce cannot be captured
        self.model = Engine(self.stage.model.config, [self.stage], runtime=rt)
        self.pipe = P2P(g.pp, self.stage.device, self.timeout, self.watchdog)
        # the leader fans a step out to its stage's other ranks (tp, and cp when > 1)
        self.tp_link = P2P(g.stage, CPU, self.timeout, self.watchdog)
        self.front = self.front_link or P2P(g.steps, CPU, self.timeout, self.watchdog)
        self.busy = False  # between a STEP and the next IDLE: waits have a deadline
        self.in_step_since: float | None = None  # monotonic start of the step running now
        # held while a step runs: the heartbeat thread reads the device's expert counters
        # only between steps (runtime.live_stats), never during a graph capture
        self.step_lock = threading.Lock()
        self._bound: list = []  # the modules' groups while between worlds (leave, rejoin)

    def leave(self) -> None:
        """Drop every link to a broken world (``worker.Session.rejoin``), the groups the
        stage's modules hold included (tensor-parallel linears, embedding and head, expert
        blocks: remembered by name for ``rejoin``)."""
        self._bound = unbind_groups(self.stage.model, self.groups)
        self.groups = self.pipe = self.tp_link = None
        if self.front_link is None:
            self.front = None

    def rejoin(self, groups: ParallelGroups) -> None:
        """A new world after a lost peer (``worker.Session.rejoin``): the same stage,
        weights and KV cache memory; its modules rebound to the new world's groups of the
        same names (the same grid); new links, nothing in flight. Context parallelism
        needs nothing more: a step reads its CP group from ``self.groups``."""
        rebind_groups(self._bound, groups)
        self._bound = []
        self.groups = groups
        self.pipe = P2P(groups.pp, self.stage.device, self.timeout, self.watchdog)
        self.tp_link = P2P(groups.stage, CPU, self.timeout, self.watchdog)
        self.front = self.front_link or P2P(groups.steps, CPU, self.timeout, self.watchdog)
        self.busy, self.in_step_since = False, None

    # ---- who talks to whom ----------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """Stage 0, TP (and CP) rank 0 of its replica: takes steps from the front."""
        g = self.groups
        return g.pp.is_first and g.tp_index == 0 and g.cp_index == 0

    @property
    def samples(self) -> bool:
        return self.stage.has_head and self.groups.tp_index == 0 and self.groups.cp_index == 0

    def replica_ranks(self, replica: int) -> tuple[int, int]:
        """(leader, sampler): the global ranks replica ``replica`` takes steps at and
        returns tokens from."""
        g = self.groups
        return (rank_of(replica, 0, 0, g.pp_size, g.tp_size, g.cp_size),
                rank_of(replica, g.pp_size - 1, 0, g.pp_size, g.tp_size, g.cp_size))

    def init_paged(self, num_blocks: int, block_size: int) -> None:
        """``block_size``: this rank's; under CP the scheduler's blocks are cp of them
        (llamadist.runtime.cp_step), which ``paged_shape`` reports."""
        self.model.init_paged(num_blocks, block_size)
        self.paged_shape = (num_blocks, block_size * self.groups.cp_size)

    # ---- one step on this stage ---------------------------------------------------------
    def run(self, work: StepWork, packed: torch.Tensor | None = None,
            x: torch.Tensor | None = None, prev: torch.Tensor | None = None,
            on_device: bool = False) -> torch.Tensor | None:
        """Run this stage on ``work`` (``packed``: its bytes, if it came as a message;
        x: the previous stage's hidden state; the first stage reads the tokens from
        ``work``, its decodes scheduled ahead from ``prev``, the step before's samples on
        the device) and pass it on; -> the sampled tokens on the rank that samples (on
        the host, or still on the device with ``on_device``), else None."""
        with self.step_lock:
            self.in_step_since = time.monotonic()
            try:
                return self._run(work, packed, x, prev, on_device)
            except PeerError:
                raise
            except RuntimeError as e:  # a collective inside the model: a TP/CP peer lost?
                lost = collective_lost(e, self.groups.rank, "a step's collective")
                if lost is None:
                    raise
                raise lost from e
            finally:
                self.in_step_since = None

    def _run(self, work: StepWork, packed: torch.Tensor | None, x: torch.Tensor | None,
             prev: torch.Tensor | None = None, on_device: bool = False) -> torch.Tensor | None:
        if work.reset_stats:
            self.stats = RankStats()
            self.stage.reset_stats()
            self.pipe.stats = type(self.pipe.stats)()
        fault_hook(self.groups.rank, self.stats.steps)
        peers = self.groups.stage.ranks[1:] if self.is_leader else []
        if packed is None and (peers or not self.stage.has_head):
            packed = work.pack()  # only when another rank needs it
        for peer in peers:
            self.tp_link.send(peer, Message(Kind.STEP, tensor=packed))
        if not work.num_seqs:
            return self._join(packed)
        cp = CPStep.build(work, self.groups.cp_size, self.groups.cp_index) \
            if self.groups.cp_size > 1 else None
        if x is None:
            x = work.tokens(self.stage.device)
            take_pending(x, work, prev)
            if cp is not None:  # only the tokens this CP rank owns
                x = x[torch.as_tensor(cp.mine, device=x.device)]
        timed, dev = self.model.timed, self.stage.device
        t0 = self.stage.timer.start(dev) if timed else time.perf_counter()
        if cp is None:
            out = self.model.forward_paged(x, work.batch())
        else:
            out = forward_cp(self.stage, x, cp, self.groups.cp.device_group)
            if self.stage.has_head and self.groups.tp_index == 0:
                out = gather_logits(out, cp, self.groups.cp.device_group)
        if timed:  # no sync: the pipeline's next step is prepared while this one runs
            self.stage.timer.stop(t0, dev, self.stats, "compute_s")
        else:
            self.stats.compute_s += time.perf_counter() - t0
        self.stats.steps += 1
        if not self.stage.has_head:
            if out.device.type == "cuda":
                out = out.clone()  # a graph's static buffer: the next replay must not race the send
            nxt = self.groups.pp.next_rank
            self.pipe.send(nxt, Message(Kind.STEP, tensor=packed))
            self.pipe.send(nxt, Message(Kind.HIDDEN, tensor=out))
            return None
        if not self.samples:
            return None
        tokens = sample_step(out, work)
        if self.record_logits:
            rows = [i for i, s in enumerate(work.seqs) if s.sample is not None]
            for i in rows:
                s = work.seqs[i]
                self.recorded[(s.request_id, s.sample.step)] = out[i].float().cpu()
        return tokens if on_device else tokens.cpu()

    def settle_timing(self) -> None:
        """Wait for this rank's timed work and add it to the stats (its final report;
        between steps, from the thread that runs them)."""
        self.model.settle_timing(wait=True)

    def _join(self, packed: torch.Tensor | None) -> None:
        """An empty step: the other replicas' tokens meet this rank's experts."""
        with torch.inference_mode():
            join_expert_collectives(self.stage.model, self.stage.dtype)
        self.stats.steps += 1
        if not self.stage.has_head:
            self.pipe.send(self.groups.pp.next_rank, Message(Kind.STEP, tensor=packed))

    # ---- a rank other than the front ------------------------------------------------------
    def serve(self) -> None:
        """Run steps as they arrive until END (every rank but the front)."""
        g = self.groups
        while True:
            t0 = time.perf_counter()
            if self.is_leader:
                src, link = 0, self.front
            elif g.pp.is_first:
                src, link = g.stage.first_rank, self.tp_link
            else:
                src, link = g.pp.prev_rank, self.pipe
            msg = link.recv(src, idle=not self.busy)
            if msg.kind in (Kind.EXPORT, Kind.IMPORT):
                self.move_kv(msg)
                continue
            if msg.kind in (Kind.END, Kind.IDLE):
                self.stats.wait_s += time.perf_counter() - t0
                if msg.kind == Kind.END:
                    self.close()
                    return
                self.idle()
                continue
            self.busy = True
            work, hidden = StepWork.unpack(msg.tensor), None
            if not g.pp.is_first and work.num_seqs:  # an empty step comes without one
                hidden = self.pipe.recv(src).tensor
            self.stats.wait_s += time.perf_counter() - t0
            tokens = self.run(work, msg.tensor, hidden)
            if tokens is not None:
                self.front.send(0, Message(Kind.TOKENS, tensor=tokens))

    def _pass_on(self, kind: Kind, tensor: torch.Tensor | None = None, lane: int = 0) -> None:
        """Send a control message on every path this rank feeds steps to."""
        g = self.groups
        if self.is_leader:
            for peer in g.stage.ranks[1:]:
                self.tp_link.send(peer, Message(kind, lane=lane, tensor=tensor))
        if not g.pp.is_last:
            self.pipe.send(g.pp.next_rank, Message(kind, lane=lane, tensor=tensor))

    def move_kv(self, msg: Message) -> None:
        """A KV migration (engine.replicas): EXPORT or IMPORT of the blocks ``msg.tensor``
        lists, passed on like a step (so it comes in order with the steps on every rank).
        Relayed (lane RELAY): this rank's own layers' blocks go to the front, or come from
        it, over this rank's own link (the front relays them to the other replica's same
        rank). Direct (lane DIRECT, distributed.kv_direct): the tensor is [tag, blocks...];
        an EXPORT stages the blocks on this rank's KV listener and tells the front their
        size; an IMPORT reads the source rank's address from the front, fetches the
        blocks from there and acks [size, tag] (size -1: failed, the front recomputes)."""
        self._pass_on(msg.kind, msg.tensor, msg.lane)
        if msg.lane == DIRECT:
            self._move_kv_direct(msg)
            return
        ids, cache = msg.tensor.tolist(), self.stage.paged
        with torch.inference_mode():
            if msg.kind == Kind.EXPORT:
                self.front.send(0, Message(Kind.KV, tensor=cache.export_blocks(ids)))
            else:
                data = self.front.recv(0)
                if data.kind != Kind.KV:
                    raise RuntimeError(f"an IMPORT of {len(ids)} blocks got a {data.kind!r} "
                                       f"message instead of their KV")
                cache.import_blocks(ids, data.tensor)

    def _move_kv_direct(self, msg: Message) -> None:
        tag, *ids = msg.tensor.tolist()
        cache, server = self.stage.paged, getattr(self.front, "kv_server", None)
        with torch.inference_mode():
            if msg.kind == Kind.EXPORT:
                size = -1
                if server is not None:
                    data = cache.export_blocks(ids)
                    server.stage(tag, data)
                    size = data.nbytes
                self.front.send(0, Message(Kind.KV, lane=DIRECT,
                                           tensor=torch.tensor([size], dtype=torch.int64)))
                return
            where = self.front.recv(0)
            if where.kind != Kind.KV or where.lane != DIRECT:
                raise RuntimeError(f"a direct IMPORT of {len(ids)} blocks got a "
                                   f"{where.kind!r} message instead of their source")
            source, size = tensor_address(where.tensor), -1
            try:
                data = fetch(source, tag, self.timeout)
                cache.import_blocks(ids, data)
                size = data.nbytes
            except (OSError, ConnectionError, LookupError, ValueError, RuntimeError) as e:
                log.warning("rank %d: KV fetch %d from %s failed (%s): the front recomputes "
                            "those requests", self.groups.rank, tag, source, e)
            self.front.send(0, Message(Kind.KV, lane=ACK,
                                       tensor=torch.tensor([size, tag], dtype=torch.int64)))

    def idle(self) -> None:
        """Nothing in flight any more: from here waits have no deadline."""
        self.busy = False
        self._pass_on(Kind.IDLE)

    def close(self) -> None:
        """Send END on every path this rank feeds, then wait for the sends to land."""
        self._pass_on(Kind.END)
        for link in (self.tp_link, self.pipe, self.front):
            link.flush()
