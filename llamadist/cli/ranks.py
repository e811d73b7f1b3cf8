"""generate, chat, bench and serve as one rank of a multi-process run.

* Started by ``llamadist ... --nproc N`` (cli.front: the launcher process is the front and
  no rank): ``run_worker`` connects to the front, takes the ``RankSpec``, loads its stage
  and serves steps until the front closes; every rank is a worker.
* Under torchrun (no front of ours): rank 0 is the front. It builds the Job, broadcasts
  what every rank must agree on (``RankSpec``), and runs the same engine and the same
  commands as one process does (cli.run), its executors driving the other ranks. Every
  other rank loads its stage and serves steps until the front closes. A dead rank ends
  the run (nothing outlives the world's rank 0)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from llamadist.cli.args import USER_ERRORS, grid_flags, runtime_config
from llamadist.cli.jobs import JOBS, Job, inherited_layout
from llamadist.distributed.faults import EXIT_PEER_LOST, PeerError
from llamadist.distributed.link import FRONT_ENV
from llamadist.runtime.worker import RankSpec, Session, setup_worker_logging

log = logging.getLogger(__name__)
Command = Callable[[argparse.Namespace, Job, Any], int]  # cli.run's generate, chat, bench, serve


def run_rank(kind: str, args: argparse.Namespace, command: Command) -> int:
    """This rank's part of ``kind``; on rank 0, ``command`` (cli.run's) runs the job."""
    if os.environ.get(FRONT_ENV):
        return run_worker(args)
    rank = int(os.environ["RANK"])
    setup_worker_logging(rank, args.verbose)
    # The grid: the layout the front process decided (--auto included), else the flags.
    layout = inherited_layout()
    pp, tp, dp, devices = ((layout.pp, layout.tp, layout.dp, ",".join(layout.devices))
                           if layout else (*grid_flags(args)[:3], args.devices))
    cp = layout.cp if layout else getattr(args, "cp", 1)
    try:
        # the timeout is needed before rank 0's Job exists: the flags' RuntimeConfig gives it
        session = Session.start(pp, tp, dp, runtime_config(args).timeout, devices, cp)
        code = _run(kind, session, args, command)
        session.close()
        return code
    except PeerError as e:
        _die(rank, str(e), EXIT_PEER_LOST)
    except KeyboardInterrupt:
        _die(rank, "interrupted", 130)
    except USER_ERRORS as e:
        if args.verbose:
            log.exception("rank %d failed", rank)
        _die(rank, str(e).strip().splitlines()[0] if str(e).strip() else repr(e), 2)
    except Exception:  # noqa: BLE001 - any other failure: say which rank, then leave
        log.exception("rank %d failed", rank)
        _die(rank, "see the traceback above", 1)
    return 1  # not reached


def run_worker(args: argparse.Namespace) -> int:
    """A worker under the front: connect, take the setup, load only this rank's stage,
    report ready (with the load time), serve steps until END, send the statistics."""
    import time

    from llamadist.distributed.link import INDEX_ENV, TOKEN_ENV, WorkerLink
    from llamadist.runtime.live_stats import LiveStats
    from llamadist.weights.checkpoint import open_checkpoint
    index = int(os.environ[INDEX_ENV])
    setup_worker_logging(index, args.verbose)
    try:
        timeout = runtime_config(args).timeout
        link = WorkerLink(os.environ[FRONT_ENV], index, os.environ[TOKEN_ENV],
                          beat_s=min(1.0, timeout / 4))
        setup = link.recv_obj()
        session = Session.start(setup["pp"], setup["tp"], 1, setup["timeout"],
                                setup["devices"], setup["cp"])
        t0 = time.perf_counter()
        rank_stage = session.load(open_checkpoint(args.model), setup["spec"],
                                  front_link=link)
        link.stuck = lambda: (time.monotonic() - rank_stage.in_step_since
                              if rank_stage.in_step_since is not None else 0.0)
        link.stats = LiveStats(rank_stage, rank_identity(session) | {
            "rank": index, "dp": setup["replica"]})
        link.send_obj({"ready": index, "load_s": time.perf_counter() - t0})
        serve_rejoining(session, link, index, setup.get("rejoin", False))
        link.send_obj({"report": rank_report(session) | {"rank": index,
                                                         "dp": setup["replica"]}})
        session.close()
        link.close()
        return 0
    except PeerError as e:
        _die(index, str(e), EXIT_PEER_LOST)
    except KeyboardInterrupt:
        _die(index, "interrupted", 130)
    except Exception:  # noqa: BLE001 - any other failure: say which worker, then leave
        log.exception("worker %d failed", index)
        _die(index, "see the traceback above", 1)
    return 1  # not reached


def serve_rejoining(session: Session, link, index: int, rejoin: bool) -> None:
    """Serve steps until END. With ``rejoin`` (cli.rejoin: the front may keep survivors), a
    lost peer does not end this worker: it takes the front's order (skipping the steps
    sent to the broken world), says so, joins the new world on the port given with its
    stage kept, says so again, and serves on. Without, a lost peer ends it as before."""
    import torch.distributed as dist

    from llamadist.distributed.link import Rejoin
    while True:
        try:
            session.rank_stage.serve()
            return
        except Rejoin as e:
            order = e.order
        except (PeerError, dist.DistError) as e:
            if not rejoin:
                raise
            log.warning("worker %d: %s; waiting for the front", index, str(e).splitlines()[0])
            order = None
        # outside the except clause: its traceback's frames hold the old groups
        order = order or link.await_order()
        if "rejoin" not in order:
            raise PeerError(-1, f"worker {index}: unexpected order from the front: {order}")
        link.send_obj({"rejoining": index})
        session.rejoin(int(order["rejoin"]))
        link.send_obj({"rejoined": index})


def _die(rank: int, message: str, code: int) -> None:
    """Report and leave at once: the interpreter's teardown could hang on a process group
    whose peers are gone, and the launcher is waiting for this exit to clean up."""
    sys.stdout.flush()
    sys.stderr.write(f"llamadist[rank {rank}]: error: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def rank_spec(session: Session, job: Job) -> RankSpec:
    """What every rank must agree on before loading, from rank 0's Job."""
    from llamadist.cli.front import rank_spec_of
    g, layout = session.groups, job.layout
    if (layout.pp, layout.tp, layout.dp, layout.cp) != (g.pp_size, g.tp_size, g.dp_size,
                                                        g.cp_size):
        raise ValueError(f"the layout (pp={layout.pp} tp={layout.tp} cp={layout.cp} "
                         f"dp={layout.dp}) does not match the process grid (pp={g.pp_size} "
                         f"tp={g.tp_size} cp={g.cp_size} dp={g.dp_size}): give the same "
                         f"--pp/--tp/--cp/--dp to every rank")
    return rank_spec_of(job)


def _agree(session: Session, args: argparse.Namespace, kind: str, ckpt, tok
           ) -> tuple[Job | None, RankSpec | None]:
    """Rank 0 builds the Job and the RankSpec; the spec (or rank 0's user error, which
    every rank then leaves on quietly) reaches every rank."""
    job, setup = None, None
    if session.is_driver:
        try:
            job = JOBS[kind](args, ckpt, tok)
            setup = rank_spec(session, job)
        except USER_ERRORS as e:
            setup = ("error", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    setup = session.broadcast(setup, "the layout")
    if isinstance(setup, tuple):
        if session.is_driver:
            print(f"llamadist: error: {setup[1]}", file=sys.stderr)
        return None, None
    return job, setup


def _run(kind: str, session: Session, args: argparse.Namespace, command: Command) -> int:
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    job, spec = _agree(session, args, kind, ckpt, tok)
    if spec is None:
        return 2 if session.is_driver else 0
    progress = session.is_driver and sys.stderr.isatty() and kind != "bench"
    rank_stage = session.load(ckpt, spec, progress=progress)
    if not session.is_driver:
        rank_stage.serve()
        session.gather(rank_report(session))
        return 0
    from llamadist.api import LLM
    engine = front_engine(session, spec, tok)
    if kind not in ("generate", "chat"):  # as cli.run: interactive commands capture lazily
        engine.warmup()
    llm = LLM.over(engine, ckpt, tok, spec.runtime, job.layout, FrontStats(session, engine),
                   rank_stage.stage.expert_load)
    try:
        return command(args, job, llm)
    finally:
        llm.stage_stats()  # closes the engine (every rank leaves its loop) if not yet


def front_engine(session: Session, spec: RankSpec, tok):
    """The engine on rank 0: one executor per data-parallel replica."""
    from llamadist.engine.engine import LLMEngine
    from llamadist.engine.executor import RankExecutor
    g = session.groups
    devices = [str(g.ctx.device)] * (g.pp_size * g.tp_size)
    executors = [RankExecutor(session.rank_stage, k, devices) for k in range(g.dp_size)]
    return LLMEngine(executors, tok, spec.runtime, spec.num_blocks,
                     spec.block_size * g.cp_size, lockstep=spec.ep > g.tp_size)


def rank_identity(session: Session) -> dict:
    """Where this rank sits: stage, rank, replica, TP and CP index, layers, device."""
    g, st = session.groups, session.rank_stage.stage
    return {"stage": g.pp_index, "rank": g.rank, "dp": g.dp_index, "tp": g.tp_index,
            "cp": g.cp_index, "layers": [st.layers.start, st.layers.stop],
            "device": str(st.device)}


def rank_report(session: Session) -> dict:
    """This rank's statistics, shaped like an in-process stage's (cli.run prints both)."""
    rs = session.rank_stage
    rs.settle_timing()  # the timed steps' device seconds still unread (runtime.work_timer)
    st = rs.stage
    report = {**rank_identity(session), **st.stats.to_dict(), **rs.stats.to_dict(),
              "bytes_sent": rs.pipe.stats.bytes_sent}
    if st.model.config.is_moe:
        report["expert_load"] = {str(k): v for k, v in st.expert_load().items()}
        replicas = {i: getattr(layer.block_sparse_moe, "replicas", None)
                    for i, layer in st.model.model.layers.items()}
        if any(replicas.values()):  # --hot-experts: the copies this rank holds
            report["expert_replicas"] = {i: r for i, r in replicas.items() if r}
        owned = {i: getattr(layer.block_sparse_moe, "owned", None)
                 for i, layer in st.model.model.layers.items()}
        if any(owned.values()):  # expert parallelism: this rank's share of each layer
            report["experts"] = {i: sorted(o) for i, o in owned.items() if o}
    return report


class FrontStats:
    """Rank 0's ``LLM.stage_stats``: the first call closes the engine (END reaches every
    rank, which leaves its loop) and gathers every rank's report; later calls repeat it."""

    def __init__(self, session: Session, engine):
        self.session, self.engine, self.reports = session, engine, None

    def __call__(self) -> list[dict]:
        if self.reports is None:
            self.engine.close()
            self.reports = self.session.gather(rank_report(self.session))
        return self.reports
