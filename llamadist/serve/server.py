"""``llamadist serve``: the engine here, the HTTP server in a process of its own.

    this process (loaded the model; with --nproc the front of cli.front)
      ├── engine thread: AsyncEngine over LLMEngine, one step after another
      ├── EngineHost thread: the HTTP process's commands (serve.engine_host)
      ├── HTTP process: uvicorn + the FastAPI app (serve.http_server), one local
      │   connection to the EngineHost: submits and cancels in, one message per step out
      └── worker ranks (--nproc; cli.front)

Per token, the HTTP work (a queue wake-up, a generator resume, the chunk's JSON, the
socket write) costs tens of microseconds per stream; at hundreds of streams per step, in
the engine's process, that time under the interpreter lock would be added to every step
of an engine thread that is itself host-bound. In its own process it overlaps the step.

Lifecycle: SIGTERM or SIGINT here (Ctrl-C reaches only this process group: the HTTP
process has a session of its own) is passed on to the HTTP process, which stops
accepting, gives open requests ``GRACE_S`` seconds, cancels the rest and exits; then the
engine stops and the command returns 0 (rank 0 then closes the worker ranks). A second
signal cuts the open requests at once. An HTTP process that dies by itself ends the
command with 1 and says so; an engine that failed for good over worker processes ends
the HTTP process ``FAIL_GRACE_S`` later and the command returns 1.

The port was bound by cli.jobs.check_port before the weights loaded (not listening:
clients are refused meanwhile, and no other process can take it); the HTTP process
inherits that socket and listens on it.

``build_server`` keeps the whole server in one process (the two sides over a Pipe) for
the Python API: an app to serve with one's own uvicorn."""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Listener
from pathlib import Path

from llamadist.engine.async_engine import AsyncEngine
from llamadist.serve.engine_host import EngineHost
from llamadist.serve.http_server import AUTHKEY_ENV, GRACE_S, HttpConfig
from llamadist.serve.metrics import ServeMetrics

FAIL_GRACE_S = 2.0
CONNECT_S = 120.0  # the HTTP process's start (imports) until it connects


def served_name(args: argparse.Namespace) -> str:
    if getattr(args, "served_model_name", None):
        return args.served_model_name
    return Path(str(args.model)).name if Path(str(args.model)).exists() else str(args.model)


def engine_side(llm) -> tuple[AsyncEngine, ServeMetrics, object]:
    """The engine thread over a loaded ``api.LLM``, its metrics, and the front (the
    workers of --nproc) or None."""
    tok = llm.llm_engine.tokenizer
    if tok is not None and hasattr(tok, "byte_table"):
        tok.byte_table()  # the streams' byte table now, not in the first stream's step
    engine = AsyncEngine(llm.llm_engine)
    front = getattr(llm, "front", None)  # cli.front.Front: the workers of --nproc
    # torchrun's rank 0 has no statistics before the end (the first read closes the run)
    metrics = ServeMetrics(engine, llm.stage_stats if llm.stats_live else None,
                           llm.expert_load if llm.config.is_moe else None,
                           front.status if front else None)
    return engine, metrics, front


def http_config(llm, name: str, api_key: str | None = None, max_queue: int = 256,
                host: str = "127.0.0.1", port: int = 8000, banner: str = "") -> HttpConfig:
    return HttpConfig(name, llm.tokenizer, llm.max_seq_len, llm.config.vocab_size, api_key,
                      max_queue, host, port, banner)


def build_server(llm, name: str, api_key: str | None = None, max_queue: int = 256):
    """(app, AsyncEngine) over a loaded ``api.LLM``, all in this process: the app's
    EngineClient and the EngineHost talk over a Pipe."""
    from llamadist.serve.http_server import build_http_app
    engine, metrics, front = engine_side(llm)
    here, there = multiprocessing.Pipe()
    EngineHost(engine, metrics, here, front.status if front else None).start()
    app, _ = build_http_app(there, http_config(llm, name, api_key, max_queue))
    return app, engine


class HttpProcess:
    """The HTTP child: started, connected (an AF_UNIX listener in a private folder, an
    authentication key), stopped."""

    def __init__(self, cfg: HttpConfig, sock: socket.socket | None = None):
        self.dir = tempfile.mkdtemp(prefix="llamadist-serve-")
        address, key = os.path.join(self.dir, "engine.sock"), secrets.token_bytes(32)
        self.listener = Listener(address, family="AF_UNIX", authkey=key)
        if sock is not None:  # the port, bound before the load: the child listens on it
            cfg = replace(cfg, fd=sock.fileno())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llamadist.serve.http_server", address],
            env={**os.environ, AUTHKEY_ENV: key.hex()}, start_new_session=True,
            pass_fds=(sock.fileno(),) if sock is not None else ())
        if sock is not None:
            sock.close()  # the child's copy is the one that listens
        self.conn = None
        self.stop_asked: float | None = None
        try:
            self.conn = self._accept()
            self.conn.send(cfg)
        except BaseException:
            self.kill()
            raise

    def _accept(self):
        box: dict = {}

        def accept() -> None:
            try:
                box["conn"] = self.listener.accept()
            except Exception as e:  # noqa: BLE001 - e.g. a wrong key: said below
                box["error"] = e
        t = threading.Thread(target=accept, daemon=True)
        t.start()
        deadline = time.monotonic() + CONNECT_S
        while t.is_alive():
            t.join(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the HTTP server process exited (code "
                                   f"{self.proc.returncode}) before it connected")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server process did not connect in {CONNECT_S} s")
        if "error" in box:
            raise RuntimeError(f"the HTTP server process could not connect: {box['error']}")
        return box["conn"]

    def stop(self) -> None:
        """SIGTERM: stop accepting, finish or cancel open requests, exit (a second call
        cuts the open requests at once)."""
        if self.stop_asked is None:
            self.stop_asked = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        for c in (self.conn, self.listener):
            try:
                if c is not None:
                    c.close()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def serve(args: argparse.Namespace, job, llm, sock: socket.socket | None = None) -> int:
    """cli.run's ``serve`` command (the same on one process and on rank 0); ``sock``: the
    port, bound already (else the HTTP process binds it)."""
    name = served_name(args)
    engine, metrics, front = engine_side(llm)
    banner = (f"llamadist: serving {name!r} on http://{args.host}:{args.port} "
              f"({job.layout.pp} stage(s) x {job.layout.processes} process(es), at most "
              f"{job.runtime.max_batch} sequences at once, context {job.max_seq_len}; "
              f"engine pid {os.getpid()}, HTTP in a process of its own)")
    try:
        http = HttpProcess(http_config(llm, name, args.api_key, args.max_queue, args.host,
                                       args.port, banner), sock)
    except BaseException:
        engine.shutdown()
        raise
    # what is loaded lives as long as the server: out of the collector's sight, a full
    # collection stops costing ~150 ms of the engine's thread every few hundred steps
    # (benchmarks/RESULTS.md, "The engine's host time per sequence per decode step")
    gc.collect()
    gc.freeze()
    host = EngineHost(engine, metrics, http.conn, front.status if front else None).start()
    old = {s: signal.signal(s, lambda *_: http.stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = _wait(http, engine, front is not None)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if http.proc.poll() is None:
            http.kill()
        host.close()
        http.close()
        engine.shutdown()
    if engine.error is not None:
        print(f"llamadist: error: the engine failed: {engine.error}", file=sys.stderr)
        return 1
    if http.stop_asked is None:
        print(f"llamadist: error: the HTTP server process (pid {http.proc.pid}) exited by "
              f"itself ({_exit_text(code)}); the engine stopped", file=sys.stderr)
        return 1
    return 0


def _wait(http: HttpProcess, engine: AsyncEngine, over_workers: bool) -> int:
    """Until the HTTP process exits (its exit code). Over worker processes, an engine that
    failed for good (a worker lost past --max-restarts, or --on-failure fail) stops the
    HTTP process FAIL_GRACE_S later: long enough for clients to read the error events and
    the 503, then a service manager restarts it. A stopped server with no workers must
    not pose as one. An HTTP process that does not finish in time is killed."""
    failed_at = None
    while True:
        try:
            return http.proc.wait(0.2)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if over_workers and engine.error is not None and http.stop_asked is None:
            failed_at = failed_at or now
            if now - failed_at > FAIL_GRACE_S:
                http.stop()
        if http.stop_asked is not None and now - http.stop_asked > GRACE_S + 15:
            print(f"llamadist: the HTTP server process (pid {http.proc.pid}) did not stop "
                  f"{GRACE_S + 15} s after SIGTERM: killed", file=sys.stderr, flush=True)
            http.proc.kill()


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
