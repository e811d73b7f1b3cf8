"""``llamadist serve``: the HTTP server next to the engine, in the front process (one
process, or rank 0 of a multi-process layout, whose executors drive the other ranks).
uvicorn owns SIGINT/SIGTERM: it stops accepting, gives open requests
``GRACE_S`` seconds, cancels the rest (their blocks freed), then the engine thread stops
and the command returns 0 (rank 0 then closes the worker ranks)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn

from llamadist.engine.async_engine import AsyncEngine

GRACE_S = 5
FAIL_GRACE_S = 2.0


def served_name(args: argparse.Namespace) -> str:
    if getattr(args, "served_model_name", None):
        return args.served_model_name
    return Path(str(args.model)).name if Path(str(args.model)).exists() else str(args.model)


def build_server(llm, name: str, api_key: str | None = None, max_queue: int = 256):
    """(app, AsyncEngine) over a loaded ``api.LLM``."""
    from llamadist.serve.app import ServeConfig, Server, build_app
    from llamadist.serve.metrics import ServeMetrics
    from llamadist.serve.openai_api import Frontend
    engine = AsyncEngine(llm.llm_engine)
    front = getattr(llm, "front", None)  # cli.front.Front: the workers of --nproc
    # torchrun's rank 0 has no statistics before the end (the first read closes the run)
    metrics = ServeMetrics(engine, llm.stage_stats if llm.stats_live else None,
                           llm.expert_load if llm.config.is_moe else None,
                           front.status if front else None)
    frontend = Frontend(engine, llm.tokenizer, name, llm.max_seq_len, llm.config.vocab_size)
    server = Server(frontend, metrics, ServeConfig(name, api_key, max_queue),
                    front.status if front else None)
    return build_app(server), engine


class Server(uvicorn.Server):
    """uvicorn's server, whose SIGINT/SIGTERM ends the serve loop and lets the command
    return 0 (uvicorn's own re-raises the signal after shutdown: exit -15)."""

    @contextlib.contextmanager
    def capture_signals(self):
        def stop(sig: int, _frame) -> None:
            if self.should_exit:  # a second signal: do not wait for open requests
                self.force_exit = True
            self.should_exit = True
        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def _stop_when_failed(engine: AsyncEngine, server: "Server") -> None:
    """Over worker processes, an engine that failed for good (a worker lost past
    --max-restarts, or --on-failure fail) ends the server FAIL_GRACE_S later: long enough
    for clients to read the error events and the 503, then a service manager restarts
    it. A stopped server with no workers must not pose as one."""
    while engine.alive and not server.should_exit:
        time.sleep(0.2)
    if engine.error is not None and not server.should_exit:
        time.sleep(FAIL_GRACE_S)
        server.should_exit = True


def serve(args: argparse.Namespace, job, llm) -> int:
    """cli.run's ``serve`` command (the same on one process and on rank 0)."""
    name = served_name(args)
    app, engine = build_server(llm, name, args.api_key, args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=GRACE_S,
                            lifespan="off")
    server = Server(config)
    print(f"llamadist: serving {name!r} on http://{args.host}:{args.port} "
          f"({job.layout.pp} stage(s) x {job.layout.processes} process(es), at most "
          f"{job.runtime.max_batch} sequences at once, context {job.max_seq_len})",
          file=sys.stderr, flush=True)
    if getattr(llm, "front", None) is not None:
        threading.Thread(target=_stop_when_failed, args=(engine, server), daemon=True).start()
    try:
        server.run()
    finally:
        engine.shutdown()
    if engine.error is not None:
        print(f"llamadist: error: the engine failed: {engine.error}", file=sys.stderr)
        return 1
    return 0
