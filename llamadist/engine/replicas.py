"""The engine's data-parallel replicas as a set: one added (at start, or restarted after a
failure), one whose executor is replaced (its requests replayed), one lost for good (its
requests moved to the others), and one drained for maintenance (``POST /admin/drain``):
it takes no new request and launches no new step; once its steps in flight are collected
(no token lost or repeated) its requests move to the other replicas. A drained replica is
alive, so its running requests may take their KV with them (migration, seed 000 section
8.2): the blocks holding their computed tokens are exported from its executor, written
into blocks of the target's, and the request decodes on there without a prefill, where
engine.migration's cost rule finds that cheaper than recomputing; the others replay from
prompt + outputs, as after a failure (a lost replica's KV is gone: it always replays).
Either way the sampling state (seed, step) goes with the request, so its tokens equal a
run without the drain."""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llamadist.engine.executor import Executor
from llamadist.engine.kv_blocks import BlockPool
from llamadist.engine.migration import MigrationCost, parse_kv
from llamadist.engine.request import Request
from llamadist.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Replica:
    """One data-parallel replica under the engine: its executor, its own KV blocks and
    scheduler, and its steps in flight (oldest first)."""
    executor: Executor
    scheduler: Scheduler
    in_flight: deque = field(default_factory=deque)  # (launch order, SchedulerStep, StepWork)
    reset_pending: bool = False
    busy: bool = False  # steps launched since the executor was last told it is idle
    steps: int = 0      # steps launched on it (this executor's)
    kv_policy: str = "auto"  # a drain's: auto | migrate | replay (engine.migration)
    kv_route: str = "auto"   # and how the bytes go: auto | direct | relay

    @property
    def load(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting

    @property
    def key(self) -> int:
        """The replica's number (the front's; 0 for an executor that has none)."""
        return getattr(self.executor, "replica", 0)


class ReplicaSet:
    """LLMEngine's replica operations (a mixin: the engine owns ``replicas``, ``drained``,
    ``stats``, ``_where`` and the block sizes)."""

    def add_replica(self, executor: Executor) -> None:
        """A data-parallel replica (at start, or one restarted after a failure) with its
        own empty KV blocks and scheduler; new requests go to the least loaded (a replica
        drained before its restart stays drained)."""
        executor.init_paged(self.num_blocks, self.block_size)
        pool = BlockPool(self.num_blocks, self.block_size, self._prefix_caching)
        sched = Scheduler(pool, self.runtime.max_batch, self._budget, self.runtime.max_seq_len)
        self.replicas.append(Replica(executor, sched))

    def serving(self) -> list[Replica]:
        """The replicas that take new requests (all of them when every one is drained)."""
        return [r for r in self.replicas if r.key not in self.drained] or self.replicas

    def replace_executor(self, index: int, executor: Executor) -> int:
        """Replica ``index``'s executor failed (its steps in flight were aborted when
        ``step`` raised): run its requests on ``executor`` from now on. Its KV cache is
        lost, so every running request is recomputed from its prompt and the tokens it
        already has (with its seed and step count, a request's tokens equal a run without
        the failure). Returns how many requests are replayed."""
        rep = self.replicas[index]
        if rep.in_flight:
            raise RuntimeError("replace_executor while steps are in flight")
        executor.init_paged(self.num_blocks, self.block_size)
        rep.executor = executor
        replayed = rep.scheduler.requeue_all()
        self.stats.recoveries += 1
        self.stats.replayed_requests += replayed
        return replayed

    def fail_over(self, index: int) -> int:
        """Replica ``index`` is lost for good (its steps in flight were aborted when
        ``step`` raised): its requests move to the live replicas now, the least loaded
        first, and replay there from prompt + outputs. Returns how many moved."""
        if len(self.replicas) < 2:
            raise RuntimeError("no other replica to take the requests: use replace_executor")
        if self.lockstep:
            raise RuntimeError("the replicas share their experts (lockstep): the others "
                               "cannot run without the lost one's; restart the layout")
        rep = self.replicas[index]
        if rep.in_flight:
            raise RuntimeError("fail_over while steps are in flight")
        del self.replicas[index]
        try:
            rep.executor.close()
        except Exception as e:  # noqa: BLE001 - it is gone either way
            log.warning("closing the lost replica's executor: %s", e)
        if not [r for r in self.replicas if r.key not in self.drained]:
            log.warning("the live replicas were all drained: replica(s) %s serve again",
                        sorted(self.drained))
            self.drained.clear()
        moved = self._move(rep)
        self.stats.recoveries += 1
        self.stats.replayed_requests += moved
        return moved

    def _move(self, rep: Replica) -> int:
        """Every unfinished request of ``rep`` (no step in flight) to the least loaded
        serving replica, where it replays from prompt + outputs."""
        rep.scheduler.requeue_all()
        moved = rep.scheduler.release_all()
        for req in moved:
            target = min((r for r in self.serving() if r is not rep), key=lambda r: r.load)
            target.scheduler.adopt([req])
            self._where[req.id] = target
        return len(moved)

    # ---- drain (maintenance) -----------------------------------------------------------
    def _replica(self, key: int) -> Replica:
        for r in self.replicas:
            if r.key == key:
                return r
        raise LookupError(f"no replica {key} (replicas: {sorted(r.key for r in self.replicas)})")

    def drain(self, key: int, kv: str = "auto") -> None:
        """Replica ``key`` takes no new request and launches no new step; its requests
        move to the others once its steps in flight are collected, the running ones with
        their KV blocks where that is cheaper (``kv``: "auto"; "migrate" or "replay"
        force one way; a suffix "-direct" or "-relay" forces how the bytes travel between
        worker processes, else direct where both replicas can: engine.migration.parse_kv).
        LookupError: no such replica; RuntimeError: no other replica would serve;
        ValueError: an unknown ``kv``."""
        policy, route = parse_kv(kv)
        rep = self._replica(key)
        if self.lockstep:
            raise RuntimeError("the replicas share their experts (lockstep): none can stop "
                               "alone")
        if key not in self.drained and not [r for r in self.replicas
                                             if r.key != key and r.key not in self.drained]:
            raise RuntimeError(f"replica {key} is the only one serving: nothing would take "
                               f"its requests")
        rep.kv_policy, rep.kv_route = policy, route
        self.drained.add(key)
        self.move_drained()

    def undrain(self, key: int) -> None:
        """Replica ``key`` takes requests again (LookupError: no such replica)."""
        self._replica(key)
        self.drained.discard(key)

    def move_drained(self) -> None:
        """Between steps: a draining replica whose steps in flight were all collected
        hands its requests to the serving ones and is told it is idle."""
        for rep in self.replicas:
            if rep.key in self.drained and not rep.in_flight and rep.scheduler.has_unfinished:
                migrated = self._migrate(rep)
                replayed = rep.scheduler.num_running
                n = self._move(rep)
                self.stats.drain_replayed += replayed
                log.warning("replica %d drained: %d request(s) migrated with their KV, %d "
                            "moved (%d of them recomputed)", rep.key, migrated, n, replayed)
                self._settle(rep)

    # ---- KV migration --------------------------------------------------------------------
    def _migrate(self, rep: Replica) -> int:
        """The running requests of drained ``rep`` (nothing in flight) whose KV is cheaper
        to ship than to recompute (engine.migration) go, with it, to the least loaded
        serving replica that has a batch slot and the blocks; the rest stay for ``_move``
        (replay). A transfer that fails costs time, never the request: a failed export
        leaves its requests here, a failed import recomputes them on the target. Returns
        how many requests moved with their KV."""
        src = rep.executor
        path = getattr(src, "kv_path", None)
        if rep.kv_policy == "replay" or path is None:
            return 0
        direct = getattr(src, "kv_direct_path", None) if rep.kv_route != "relay" else None
        if rep.kv_route == "direct" and direct is None:
            log.warning("replica %d has no direct KV path: its KV goes through this process "
                        "(relayed)", rep.key)
        path = direct or path
        cost = MigrationCost(self.config, src.kv_dtype, _itemsize(src.kv_dtype),
                             src.devices[0])
        groups: dict[int, tuple[Replica, list[Request]]] = {}
        room: dict[int, list[int]] = {}  # per target: [free blocks, free batch slots]
        for req in list(rep.scheduler.running):
            targets = [r for r in self.serving() if r is not rep and r.key not in self.drained
                       and getattr(r.executor, "kv_path", None) is not None
                       # the same layers on the same ranks (a re-planned replica differs)
                       and getattr(r.executor, "kv_layout", None) == getattr(
                           src, "kv_layout", None)
                       and (direct is None
                            or getattr(r.executor, "kv_sources", None) is not None)]
            if not targets or req.num_computed <= 0:
                continue
            target = min(targets, key=lambda r: r.load + len(groups.get(id(r), (0, []))[1]))
            pool = target.scheduler.pool
            left = room.setdefault(id(target), [pool.num_free, target.scheduler.max_batch
                                                - target.scheduler.num_running])
            need = pool.blocks_for(req.num_computed)
            hit = min(pool.match_prefix(req.all_ids)[1], req.num_computed)
            if need > left[0] or left[1] < 1 or cost.choose(
                    rep.kv_policy, path, req.num_computed, req.num_computed - hit) != "migrate":
                continue
            left[0], left[1] = left[0] - need, left[1] - 1
            groups.setdefault(id(target), (target, []))[1].append(req)
        return sum(self._ship(rep, target, reqs, direct is not None)
                   for target, reqs in groups.values())

    def _ship(self, rep: Replica, target: Replica, reqs: list[Request],
              direct: bool = False) -> int:
        """Export ``reqs``' blocks from ``rep``, hand them over, import into ``target``:
        through this process (relayed) or ``direct``ly rank to rank (distributed.kv_direct:
        the source ranks stage them under a tag, the target ranks fetch them and ack)."""
        t0 = time.perf_counter()
        src_blocks = [b for r in reqs for b in r.block_ids[:rep.scheduler.pool.blocks_for(
            r.num_computed)]]
        # the tag is the fetch's only credential on the source ranks' listeners: secret,
        # never a counter another local process could guess (distributed.kv_direct)
        tag = secrets.randbits(62)
        try:
            if direct:
                nbytes = rep.executor.export_kv_direct(src_blocks, tag)
            else:
                payload = rep.executor.export_kv(src_blocks)
                nbytes = sum(t.nbytes for t in payload)
        except Exception as e:  # noqa: BLE001 - they replay instead
            log.warning("replica %d: KV export failed (%s): %d request(s) replay", rep.key, e,
                        len(reqs))
            return 0
        dst_blocks, moved = [], []
        for req in reqs:
            _, n = rep.scheduler.hand_over(req)
            got = target.scheduler.take_over(req, n)
            if got is None:  # no room after all (counted above): recompute there
                target.scheduler.adopt([req])
            else:
                dst_blocks += got
                moved.append(req)
            self._where[req.id] = target
        try:
            if len(moved) != len(reqs):  # (not expected: room was counted) the payload
                raise RuntimeError("the target ran out of room")  # no longer lines up
            if direct:
                got_bytes = target.executor.import_kv_direct(dst_blocks, tag,
                                                             rep.executor.kv_sources)
                if got_bytes != nbytes:
                    raise RuntimeError(f"{got_bytes} bytes imported of {nbytes} exported")
            else:
                target.executor.import_kv(dst_blocks, payload)
        except Exception as e:  # noqa: BLE001 - they recompute on the target
            log.warning("replica %d: KV import failed (%s): %d request(s) recompute",
                        target.key, e, len(moved))
            for req in moved:
                target.scheduler.recompute(req)
            self.stats.drain_replayed += len(moved)
            return 0
        st = self.stats
        st.migrated_requests += len(moved)
        st.migrated_blocks += len(dst_blocks)
        st.migrated_bytes += nbytes
        if direct:
            st.kv_direct_bytes += nbytes
        else:
            st.kv_relayed_bytes += nbytes
        st.migration_s += time.perf_counter() - t0
        log.info("replica %d -> %d: %d request(s) migrated with %d KV blocks (%.1f MB, %s) "
                 "in %.3f s", rep.key, target.key, len(moved), len(dst_blocks), nbytes / 1e6,
                 "direct" if direct else "relayed", time.perf_counter() - t0)
        return len(moved)

    def replica_states(self) -> dict[int, dict]:
        """Per replica: serving | draining (steps or requests left) | drained, and the
        steps launched on its executor."""
        out = {}
        for r in list(self.replicas):
            state = "serving"
            if r.key in self.drained:
                state = "draining" if r.in_flight or r.scheduler.has_unfinished else "drained"
            out[r.key] = {"state": state, "steps": r.steps}
        return out


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()
