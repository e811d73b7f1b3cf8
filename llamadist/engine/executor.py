"""Executors: what runs a scheduled step under the engine. One interface, two kinds.

* ``LocalExecutor``: the stages of ``runtime.engine.Engine`` in this process (one or more,
  on any local devices). One step in flight.
* ``RankExecutor``: one data-parallel replica of a multi-process layout, driven from the
  front process (rank 0) through ``runtime.stage_rank.StageRank``. It keeps ``depth`` =
  pipeline stages steps in flight, so every stage is busy.

The engine calls ``launch(work)`` up to ``depth`` times, then ``collect()`` for the oldest
step: the sampled tokens of its sequences that sample (``StepWork.sampled_ids`` order).

KV migration (engine.replicas, a drained replica's requests): ``export_kv(block_ids)``
returns the K/V of those blocks as one tensor per shard (an in-process stage, or a worker
rank in the replica's rank order), ``import_kv(block_ids, payload)`` writes another
replica's export (same layout) into its own blocks; both only between steps, in order
with them. ``kv_path`` says how the bytes travel (engine.migration's cost rule), None
where the executor cannot move KV (then a drain replays).

A ``RankExecutor`` whose workers all have a KV listener (``kv_sources``: under the front)
also moves KV directly, rank to rank (distributed.kv_direct): ``export_kv_direct`` stages
the blocks on the source ranks' listeners under a tag, ``import_kv_direct`` sends each
target rank to its counterpart and waits for every rank's ack, so the bytes never pass
through the front and the import is done before the target's next step is scheduled.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import torch

from llamadist.config import ModelConfig
from llamadist.distributed.faults import PeerError
from llamadist.distributed.kv_direct import DIRECT, address_tensor
from llamadist.distributed.p2p import Kind, Message
from llamadist.engine.migration import DIRECT_TCP, FRONT_RELAY, HOST_COPY, PCIE, KVPath
from llamadist.runtime.engine import Engine
from llamadist.runtime.stage import parse_dtype
from llamadist.runtime.stage_rank import StageRank
from llamadist.runtime.step_work import StepWork, sample_step, take_pending

log = logging.getLogger(__name__)


class Executor(Protocol):
    config: ModelConfig
    devices: list[str]  # every device it computes on (the defaults of block size, budget)
    depth: int          # steps it keeps in flight
    ahead: bool         # takes decodes scheduled ahead (one more step in flight)
    blocking: bool      # launch computes in this process before it returns (a lockstep
                        # round launches such an executor after the others)

    def init_paged(self, num_blocks: int, block_size: int) -> None: ...

    def launch(self, work: StepWork) -> None: ...

    def collect(self) -> list[int]: ...

    def idle(self) -> None: ...

    def reset(self) -> None: ...  # forget launched, uncollected steps (the engine aborted them)

    def close(self) -> None: ...

    kv_path: KVPath | None  # how its KV blocks travel to another replica (None: they cannot)
    kv_dtype: str           # its KV cache's dtype ("float32", "bfloat16", ...)

    def export_kv(self, block_ids: Sequence[int]) -> list[torch.Tensor]: ...

    def import_kv(self, block_ids: Sequence[int], payload: list[torch.Tensor]) -> None: ...


class Sampled:
    """The sampled tokens of the steps launched in this process, oldest first: each
    step's copy to the host starts at launch (``add``) and is waited for at ``pop``, on a
    GPU behind an event (a stream sync would also wait for the step launched after);
    ``last``: the latest step's tokens on the device, which the decodes of a step
    scheduled ahead read (runtime.step_work.take_pending)."""

    def __init__(self) -> None:
        self._done: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        self.last: torch.Tensor | None = None

    def add(self, tokens: torch.Tensor) -> None:
        self.last = tokens
        host, arrived = tokens.to("cpu", non_blocking=True), None
        if tokens.device.type == "cuda":
            arrived = torch.cuda.Event()
            arrived.record(torch.cuda.current_stream(tokens.device))
        self._done.append((host, arrived))

    def pop(self) -> list[int]:
        tokens, arrived = self._done.popleft()
        if arrived is not None:
            arrived.synchronize()
        return tokens.tolist()

    def clear(self) -> None:
        self._done.clear()
        self.last = None


SAMPLED = object()  # RankExecutor: this step's tokens are in its Sampled


class LocalExecutor:
    """Stages in this process. The sampled tokens' copy to the host is started at launch
    and waited for at collect. ``ahead``: the engine may launch the next step before
    collecting this one, its decodes reading their input tokens from this step's output on
    the device; on a GPU the host's work for a step then runs while the device computes
    the one before (RuntimeConfig.schedule_ahead)."""

    depth = 1
    blocking = True

    def __init__(self, model: Engine, ahead: bool = False):
        self.model = model
        self.config = model.config
        self.devices = [str(s.device) for s in model.stages]
        self._first = model.stages[0].device
        self.ahead = ahead
        self._sampled = Sampled()

    def init_paged(self, num_blocks: int, block_size: int) -> None:
        self.model.init_paged(num_blocks, block_size)

    @torch.inference_mode()
    def launch(self, work: StepWork) -> None:
        if work.reset_stats:
            for s in self.model.stages:
                s.reset_stats()
        tokens = work.tokens(self._first)
        take_pending(tokens, work, self._sampled.last)
        logits = self.model.forward_paged(tokens, work.batch())  # (S, V)
        self._sampled.add(sample_step(logits, work))

    @property
    def graphed(self) -> bool:
        """The step launched last ran through CUDA graphs (engine.step_trace reads it)."""
        return self.model.graphed

    def captures(self, num_seqs: int) -> int | None:
        """The bucket whose CUDA graphs a decode-only step of ``num_seqs`` sequences would
        first capture, or None (the engine may wait for the step in flight before launching
        it)."""
        return self.model.captures(num_seqs)

    def collect(self) -> list[int]:
        tokens = self._sampled.pop()
        if self.model.timed:  # this step's stage times are ready: read them (no wait)
            self.model.settle_timing()
        return tokens

    def idle(self) -> None:
        pass

    def reset(self) -> None:
        self._sampled.clear()

    def close(self) -> None:
        self.reset()

    @property
    def kv_path(self) -> KVPath:
        """Copied to the host and into the other replica's stages (through PCIe on a GPU)."""
        link = PCIE if self._first.type == "cuda" else HOST_COPY
        return KVPath(link, hops=2, messages=2 * len(self.model.stages))

    @property
    def kv_dtype(self) -> str:
        return str(self.model.stages[0].dtype).removeprefix("torch.")

    @torch.inference_mode()
    def export_kv(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Per stage: its layers' K/V of ``block_ids`` (PagedKVCache.export_blocks)."""
        return [s.paged.export_blocks(block_ids) for s in self.model.stages]

    @torch.inference_mode()
    def import_kv(self, block_ids: Sequence[int], payload: list[torch.Tensor]) -> None:
        if len(payload) != len(self.model.stages):
            raise ValueError(f"KV of {len(payload)} stages for {len(self.model.stages)}")
        for s, data in zip(self.model.stages, payload):
            s.paged.import_blocks(block_ids, data)


class RankExecutor:
    """Replica ``replica`` of a multi-process layout, seen from the front: rank 0 under
    torchrun (replica 0's first stage: it computes that stage itself at launch), or the
    launcher process, which is no rank (``RankExecutor.remote``: every replica is remote,
    driven through a ``distributed.link.CrewLinks``)."""

    # Steps scheduled ahead (RuntimeConfig.schedule_ahead) need the step before's samples
    # on the device of the rank that takes the step: only a world of one rank, this
    # process, on a GPU (torchrun --nproc-per-node 1) has them; elsewhere they live on the
    # last stage's rank or come back through the front (and replicas that step in lockstep
    # never go ahead).
    ahead = False

    def __init__(self, rank: StageRank, replica: int, devices: list[str]):
        self.rank, self.replica = rank, replica
        self.config = rank.stage.model.config
        self.devices = devices
        g = rank.groups
        self.depth = g.pp_size
        self.link = rank.front
        self.leader, self.sampler = rank.replica_ranks(replica)
        self.remote = self.leader != g.rank  # else this process is its first stage
        self.blocking = not self.remote
        self.ahead = (g.world_size == 1 and rank.stage.device.type == "cuda"
                      and rank.runtime.schedule_ahead)
        self.paged_shape: tuple[int, int] | None = rank.paged_shape
        # per launched step, oldest first: its tokens when known at launch (sampled here
        # without going ahead: one stage, tp 1; or [] for an empty step, which sends none
        # back), SAMPLED (in ``_sampled``: on their way to the host), else None (they come
        # from the sampling rank)
        self._results: deque[list[int] | object | None] = deque()
        self._sampled = Sampled()

    @classmethod
    def remote(cls, link, replica: int, leader: int, sampler: int, depth: int,
               config: ModelConfig, devices: list[str], paged_shape: tuple[int, int],
               kv_dtype: str = "float32",
               kv_layout: tuple | None = None) -> "RankExecutor":
        """A replica whose ranks all live in other processes: steps go to ``leader``,
        tokens come from ``sampler`` (indices on ``link``); its ranks made
        ``paged_shape`` = (blocks, block size) of KV cache in ``kv_dtype``, their layers
        split as ``kv_layout`` says (KV moves only between replicas split alike)."""
        self = cls.__new__(cls)
        self.rank, self.replica, self.config, self.devices = None, replica, config, devices
        self.depth, self.link, self.leader, self.sampler = depth, link, leader, sampler
        self.remote, self.blocking, self.paged_shape = True, False, paged_shape
        self.kv_dtype = str(parse_dtype(kv_dtype)).removeprefix("torch.")
        self.kv_layout = kv_layout
        self._results, self._sampled = deque(), Sampled()
        return self

    kv_dtype = "float32"
    kv_layout: tuple | None = None  # the layers of each stage (None: every replica alike)

    @property
    def kv_path(self) -> KVPath | None:
        """Through the front's TCP links (it relays): only where the front is no rank
        (``remote``) and every worker has its own link; under torchrun, None (replay)."""
        links = getattr(self.link, "links", None)
        if not self.remote or links is None:
            return None
        return KVPath(FRONT_RELAY, hops=2, messages=2 * len(links))

    def _ranks(self) -> list[int]:
        return sorted(self.link.links)  # the replica's workers, in its rank order

    # ---- direct, rank to rank (distributed.kv_direct) -------------------------------------
    @property
    def kv_sources(self) -> list[str] | None:
        """Each rank's KV listener in rank order, or None where any has none (torchrun, an
        in-process rank, a worker without one): then only the relay moves KV."""
        links = getattr(self.link, "links", None)
        if not self.remote or links is None:
            return None
        found = [getattr(links[w], "kv_address", None) for w in sorted(links)]
        return found if found and all(found) else None

    @property
    def kv_direct_path(self) -> KVPath | None:
        """Each byte crosses loopback once, source rank to target rank; per rank, an order
        and an answer each way through the front (a few bytes) and one connection."""
        if self.kv_sources is None:
            return None
        return KVPath(DIRECT_TCP, hops=1, messages=2 * len(self.link.links))

    def export_kv_direct(self, block_ids: Sequence[int], tag: int) -> int:
        """Every rank stages its blocks of ``block_ids`` on its listener under ``tag``
        (the replica has nothing in flight: its answers come first). -> bytes staged."""
        self.link.send(self.leader, Message(Kind.EXPORT, lane=DIRECT,
                                            tensor=_ids([tag, *block_ids])))
        total, problems = 0, []
        for w in self._ranks():  # every answer, even after a bad one: none left for later
            msg = self.link.recv(w)
            if msg.kind != Kind.KV or msg.lane != DIRECT:
                problems.append(f"rank {w} answered a direct EXPORT with a {msg.kind!r} "
                                f"message")
            elif int(msg.tensor[0]) < 0:
                problems.append(f"rank {w} has no KV listener")
            else:
                total += int(msg.tensor[0])
        if problems:
            raise RuntimeError(f"replica {self.replica}: {'; '.join(problems)}")
        return total

    def import_kv_direct(self, block_ids: Sequence[int], tag: int,
                         sources: list[str]) -> int:
        """IMPORT (tag, ``block_ids``) down the step paths, then each rank the address of
        the source rank at its position; waits for every rank's ack (the target may still
        send tokens of earlier steps: acks come apart). -> bytes imported. Raises where
        any rank failed to fetch (the engine recomputes those requests)."""
        ranks = self._ranks()
        if len(sources) != len(ranks):
            raise ValueError(f"KV of {len(sources)} ranks for replica {self.replica}'s "
                             f"{len(ranks)}")
        self.link.send(self.leader, Message(Kind.IMPORT, lane=DIRECT,
                                            tensor=_ids([tag, *block_ids])))
        for w, source in zip(ranks, sources):
            self.link.send(w, Message(Kind.KV, lane=DIRECT, tensor=address_tensor(source)))
        total, failed = 0, []
        for w in ranks:  # every ack, even after a failure: none may be left for later
            size, got = self.link.recv_ack(w).tensor.tolist()
            while got != tag:  # a late ack of an earlier transfer that timed out here
                size, got = self.link.recv_ack(w).tensor.tolist()
            if size < 0:
                failed.append(w)
            total += max(size, 0)
        if failed:
            raise RuntimeError(f"replica {self.replica}: rank(s) {failed} could not fetch "
                               f"their KV directly")
        return total

    def export_kv(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """EXPORT travels the step paths (after every step sent before it); each rank
        sends its own layers' (and heads') blocks back on its own link."""
        self.link.send(self.leader, Message(Kind.EXPORT, tensor=_ids(block_ids)))
        out, problems = [], []
        for w in self._ranks():  # every answer, even after a bad one: none left for later
            msg = self.link.recv(w)
            if msg.kind != Kind.KV:
                problems.append(f"rank {w} answered an EXPORT with a {msg.kind!r} message")
            out.append(msg.tensor)
        if problems:
            raise RuntimeError(f"replica {self.replica}: {'; '.join(problems)}")
        return out

    def import_kv(self, block_ids: Sequence[int], payload: list[torch.Tensor]) -> None:
        """IMPORT first (the leader reads it, then its own KV, from one socket), then each
        rank's share of ``payload`` to that rank (the same position in the other
        replica: same layers, same heads)."""
        ranks = self._ranks()
        if len(payload) != len(ranks):
            raise ValueError(f"KV of {len(payload)} ranks for replica {self.replica}'s "
                             f"{len(ranks)}")
        self.link.send(self.leader, Message(Kind.IMPORT, tensor=_ids(block_ids)))
        for w, data in zip(ranks, payload):
            self.link.send(w, Message(Kind.KV, tensor=data))

    def init_paged(self, num_blocks: int, block_size: int) -> None:
        """Every rank made its cache at setup (runtime.worker.RankSpec): check the engine
        uses no more blocks than it holds, of the same size."""
        have, size = self.paged_shape
        if num_blocks > have or block_size != size:
            raise ValueError(f"the engine asks for {num_blocks} blocks of {block_size} but "
                             f"the ranks made {have} of {size}")

    def launch(self, work: StepWork) -> None:
        known = None if work.num_seqs else []  # an empty step (lockstep) samples nothing
        if self.remote:
            self.link.send(self.leader, Message(Kind.STEP, tensor=work.pack()))
        else:
            with torch.inference_mode():
                tokens = self.rank.run(work, prev=self._sampled.last, on_device=self.ahead)
            if tokens is not None and self.ahead:
                self._sampled.add(tokens)
                known = SAMPLED
            elif tokens is not None:
                known = tokens.tolist()
        self._results.append(known)

    @property
    def graphed(self) -> bool | None:
        """The step this process ran last went through CUDA graphs (engine.step_trace);
        None where the replica's ranks are all elsewhere."""
        return None if self.remote else self.rank.model.graphed

    def captures(self, num_seqs: int) -> int | None:
        """As LocalExecutor.captures, where steps go ahead (else never asked)."""
        return self.rank.model.captures(num_seqs) if self.ahead else None

    def collect(self) -> list[int]:
        known = self._results.popleft()
        if known is SAMPLED:
            return self._sampled.pop()
        if known is not None:
            return known
        return self.link.recv(self.sampler).tensor.tolist()

    def reset(self) -> None:
        """Receive and drop the tokens of steps the engine aborted, so the next collect
        gets its own step's (the ranks computed them anyway, in order)."""
        while self._results:
            self.collect()
        self._sampled.clear()

    def idle(self) -> None:
        """The replica has nothing in flight: its ranks may wait without a deadline. A lost
        rank is not raised here (outside a step): the front's watch reports it."""
        try:
            if self.remote:
                self.link.send(self.leader, Message(Kind.IDLE))
            else:
                self.rank.idle()
        except PeerError as e:
            log.warning("telling replica %d it is idle: %s", self.replica, e)

    def close(self) -> None:
        """Tell the replica's ranks to leave (replica 0 under torchrun: the front's own
        paths)."""
        if not self.remote:
            self.rank.close()
            return
        try:
            self.link.send(self.leader, Message(Kind.END))
            self.link.flush()
        except PeerError as e:  # a lost replica's ranks are killed instead
            log.info("closing replica %d: %s", self.replica, e)


def _ids(block_ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(block_ids), dtype=torch.int64)
