"""The HTTP process of ``llamadist serve``: uvicorn and the FastAPI app (serve.app),
tokenizing prompts and writing every response, apart from the engine's process, whose
engine thread is host-bound at large batches and must not share its interpreter lock
with the per-token HTTP work. serve.server starts it once the model is loaded:

    python -m llamadist.serve.http_server ADDRESS     (the key in LLAMADIST_SERVE_KEY)

It connects to ADDRESS (an AF_UNIX multiprocessing Listener, authenticated with the key),
receives its HttpConfig (the tokenizer, the model's name and limits, --host, --port,
--api-key, --max-queue), binds the port, prints the startup line, and serves until
SIGTERM/SIGINT (stop accepting, give open requests ``GRACE_S`` seconds, cancel the rest,
exit 0) or until the engine's process closes the connection."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

import uvicorn

from llamadist.serve.app import ServeConfig, Server, build_app
from llamadist.serve.engine_client import EngineClient
from llamadist.serve.metrics import HttpMetrics
from llamadist.serve.openai_api import Frontend

AUTHKEY_ENV = "LLAMADIST_SERVE_KEY"
GRACE_S = 5


@dataclass
class HttpConfig:
    """What the HTTP process needs from the engine's process, sent once at the start."""
    model_name: str
    tokenizer: object          # generation.tokenizer.Tokenizer (prompts and chat template)
    max_seq_len: int
    vocab_size: int
    api_key: str | None = None
    max_queue: int = 256
    host: str = "127.0.0.1"
    port: int = 8000
    banner: str = ""           # the startup line, printed once the port is bound
    fd: int | None = None      # the port's socket, bound before the model loaded (cli.jobs)


def build_http_app(conn, cfg: HttpConfig):
    """(app, EngineClient) over a connection to an EngineHost."""
    client = EngineClient(conn, tokenizer=cfg.tokenizer)  # streamed text made here
    frontend = Frontend(client, cfg.tokenizer, cfg.model_name, cfg.max_seq_len,
                        cfg.vocab_size)
    server = Server(frontend, HttpMetrics(), ServeConfig(cfg.model_name, cfg.api_key,
                                                         cfg.max_queue))
    return build_app(server), client


class UvicornServer(uvicorn.Server):
    """uvicorn's server, whose SIGINT/SIGTERM ends the serve loop and lets the process
    exit 0 (uvicorn's own re-raises the signal after shutdown: exit -15); it prints the
    startup line once the port is bound."""

    banner = ""
    client: EngineClient | None = None  # started on the loop, before the port opens

    @contextlib.contextmanager
    def capture_signals(self):
        def stop(sig: int, _frame) -> None:
            if self.should_exit:  # a second signal: do not wait for open requests
                self.force_exit = True
            elif self.client is not None:  # what is still open near the grace period's
                # end is answered (503, a stream's error event) before uvicorn cuts it
                self.client.end_streams_later(max(GRACE_S - 1, 0), "the server is "
                                              "shutting down (SIGTERM or SIGINT)")
            self.should_exit = True
        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    async def serve(self, sockets=None) -> None:
        if self.client is not None:
            self.client.start()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.banner:
            print(self.banner, file=sys.stderr, flush=True)


def serve_http(conn, cfg: HttpConfig) -> int:
    """Serve until stopped; 0, or 1 when the engine's connection was lost. uvicorn's
    ``auto`` picks its fast parts when they are installed (the ``serve`` extra): the
    httptools parser (else h11) and uvloop's event loop (else asyncio's); ``Server.run``
    makes the loop (an ``asyncio.run`` of our own would always make asyncio's)."""
    app, client = build_http_app(conn, cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=GRACE_S,
                            lifespan="off", http="auto", loop="auto")
    server = UvicornServer(config)
    server.banner, server.client = cfg.banner, client

    def lost() -> None:  # the engine's process is gone: nothing left to serve
        print(f"llamadist: the HTTP server stops: the engine's connection closed "
              f"({client.error})", file=sys.stderr, flush=True)
        server.should_exit = True
    client.on_lost = lost
    # listen on the socket bound for us (the loop calls listen())
    server.run(sockets=[socket.socket(fileno=cfg.fd)] if cfg.fd is not None else None)
    return 0 if server.started and client.error is None else 1


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Client
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    key = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    conn = Client(argv[0], family="AF_UNIX", authkey=key)
    cfg: HttpConfig = conn.recv()
    try:
        return serve_http(conn, cfg)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
