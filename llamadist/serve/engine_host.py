"""The engine's side of the HTTP process's connection (serve.engine_client is the other
side): in the process that loaded the model (and, with --nproc, holds the front), a
thread receives the HTTP process's commands (submit, cancel, health, metrics, drain and
undrain) and the engine thread sends, per step, ONE message with every output of that
step in a lean form (request id, token id, text delta, finished, finish reason,
logprobs when asked; at the finish the output ids and prompt logprobs the responses
need). Request objects never cross: their prompts stay here.

The metrics live here too: ServeMetrics reads the engine at each scrape and observes
each request as it finishes or is cancelled; the HTTP process asks for the rendered
text.

Messages are pickled tuples over one multiprocessing connection.
HTTP -> engine:  ("submit", key, [(request id, prompt ids, SamplingParams, stream), ...])
                 (stream False: the client reads the text at the end, so it is made once
                 then, unless stop strings need it every step: LLMEngine.add_request's
                 stream_text)
                 ("cancel", [request id, ...])
                 ("rpc", key, name, args)   name: health | metrics | admin
engine -> HTTP:  ("step", [(id, token, text, finished, reason, logprobs, final), ...],
                          [(id, error or None), ...])   final: (output ids, prompt logprobs)
                 ("reply", key, ok, value)
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable

from llamadist.engine.async_engine import END, AsyncEngine, RequestStream
from llamadist.engine.engine import RequestOutput
from llamadist.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class EngineHost:
    """Serves one HTTP process over ``conn`` (a multiprocessing Connection)."""

    def __init__(self, engine: AsyncEngine, metrics: ServeMetrics, conn,
                 workers: Callable[[], dict] | None = None):
        self.engine, self.metrics, self.conn, self.workers = engine, metrics, conn, workers
        self._send_lock = threading.Lock()
        self.closed = threading.Event()  # the HTTP process's side closed (or a send failed)
        self._thread = threading.Thread(target=self._receive, name="llamadist-engine-host",
                                        daemon=True)

    def start(self) -> "EngineHost":
        self._thread.start()
        return self

    def send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError):  # the HTTP process is gone: nobody to tell
            self.closed.set()

    def close(self) -> None:
        self.closed.set()
        try:
            self.conn.close()
        except OSError:
            pass

    # ---- the engine thread: one message per step ----------------------------------------
    def _sink(self, pairs: list[tuple[RequestStream, object]]) -> None:
        outs, ends = [], []
        for stream, item in pairs:
            if isinstance(item, RequestOutput):
                final = None
                if item.finished:
                    req = stream.request
                    final = (list(req.output_ids), req.prompt_logprobs) if req else ([], None)
                    self.metrics.observe(req)
                outs.append((item.request_id, item.token_id, item.text, item.finished,
                             item.finish_reason, item.logprobs, final))
            elif item is END:
                if stream.request is None or stream.request.finish_reason is None \
                        or stream.request.finish_reason == "cancelled":
                    ends.append((stream.request_id, None))
                    self.metrics.observe(stream.request)
                # else: after a finished output, which already ended the stream there
            else:  # the engine failed: the reader learns why
                ends.append((stream.request_id, str(item)))
        if outs or ends:
            self.send(("step", outs, ends))

    # ---- the receiving thread ---------------------------------------------------------
    def _receive(self) -> None:
        while not self.closed.is_set():
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            try:
                self._handle(msg)
            except Exception:  # noqa: BLE001 - one bad command must not end the connection
                log.exception("the engine host failed on %r", msg[:2])
        self.closed.set()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "cancel":
            for rid in msg[1]:
                self.engine.cancel(rid)
        elif kind == "submit":
            self._submit(msg[1], msg[2])
        elif kind == "rpc":
            _, key, name, args = msg
            if name == "admin":
                self._admin(key, *args)
                return
            try:
                value = self.health() if name == "health" else self.metrics.text()
            except Exception as e:  # noqa: BLE001 - the HTTP side answers 500 with it
                self.send(("reply", key, False, (type(e).__name__, str(e))))
                return
            self.send(("reply", key, True, value))

    def _submit(self, key: int, items: list) -> None:
        """Queue every choice of a job, or none: the refusal goes back as the reply."""
        done: list[RequestStream] = []
        try:
            for rid, ids, params, stream_text in items:
                done.append(self.engine.submit(ids, params, rid, sink=self._sink,
                                               stream_text=stream_text))
        except (ValueError, RuntimeError) as e:
            for stream in done:
                stream.cancel()
            self.send(("reply", key, False, (type(e).__name__, str(e))))
            return
        self.send(("reply", key, True, None))

    def _admin(self, key: int, what: str, replica: int, kw: dict) -> None:
        """Drain or undrain a replica on the engine thread; the reply once it is done."""
        fut = self.engine.call(lambda e: getattr(e, what)(replica, **kw))

        def done(f) -> None:
            e = f.exception()
            if e is None:
                self.send(("reply", key, True, replica_states(self.engine.engine)))
            else:
                msg = str(e.args[0]) if isinstance(e, LookupError) and e.args else str(e)
                self.send(("reply", key, False, (type(e).__name__, msg)))
        fut.add_done_callback(done)

    def health(self) -> tuple[int, dict, dict]:
        """(status, body, headers) of GET /health: 200 ok; 503 recovering (a lost worker
        being replaced: requests wait, none is lost) or error (the engine stopped, and
        why)."""
        st = self.workers() if self.workers else {}
        if not self.engine.alive:
            err = st.get("error") or self.engine.error
            return 503, {"status": "error", "error": str(err) if err else "stopped"}, {}
        if st.get("status") == "recovering":
            return 503, {"status": "recovering", "restarts": st["restarts"]}, \
                {"Retry-After": "5"}
        extra = ({"replicas": f"{st['replicas_running']}/{st['replicas']}",
                  "restarts": st["restarts"], "stages": st["stages"]} if st else {})
        states = replica_states(self.engine.engine)
        if len(states) > 1:  # data parallel: which replica serves, drains or is drained
            extra["replica_states"] = states
        if st.get("recoveries"):
            extra["last_recovery"] = st["recoveries"][-1]
        if st.get("replicas_down"):  # past recovery (cli.front): why each stays down
            extra["replicas_down"] = {str(k): v for k, v in st["replicas_down"].items()}
        return 200, {"status": "ok", **extra}, {}


def replica_states(engine) -> dict[str, dict]:
    """The engine's replicas, read from another thread: state and steps launched."""
    try:
        return {str(k): v for k, v in engine.replica_states().items()}
    except RuntimeError:  # the engine thread changed them meanwhile: ask again
        return {str(k): v for k, v in engine.replica_states().items()}
