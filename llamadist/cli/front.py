"""The front of ``llamadist generate|chat|bench|serve ... --nproc N``: the launcher process
itself runs the engine (and, for serve, starts the HTTP server's process: serve.server),
is no rank, and outlives its workers.

    front (this process: LLMEngine, scheduler, tokenizer; serve's HTTP process its child)
      ├── replica 0: a torch.distributed world of pp x tp workers ┐ one TCP link per worker
      └── replica 1: its own world (own rendezvous port)          ┘ (distributed.link)

Every worker is a stage rank; each data-parallel replica is a world of its own, so one
replica's loss leaves the others running. The front watches every worker: a process exit
(Popen.poll, at once), a closed link, a heartbeat that stops (SIGSTOP, a frozen host) or
a step stuck longer than ``--timeout``; also while idle. Then, by ``--on-failure``:

* ``restart`` (default): start the lost worker again while the replica's others keep
  their stages and join it on a new rendezvous port (cli.rejoin: gloo, TP/CP too), else
  kill the replica's workers and start new ones on the same devices (a new rendezvous
  port; they reload their weights); then replay the replica's requests
  from prompt + tokens so far (``LLMEngine.replace_executor``). With several replicas the
  lost one's requests move to the live ones at once (``LLMEngine.fail_over``) and it
  restarts in the background, rejoining empty (``LLMEngine.add_replica``).
* ``replan``: plan the lost replica again over the devices that remain (one pipeline
  stage fewer, cli.replan), start that layout's workers (weights loaded for the new
  split) and replay; refused with the planner's reason when the model no longer fits.
  With several replicas the others keep their layout and serve the lost one's requests
  meanwhile; one that cannot be re-planned stays down (``status``: ``replicas_down``).
* ``fail``: the run fails as before: open requests end with an error, the culprit is named.

``--max-restarts`` bounds the restarts of the whole run; past it the engine fails with the
reason and no worker is left behind. Under torchrun there is no front of ours: rank 0
is the front (cli.ranks) and a dead rank ends the run.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict

from llamadist.cli.jobs import Job
from llamadist.cli.layout import LAYOUT_ENV
from llamadist.cli.rejoin import await_workers, can_rejoin, rejoin, rejoin_allowed
from llamadist.cli.replan import Recovery, check_replan, replan
from llamadist.distributed.faults import EXIT_PEER_LOST, FAULT_VARS
from llamadist.distributed.launch import Crew, WorkerExit
from llamadist.distributed.link import (FRONT_ENV, POLL_S, CrewLinks, FrontLink, WorkerLost,
                                        read_hello_kv)
from llamadist.engine.engine import LLMEngine
from llamadist.engine.executor import RankExecutor
from llamadist.planning.units import PlanningError
from llamadist.runtime.live_stats import merge_expert_load
from llamadist.runtime.worker import RankSpec

log = logging.getLogger(__name__)

BLAME_GRACE_S = 2.0  # after a loss, how long the front looks for the worker that caused it
EXIT_GRACE_S = 1.0  # of which, how long a closed link waits for its process's exit (_blame)


def rank_spec_of(job: Job) -> RankSpec:
    """What every rank loads with, from the front's Job. ``block_size`` is each rank's; the
    scheduler's blocks are ``cp`` of them (one stripe per context-parallel rank)."""
    layout, rt = job.layout, job.runtime
    devices = list(layout.devices)
    block_size = rt.block_size_for(devices)
    return RankSpec(tuple((r.start, r.stop) for r in layout.layer_ranges),
                    rt.dtype_for(devices), rt,
                    LLMEngine.default_blocks(rt, block_size * layout.cp), block_size, layout.ep,
                    layout.expert_shares)


class Replica:
    """One replica's workers: processes, links, and what the watch found; its own layout
    (``job``: the run's, or its own after ``--on-failure replan`` with --dp: a re-planned
    replica may have fewer stages than the others), the spec and setup its workers get."""

    def __init__(self, index: int, crew: Crew):
        self.index, self.crew = index, crew
        self.job: Job | None = None
        self.pp = 0
        self.setup: dict = {}
        self.down_reason: str | None = None  # why it stays down (past recovery)
        self.links: dict[int, FrontLink] = {}
        self.status = "down"  # starting | running | lost | closing | down
        self.failure: WorkerLost | None = None
        self.token = ""
        self.peer_lost_at: float | None = None

    def close_links(self) -> None:
        for link in self.links.values():
            link.close()
        self.links = {}


class Front:
    def __init__(self, args, job: Job, config):
        self.args, self.config = args, config
        self.timeout = job.runtime.timeout
        self.policy, self.max_restarts = args.on_failure, args.max_restarts
        if self.policy == "replan":
            check_replan(job.layout)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._addr = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.replicas = [Replica(k, None) for k in range(job.layout.dp)]
        self._use(job)
        self._arrived: dict[tuple[int, str], FrontLink] = {}
        self._cond = threading.Condition()
        self._rejoin: list[tuple[RankExecutor, Recovery]] = []
        self._replay: dict[str, tuple[object, int]] = {}  # request id -> (request, outputs)
        self._replay_rec: list[tuple[Recovery, float]] = []
        self.restarts = 0
        self.recoveries: list[Recovery] = []
        self.state, self.error = "starting", None
        self.final_reports: list[dict] = []  # every worker's last report, at the shutdown
        self._stop = threading.Event()
        for target in (self._accept, self._watch):
            threading.Thread(target=target, daemon=True, name=f"llamadist{target.__name__}").start()

    def _use(self, job: Job) -> None:
        """Take ``job``'s layout at the start: the grid, each rank's spec, and every
        replica's layout, setup and crew of workers (not started)."""
        lay = self.layout = job.layout
        self.job = job
        self.pp, self.tp, self.dp, self.cp = lay.pp, lay.tp, lay.dp, lay.cp
        self.spec = rank_spec_of(job)
        self.per = self.pp * self.cp * self.tp  # workers per replica at the start
        for r in self.replicas:
            self._place(r, job)

    def _place(self, r: Replica, job: Job) -> None:
        """Replica ``r`` runs ``job``'s layout (at start, or re-planned): its setup and its
        crew (not started), whose global indices start where the replica's did."""
        lay = job.layout
        r.job, r.pp = job, lay.pp
        r.setup = {"spec": rank_spec_of(job), "pp": lay.pp, "tp": lay.tp, "cp": lay.cp,
                   "devices": ",".join(lay.devices), "timeout": self.timeout,
                   "rejoin": rejoin_allowed(lay, self.policy)}
        env = {**os.environ, LAYOUT_ENV: lay.to_json()}
        per, first = lay.pp * self.cp * self.tp, r.index * self.per
        r.crew = Crew(["-m", "llamadist", *self.args.argv], list(range(first, first + per)),
                      self.per * self.dp, env, {FRONT_ENV: self._addr})

    @property
    def block_size(self) -> int:
        """The scheduler's KV block: one stripe per context-parallel rank."""
        return self.spec.block_size * self.cp

    # ---- workers -----------------------------------------------------------------------
    def start(self) -> None:
        """Start every replica's workers (all at once) and wait until each is loaded."""
        for r in self.replicas:
            self._spawn(r)
        for r in self.replicas:
            self._await(r)
        self.state = "ok"

    def executor(self, r: Replica) -> RankExecutor:
        # ranks in (pp, cp, tp) order, tp innermost (distributed.grid): the first stage's
        # first rank leads, the last stage's first rank samples
        leader = r.crew.indices[0]
        sampler = leader + (r.pp - 1) * self.cp * self.tp
        links = CrewLinks(r.index, r.links, self.timeout, lambda: r.failure)
        return RankExecutor.remote(links, r.index, leader, sampler, r.pp, self.config,
                                   list(r.job.layout.devices),
                                   (self.spec.num_blocks, self.block_size),
                                   kv_dtype=self.spec.dtype,
                                   # a re-planned replica (--on-failure replan) has its own
                                   kv_layout=tuple((rg.start, rg.stop)
                                                   for rg in r.job.layout.layer_ranges))

    def _spawn(self, r: Replica) -> None:
        r.token = secrets.token_hex(8)  # before "starting": a stale hello never matches
        r.status, r.failure, r.peer_lost_at = "starting", None, None
        r.close_links()
        # a restarted worker must not inherit a test's one-shot fault injection
        r.crew.start(r.token, drop=FAULT_VARS if self.restarts else ())

    def _await(self, r: Replica) -> tuple[float, float]:
        """Wait until every worker of ``r`` is connected and loaded (cli.rejoin)."""
        return await_workers(self, r, set(r.crew.indices))

    def _accept(self) -> None:
        """Take each worker's connection and its hello (index, incarnation token)."""
        self._listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                index, token, kv = read_hello_kv(sock)
                r = next(r for r in self.replicas if r.status == "starting" and r.token == token
                         and index in r.crew.indices)
            except Exception as e:  # noqa: BLE001 - a stray or stale connection: drop it
                log.warning("refused a connection without a current worker's hello: %r", e)
                sock.close()
                continue
            with self._cond:
                self._arrived[(index, r.token)] = FrontLink(sock, index, kv)
                self._cond.notify_all()

    def _watch(self) -> None:
        """Every POLL_S: a running replica with a lost worker gets its failure set (read
        by its links at once, and by ``poll`` while idle)."""
        while not self._stop.wait(POLL_S):
            for r in self.replicas:
                if r.status == "running" and r.failure is None:
                    try:
                        found = self._diagnose(r, strict=True)
                    except RuntimeError:  # its links changed under us (a restart)
                        continue
                    if found is not None:
                        r.failure, r.status = found, "lost"
                        log.warning("replica %d: %s", r.index, found)

    def _diagnose(self, r: Replica, strict: bool) -> WorkerLost | None:
        """The worker to blame, if any: one that exited with its own error; one hung (no
        heartbeat, or inside one step, for --timeout); with ``strict`` False (a loss is
        already known), the one stuck longest. Workers that only lost a peer are blamed
        after BLAME_GRACE_S, when nobody else is."""
        now = time.monotonic()
        exits = r.crew.exits()
        own = sorted((e for e in exits if e.code not in (0, EXIT_PEER_LOST)), key=lambda e: e.at)
        if own:
            return WorkerLost(r.index, own[0].rank, own[0].describe(), self._seen(r, own[0].rank))
        pids = {i: p.pid for i, p in r.crew.procs.items()}
        limit = self.timeout if strict else 0.5
        links = list(r.links.items())
        worst = max(links, key=lambda kv: kv[1].stuck(now), default=None)
        for i, link in links:
            silent = now - link.seen
            if silent > self.timeout and link.lost is None:
                return WorkerLost(r.index, i, f"rank {i} (pid {pids.get(i)}) stopped answering "
                                              f"(no heartbeat for {silent:.1f} s)", link.seen)
        if worst is not None and worst[1].stuck(now) > limit:
            i, link = worst
            return WorkerLost(r.index, i, f"rank {i} (pid {pids.get(i)}) stopped answering "
                                          f"(inside one step for {link.stuck(now):.1f} s)",
                              now - link.stuck(now))
        gone = [e for e in exits if e.code == EXIT_PEER_LOST] + [
            WorkerExit(i, pids.get(i, 0), None, now) for i, link in links if link.lost]
        if gone:
            r.peer_lost_at = r.peer_lost_at or now
            if now - r.peer_lost_at > BLAME_GRACE_S:
                e = gone[0]
                what = e.describe() if e.code is not None else f"rank {e.rank} closed its link"
                return WorkerLost(r.index, e.rank, what, self._seen(r, e.rank))
        return None

    def _seen(self, r: Replica, index: int) -> float | None:
        link = r.links.get(index)
        return link.seen if link else None

    # ---- the engine's guard ------------------------------------------------------------
    def poll(self, engine: LLMEngine) -> None:
        """Between steps: rejoin restarted replicas, recover one lost while idle, and time
        the replay of the last recovery."""
        while self._rejoin:
            ex, rec = self._rejoin.pop(0)
            engine.add_replica(ex)
            log.warning("replica %d rejoined (restart %.2f s, reload %.2f s, warm-up %.2f s)",
                        ex.replica, rec.restart_s, rec.reload_s, rec.warmup_s)
        busy = {rep.executor.replica for rep in engine.replicas if rep.in_flight}
        for rep in list(engine.replicas):
            r = self.replicas[rep.executor.replica]
            if r.failure is not None and r.index not in busy:
                self.recover(engine, r.failure)
        if self._replay_rec:
            self._replay = {rid: (req, n) for rid, (req, n) in self._replay.items()
                            if not req.finished and len(req.output_ids) <= n}
            if not self._replay:
                for rec, t0 in self._replay_rec:
                    rec.replay_s = time.monotonic() - t0
                    log.warning("recovery of replica %d: %s", rec.replica, asdict(rec))
                self._replay_rec = []

    def recover(self, engine: LLMEngine, failure) -> bool:
        """A step failed with a lost worker: recover every lost replica, or raise
        RuntimeError with the reason when nothing can (policy fail, --max-restarts)."""
        if not isinstance(failure, WorkerLost):
            return False
        lost = {failure.replica: failure}
        for rep in engine.replicas:  # the others' aborted steps: drop their tokens
            k = rep.executor.replica
            if self.replicas[k].failure is not None:
                lost.setdefault(k, self.replicas[k].failure)
            elif k not in lost:
                try:
                    rep.executor.reset()
                except WorkerLost as e:
                    lost[k] = e
        for k, f in lost.items():
            self._recover_replica(engine, self.replicas[k], f)
        return True

    def _recover_replica(self, engine: LLMEngine, r: Replica, failure: WorkerLost) -> None:
        t_detect = time.monotonic()
        single = len(engine.replicas) == 1  # nothing serves meanwhile: requests wait
        if single and self.policy != "fail":
            self.state = "recovering"
        found = self._blame(r) or failure
        cause = str(found)
        r.status = "lost"
        keep = found.peer if can_rejoin(self, r, found.peer) else None
        if keep is not None:  # the survivors stay: cli.rejoin
            r.crew.kill_one(keep)
        else:
            r.crew.kill()
            r.close_links()
        if self.policy == "fail":
            self._give_up(f"{cause} (--on-failure fail)")
        seen = found.seen_s if found.seen_s is not None else t_detect
        rec = Recovery(r.index, cause, detect_s=max(0.0, t_detect - seen),
                       detected_at=time.time() - (time.monotonic() - t_detect))
        index = next(i for i, rep in enumerate(engine.replicas) if rep.executor.replica == r.index)
        sched = engine.replicas[index].scheduler
        reqs = list(sched.running) + [q for q in sched.waiting if q.output_ids]
        log.warning("replica %d lost: %s; restarting its workers", r.index, cause)
        if not single:
            rec.moved = engine.fail_over(index)
            threading.Thread(target=self._restart_in_background,
                             args=(engine, r, rec, keep, found), daemon=True).start()
        else:
            if self.policy == "replan":
                try:
                    self._replan(r, found, rec)
                except RuntimeError as e:
                    self._give_up(str(e))
            ex = self._restart_warm(engine, r, rec, keep)
            rec.replayed = engine.replace_executor(index, ex)
            self.state = "ok"
        self.recoveries.append(rec)
        self._replay.update({q.id: (q, len(q.output_ids)) for q in reqs})
        self._replay_rec.append((rec, time.monotonic()))

    def _replan(self, r: Replica, found: WorkerLost, rec: Recovery) -> None:
        """Plan replica ``r``'s layout again without the lost worker's stage (a rank slot
        over CPU processes); its next start runs it (the other replicas keep theirs).
        RuntimeError with the planner's reason when the model no longer fits what is left
        (or the KV cache would change: the engine's blocks are the same on every
        replica)."""
        first = r.crew.indices[0]
        lost = (found.peer - first) // (self.cp * self.tp) if found.peer >= first else r.pp - 1
        try:
            job = replan(r.job, self.args, self.config, lost)
        except PlanningError as e:
            raise RuntimeError(f"{rec.cause}; cannot re-plan: {e}") from None
        if job.runtime.max_seq_len != r.job.runtime.max_seq_len or \
                rank_spec_of(job).num_blocks != self.spec.num_blocks:
            raise RuntimeError(f"{rec.cause}; the re-planned layout changes the KV cache")
        self._place(r, job)
        rec.layout = f"{job.layout.pp} stage(s) {job.layout.bounds}"
        log.warning("replica %d re-planned without stage %d: %s", r.index, lost, rec.layout)

    def _blame(self, r: Replica) -> WorkerLost | None:
        """The worker that caused a known loss. While a link is closed but no process has
        exited yet (a killed worker's sockets close before the system reaps it: longer on a
        busy machine), only an exit counts for EXIT_GRACE_S: the survivors blocked on it
        look stuck too, and blaming one of them would restart the whole replica."""
        start = time.monotonic()
        while time.monotonic() < start + BLAME_GRACE_S:
            closed = any(link.lost is not None for link in r.links.values())
            if closed and not r.crew.exits() and time.monotonic() < start + EXIT_GRACE_S:
                time.sleep(POLL_S)
                continue
            found = self._diagnose(r, strict=False)
            if found is not None:
                return found
            time.sleep(POLL_S)
        return None

    def _restart(self, r: Replica, rec: Recovery, background: bool = False,
                 keep: int | None = None) -> None:
        """Start the replica's workers again, up to --max-restarts for the whole run (past
        it, in the background: this replica stays down, the others serve); ``keep``: only
        that lost worker, the others rejoining it with their stages (cli.rejoin)."""
        cause = rec.cause
        while True:
            if self.restarts >= self.max_restarts:
                reason = (f"{cause}; giving up after {self.restarts} restart(s) "
                          f"(--max-restarts {self.max_restarts})")
                if not background:
                    self._give_up(reason)
                r.status = "down"
                raise RuntimeError(reason)
            self.restarts += 1
            if keep is not None and rejoin(self, r, keep, rec):
                return
            keep = None
            try:
                self._spawn(r)
                rec.restart_s, rec.reload_s = self._await(r)
                return
            except WorkerLost as e:
                cause = str(e)
                log.warning("replica %d: the restart failed: %s", r.index, cause)
                r.crew.kill()

    def _restart_warm(self, engine: LLMEngine, r: Replica, rec: Recovery,
                      keep: int | None, background: bool = False) -> RankExecutor:
        """Restart replica ``r`` (_restart) and capture its graphs (LLMEngine.warmup) before
        requests return to it, as at the start: else each batch bucket's first step
        compiles while its clients wait. A warm-up that fails (a worker lost, a step stuck)
        restarts the replica again, counted against --max-restarts: its links may still
        hold the unfinished step's answer, so that executor is never used."""
        self._restart(r, rec, background=background, keep=keep)
        while True:
            ex = self.executor(r)
            try:
                rec.warmup_s = engine.warmup(executors=[ex])
                return ex
            except WorkerLost as e:
                log.warning("replica %d: the warm-up after the restart failed: %s", r.index, e)
                r.crew.kill()
                r.close_links()
                self._restart(r, rec, background=background)

    def _restart_in_background(self, engine: LLMEngine, r: Replica, rec: Recovery,
                               keep: int | None, found: WorkerLost) -> None:
        """A lost replica while others serve (they took its requests): re-planned first
        with ``--on-failure replan``, then started again and warmed up; it stays down, with
        the reason in ``status``, when the model no longer fits its devices left, past
        --max-restarts, or on any other error (never half-started)."""
        try:
            if self.policy == "replan":
                self._replan(r, found, rec)
            ex = self._restart_warm(engine, r, rec, keep, background=True)
        except Exception as e:  # noqa: BLE001 - this thread's end: the reason goes to status
            if not isinstance(e, RuntimeError):
                log.exception("replica %d: the restart failed", r.index)
                r.crew.kill()
                r.close_links()
            r.status, r.down_reason = "down", str(e) or type(e).__name__
            log.error("replica %d stays down: %s", r.index, r.down_reason)
            return
        self._rejoin.append((ex, rec))

    def _give_up(self, reason: str) -> None:
        self.state, self.error = "failed", reason
        self.kill()
        raise RuntimeError(reason)

    # ---- status and shutdown -----------------------------------------------------------
    def status(self) -> dict:
        """For /health and /metrics."""
        live = sum(r.status == "running" for r in self.replicas)
        return {"status": self.state, "error": self.error, "replicas": len(self.replicas),
                "replicas_running": live, "restarts": self.restarts,
                "stages": self.replicas[0].pp, "layout": self.replicas[0].job.layout.bounds,
                "replica_stages": [r.pp for r in self.replicas],
                "replicas_down": {r.index: r.down_reason for r in self.replicas
                                  if r.down_reason is not None},
                "recoveries": [asdict(rec) for rec in self.recoveries]}

    def live_stats(self) -> list[dict]:
        """``LLM.stage_stats``: each connected worker's statistics from its last heartbeat
        (distributed.link; runtime.live_stats), by rank; after the shutdown the final
        reports."""
        if self.final_reports:
            return self.final_reports
        beats = [dict(link.stats) for r in self.replicas for link in list(r.links.values())
                 if link.stats is not None]
        return sorted(beats, key=lambda s: s["rank"])

    def expert_load(self) -> dict[int, list[int]]:
        """``LLM.expert_load``: every MoE layer of every stage, summed over the replicas."""
        return merge_expert_load(self.live_stats())

    def stats_of(self, engine: LLMEngine):
        """``LLM.final_stage_stats``: the first call closes the engine (END reaches every
        rank) and collects every worker's report; later calls repeat them."""
        reports: list[dict] = []

        def stage_stats() -> list[dict]:
            if not reports:
                reports.extend(self.shutdown(engine))
            return reports
        return stage_stats

    def shutdown(self, engine: LLMEngine | None) -> list[dict]:
        """Close the engine (END to every replica), collect the reports, and make sure no
        worker outlives the front."""
        for r in self.replicas:
            if r.status == "running":
                r.status = "closing"
        reports = []
        if engine is not None:
            engine.close()
            deadline = time.monotonic() + max(self.timeout, 10.0)
            for r in self.replicas:
                for link in r.links.values() if r.status == "closing" else ():
                    while time.monotonic() < deadline:
                        obj = link.get(link.objects, POLL_S)
                        if isinstance(obj, dict) and "report" in obj:
                            reports.append(obj["report"])
                            break
                        if obj is not None and not isinstance(obj, dict):
                            break
            for r in self.replicas:
                r.crew.wait(max(0.0, deadline - time.monotonic()))
        self.kill()
        reports.sort(key=lambda s: s["rank"])
        self.final_reports = self.final_reports or reports
        return reports

    def kill(self) -> None:
        self._stop.set()
        for r in self.replicas:
            r.status = "down"
            r.crew.kill()
            r.close_links()
        try:
            self._listener.close()
        except OSError:
            pass


def run_front(kind: str, args, job: Job, ckpt, tok, command) -> int:
    """cli.run's multi-process path: start the workers, run ``command`` on the engine here."""
    from llamadist.api import LLM
    front = Front(args, job, ckpt.config)
    engine = None
    try:
        front.start()
        engine = LLMEngine([front.executor(r) for r in front.replicas], tok, job.runtime,
                           front.spec.num_blocks, front.block_size)
        engine.guard = front
        if kind not in ("generate", "chat"):  # as cli.run: interactive commands capture lazily
            engine.warmup()
        llm = LLM.over(engine, ckpt, tok, front.spec.runtime, job.layout, front.live_stats,
                       front.expert_load, final_stats=front.stats_of(engine))
        llm.front = front
        return command(args, job, llm)
    except (WorkerLost, RuntimeError) as e:
        if front.error is None and not isinstance(e, WorkerLost):
            raise
        sys.stdout.flush()
        print(f"llamadist: error: {front.error or e}", file=sys.stderr)
        return 1
    finally:
        front.shutdown(engine if front.state != "failed" else None)
