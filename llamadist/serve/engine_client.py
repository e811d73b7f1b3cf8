"""The HTTP process's view of the engine (serve.engine_host is the other side of the
connection): ``await submit(...)`` queues a job's choices and returns one stream each
(``async for out in stream``), ``cancel``, ``rpc`` (health, metrics, drain). A reader
thread receives the engine's messages (one per engine step) and hands each to the event
loop in one callback; the loop puts each output into its stream's queue.

A finished stream's ``request`` holds what the responses need at the end (the output
ids for usage, the prompt's logprobs for echo); no Request object crosses the processes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)
_END = object()


@dataclass(slots=True)
class StepOutput:
    """One engine step's output for one request (engine.engine.RequestOutput's fields)."""
    request_id: str
    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None
    logprobs: object | None = None  # runtime.step_work.TokenLogprob when asked for


@dataclass(slots=True)
class FinishedRequest:
    """What a finished request leaves for the response."""
    output_ids: list[int]
    prompt_logprobs: list | None
    finish_reason: str | None


class EngineStream:
    """One request's outputs: ``async for out in stream``; the engine's error, if it
    failed, is raised to the reader. (A deque and one waiter: lighter per token than an
    asyncio.Queue, and ``pending`` tells a writer that more is already here.)"""

    def __init__(self, client: "EngineClient", request_id: str):
        self.request_id = request_id
        self.request: FinishedRequest | None = None
        self._client = client
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._done = False

    def _push(self, item) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def pending(self) -> int:
        """Items received and not read yet."""
        return len(self._items)

    def __aiter__(self) -> "EngineStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = self._client._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def cancel(self) -> None:
        """Stop the request and free its KV blocks (the stream then ends)."""
        self._client.cancel([self])


class EngineClient:
    """Over ``conn`` (a multiprocessing Connection to the engine's process). ``start``
    from inside the event loop that will read the streams."""

    def __init__(self, conn, rpc_timeout_s: float = 10.0):
        self.conn = conn
        self.rpc_timeout_s = rpc_timeout_s
        self.error: str | None = None  # why the engine is unreachable (its process ended)
        self._streams: dict[str, EngineStream] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._keys = itertools.count()
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_lost = None  # called on the loop when the connection ends

    def start(self) -> "EngineClient":
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="llamadist-engine-client",
                         daemon=True).start()
        return self

    # ---- sending (on the loop) -----------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine has stopped ({self.error})")
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"the engine has stopped (its connection: {e})") from None

    async def submit(self, items: Sequence[tuple[list[int], object]],
                     stream_text: bool = True) -> list[EngineStream]:
        """Queue every (prompt ids, SamplingParams), or none: ValueError (the request
        cannot fit, with the numbers) or RuntimeError (the engine has stopped).
        ``stream_text`` False: the text is read only at the end (a response that does not
        stream): the engine makes it once, its last output carrying it whole."""
        if self._loop is None:  # (an app served by someone else's uvicorn: start here)
            self.start()
        streams = [EngineStream(self, f"h{next(self._ids)}") for _ in items]
        for s in streams:
            self._streams[s.request_id] = s
        try:
            ok, value = await self._call(
                "submit", [(s.request_id, ids, p, stream_text)
                           for s, (ids, p) in zip(streams, items)],
                timeout=None)
        except BaseException:  # e.g. the client left while waiting: queued ones are cancelled
            self.cancel(streams)
            raise
        if not ok:
            self._forget(streams)
            kind, msg = value
            raise (ValueError if kind != "RuntimeError" else RuntimeError)(msg)
        return streams

    def _forget(self, streams: list[EngineStream]) -> None:
        for s in streams:
            self._streams.pop(s.request_id, None)

    def cancel(self, streams: list[EngineStream]) -> None:
        """Cancel the streams' requests (those not over yet); each stream ends now."""
        ids = [s.request_id for s in streams if self._streams.pop(s.request_id, None)]
        for s in streams:
            if not s._done:
                s._push(_END)
        if ids and self.error is None:
            try:
                self._send(("cancel", ids))
            except RuntimeError:
                pass  # the engine is gone: nothing to free

    async def rpc(self, name: str, *args, timeout: float | None = -1):
        """Ask the engine's process (health, metrics, admin); its answer, or the error it
        raised (ValueError, LookupError, RuntimeError, TimeoutError)."""
        ok, value = await self._call("rpc", name, args,
                                     timeout=self.rpc_timeout_s if timeout == -1 else timeout)
        if ok:
            return value
        kind, msg = value
        raise {"LookupError": LookupError, "KeyError": LookupError, "ValueError": ValueError,
               "IndexError": LookupError}.get(kind, RuntimeError)(msg)

    async def _call(self, kind: str, *payload, timeout: float | None):
        if self._loop is None:
            self.start()
        key = next(self._keys)
        fut = self._loop.create_future()
        self._replies[key] = fut
        try:
            if kind == "rpc":
                self._send(("rpc", key, *payload))
            else:
                self._send((kind, key, *payload))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(key, None)

    # ---- receiving ---------------------------------------------------------------------
    def _read(self) -> None:
        """The reader thread: each message to the loop in one callback."""
        why = "its process ended"
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            except Exception as e:  # noqa: BLE001 - a message we cannot read: stop here
                why = f"a message could not be read: {e}"
                log.exception("the engine connection failed")
                break
            try:
                self._loop.call_soon_threadsafe(self._dispatch, msg)
            except RuntimeError:  # the loop has closed
                return
        try:
            self._loop.call_soon_threadsafe(self._lost, why)
        except RuntimeError:
            pass

    def _dispatch(self, msg: tuple) -> None:
        if msg[0] == "step":
            streams = self._streams
            for rid, token, text, finished, reason, lps, final in msg[1]:
                s = streams.get(rid)
                if s is None:
                    continue
                s._push(StepOutput(rid, token, text, finished, reason, lps))
                if finished:
                    s.request = FinishedRequest(final[0], final[1], reason)
                    s._push(_END)
                    del streams[rid]
            for rid, error in msg[2]:
                s = streams.pop(rid, None)
                if s is not None:
                    s._push(_END if error is None else RuntimeError(error))
        elif msg[0] == "reply":
            fut = self._replies.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result((msg[2], msg[3]))

    def _lost(self, why: str) -> None:
        """The engine's process closed the connection: every reader learns it."""
        self.error = why
        err = RuntimeError(f"the engine process is gone ({why})")
        for s in self._streams.values():
            s._push(err)
        self._streams.clear()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_result((False, ("RuntimeError", str(err))))
        if self.on_lost is not None:
            self.on_lost()
