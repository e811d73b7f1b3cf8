"""The engine's side of the HTTP process's connection (serve.engine_client is the other
side): in the process that loaded the model (and, with --nproc, holds the front), a
thread receives the HTTP process's commands (submit, cancel, health, metrics, drain and
undrain) and the engine thread sends, per step, ONE message with every output of that
step as columns (request ids, token ids, text deltas; logprobs only for the outputs that
have them; at a finish the reason, output ids and prompt logprobs the responses need).
Request objects never cross: their prompts stay here.

A streamed request without stop strings has its text made in the HTTP process (which
has the tokenizer) from the token ids of each step: detokenizing 256 streams per step
here would be done by the engine thread, under the interpreter lock, between steps.

A request that neither streams nor asks for logprobs (a whole response) is sent nothing
before its last output, which carries its whole text: the HTTP process reads nothing
else of it, and at batch 256 each output sent costs the engine thread (building,
pickling) and the HTTP process (unpickling, waking its reader) time per step.

The metrics live here too: ServeMetrics reads the engine at each scrape and observes
each request as it finishes or is cancelled; the HTTP process asks for the rendered
text.

Messages are pickled tuples over one multiprocessing connection.
HTTP -> engine:  ("submit", [(key, [(request id, prompt ids, SamplingParams, stream), ...]),
                             ...])  every job submitted in one turn of the HTTP process's
                 loop (a wave of new requests: one message, one reply message), each
                 job's choices queued or refused together
                 stream True: the text is made here every step (the stream has stop
                 strings, or the HTTP process has no tokenizer); False: the client reads
                 the text at the end, so it is made once then, unless stop strings need
                 it every step (LLMEngine.add_request's stream_text); "ids": a stream
                 whose text the HTTP process makes from the token ids (made here as for
                 False: the last output carries the whole text)
                 ("cancel", [request id, ...])
                 ("rpc", key, name, args)   name: health | metrics | admin
engine -> HTTP:  ("step", ids, tokens, texts, logprobs, finals, ends)
                    ids, tokens, texts: one entry per output (lists of str, int | None, str)
                    logprobs: [(i, TokenLogprob), ...]  the outputs i that carry them
                    finals:   [(i, reason, output ids, prompt logprobs), ...]  the outputs
                              i that finished their request
                    ends:     [(id, error or None), ...]  streams ended without a finished
                              output (a cancel, a shutdown; the engine's error)
                 ("reply", key, ok, value)     an rpc's answer
                 ("replies", [(key, ok, value), ...])   a submit message's, one a job
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
        self._sink_fn = self._sink  # one object for every stream (AsyncEngine groups by it)
        # requests whose outputs nobody reads before their last (a whole response without
        # logprobs): only that last one is sent, carrying the whole text
        self._quiet: set[str] = set()
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
        """A step's items as one message of columns (module docstring)."""
        ids, tokens, texts, lps, finals, ends = [], [], [], [], [], []
        quiet = self._quiet
        for stream, item in pairs:
            if type(item) is RequestOutput:
                rid = item.request_id
                text = item.text
                if item.finished:
                    req = stream.request
                    if rid in quiet:  # its first output here: the whole text
                        quiet.discard(rid)
                        text = req.text if req is not None else text
                    finals.append((len(ids), item.finish_reason,
                                   list(req.output_ids) if req else [],
                                   req.prompt_logprobs if req else None))
                    self.metrics.observe(req)
                elif rid in quiet:  # nobody reads it before the end
                    continue
                if item.logprobs is not None:
                    lps.append((len(ids), item.logprobs))
                ids.append(rid)
                tokens.append(item.token_id)
                texts.append(text)
            elif item is END:  # a cancel or a shutdown: the stream ends without a finish
                quiet.discard(stream.request_id)
                ends.append((stream.request_id, None))
                self.metrics.observe(stream.request)
            else:  # the engine failed: the reader learns why
                quiet.discard(stream.request_id)
                ends.append((stream.request_id, str(item)))
        if ids or ends:
            self.send(("step", ids, tokens, texts, lps, finals, ends))

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
            self.send(("replies", [self._submit(key, items) for key, items in msg[1]]))
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

    def _submit(self, key: int, items: list) -> tuple:
        """Queue every choice of a job, or none: -> its reply (key, ok, refusal)."""
        done: list[RequestStream] = []
        try:
            for rid, ids, params, stream in items:
                if stream is False and params.logprobs is None:
                    self._quiet.add(rid)
                # "ids": the HTTP process makes the text (engine_client.StreamText); the
                # engine, as for a whole response, only at the end
                done.append(self.engine.submit(ids, params, rid, sink=self._sink_fn,
                                               stream_text=stream is True))
        except Exception as e:  # noqa: BLE001 - answered: the other jobs of the message too
            for rid, *_ in items:
                self._quiet.discard(rid)
            for stream in done:
                stream.cancel()
            if isinstance(e, (ValueError, RuntimeError)):  # a refusal (400) or a stop (503)
                return key, False, (type(e).__name__, str(e))
            log.exception("the engine host failed on a submit")
            return key, False, ("RuntimeError", f"the engine failed to queue it: {e}")
        return key, True, None

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
