"""The HTTP process's view of the engine (serve.engine_host is the other side of the
connection): ``await submit(...)`` queues a job's choices and returns one stream each
(``async for out in stream``), ``cancel``, ``rpc`` (health, metrics, drain). A reader
thread receives the engine's messages (one per engine step) and hands each to the event
loop in one callback; the loop puts each output into its stream's queue.

A finished stream's ``request`` holds what the responses need at the end (the output
ids for usage, the prompt's logprobs for echo); no Request object crosses the processes.

Given the tokenizer, the client makes a streamed request's text itself when no stop
string needs it in the engine: the engine sends that request's token ids each step and
its whole text once, at the end (the submit's ``"ids"``: serve.engine_host), and
``StreamText`` here turns the ids into the deltas the engine would have sent (the same
incremental decoder, the same trailing U+FFFD held back, the same last delta from the
whole text). The engine process's one thread then does no detokenizing per step; this
process, which overlaps the engine's step, does.
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

from llamadist.generation.tokenizer import IncrementalDecoder, settled

log = logging.getLogger(__name__)
_END = object()


class Stopping(RuntimeError):
    """What a stream still open at the end of a shutdown's grace period ends with."""


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


class StreamText:
    """A stream's text deltas from its token ids, as the engine's ``text_delta`` makes
    them for a stream without stop strings: the incremental decoder's text less a
    trailing U+FFFD (an unfinished character) each step; at the end, the whole text's
    part not sent yet."""

    __slots__ = ("ids", "decoder", "emitted")

    def __init__(self, tokenizer):
        self.ids: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer)
        self.emitted = 0  # characters sent

    def step(self, token: int | None) -> str:
        if token is None:
            return ""
        self.ids.append(token)
        text = self.decoder.update(self.ids)
        safe = settled(text)
        if safe <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:safe], safe
        return delta

    def finish(self, whole: str) -> str:
        """The last delta: ``whole`` is the engine's text of the output ids (EOS left out)."""
        return whole[self.emitted:]


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
        self.text: StreamText | None = None  # the text is made here (the module docstring)

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

    async def _arrival(self) -> None:
        """Until an item is here."""
        while not self._items:
            self._waiter = self._client._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        await self._arrival()
        item = self._items.popleft()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    async def take(self) -> list[StepOutput]:
        """Every output here, waiting for one if none is: what a slow reader let pile up
        comes in one wake-up, not one each; [] once the stream has ended. The engine's
        error is raised (after the outputs that came before it)."""
        if self._done:
            return []
        await self._arrival()
        items, outs = self._items, []
        while items:
            item = items.popleft()
            if item is _END:
                self._done = True
                break
            if isinstance(item, BaseException):
                if outs:  # raised at the next call
                    items.appendleft(item)
                    break
                self._done = True
                raise item
            outs.append(item)
        return outs

    def cancel(self) -> None:
        """Stop the request and free its KV blocks (the stream then ends)."""
        self._client.cancel([self])


class EngineClient:
    """Over ``conn`` (a multiprocessing Connection to the engine's process). ``start``
    from inside the event loop that will read the streams."""

    def __init__(self, conn, rpc_timeout_s: float = 10.0, tokenizer=None):
        self.conn = conn
        # given: a streamed request without stop strings gets its text made here
        self.tokenizer = tokenizer
        if tokenizer is not None:
            IncrementalDecoder(tokenizer)  # its tables (byte-level: ~0.2 s) now, once
        self.rpc_timeout_s = rpc_timeout_s
        self.error: str | None = None  # why the engine is unreachable (its process ended)
        self._streams: dict[str, EngineStream] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._keys = itertools.count()
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        # the submits of this loop turn, sent together by _flush (a wave of new requests:
        # one message and one reply message for all, not a write and a wake-up each)
        self._outbox: list[tuple[int, list]] = []
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
        modes = []
        for s, (_, p) in zip(streams, items):
            self._streams[s.request_id] = s
            if stream_text and self.tokenizer is not None and not p.stop:
                s.text = StreamText(self.tokenizer)
                modes.append("ids")  # the engine sends token ids, the text is made here
            else:
                modes.append(stream_text)
        try:
            ok, value = await self._call(
                "submit", [(s.request_id, ids, p, mode)
                           for s, (ids, p), mode in zip(streams, items, modes)],
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

    def end_streams(self, why: str) -> None:
        """Every open stream ends now, its reader raising ``Stopping(why)``; their requests
        are cancelled (the server stops: a whole response is then answered 503, a stream
        ends with an error event, not cut off)."""
        streams = list(self._streams.values())
        for s in streams:
            s._push(Stopping(why))  # before cancel's end: the reader meets it first
        self.cancel(streams)

    def end_streams_later(self, delay_s: float, why: str) -> None:
        """``end_streams`` in ``delay_s`` seconds; callable from any thread (a signal
        handler)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay_s,
                                            self.end_streams, why)

    def cancel(self, streams: list[EngineStream]) -> None:
        """Cancel the streams' requests (those not over yet); each stream ends now."""
        if self._outbox:  # their submits reach the engine before the cancel
            self._flush()
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
            if kind == "submit":
                self._queue_submit(key, *payload)
            else:
                self._send((kind, key, *payload))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(key, None)

    def _queue_submit(self, key: int, items: list) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine has stopped ({self.error})")
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append((key, items))

    def _flush(self) -> None:
        """The queued submits in one message; each waiter gets its own reply."""
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        try:
            self._send(("submit", batch))
        except Exception as e:  # noqa: BLE001 - a lost connection, or a job that cannot be
            # pickled (this runs as a loop callback: an error not answered here would leave
            # every waiter of the batch waiting for good)
            for key, _ in batch:
                fut = self._replies.get(key)
                if fut is not None and not fut.done():
                    fut.set_result((False, ("RuntimeError", str(e))))

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
        if msg[0] == "step":  # columns: serve.engine_host's module docstring
            _, ids, tokens, texts, lps, finals, ends = msg
            streams = self._streams
            lp_at = dict(lps) if lps else None
            fin_at = {f[0]: f for f in finals} if finals else None
            for i, rid in enumerate(ids):
                s = streams.get(rid)
                if s is None:
                    continue
                lp = lp_at.get(i) if lp_at is not None else None
                fin = fin_at.get(i) if fin_at is not None else None
                st = s.text
                if fin is None:
                    text = texts[i] if st is None else st.step(tokens[i])
                    s._push(StepOutput(rid, tokens[i], text, False, None, lp))
                    continue
                _, reason, output_ids, prompt_lps = fin
                text = texts[i] if st is None else st.finish(texts[i])
                s._push(StepOutput(rid, tokens[i], text, True, reason, lp))
                s.request = FinishedRequest(output_ids, prompt_lps, reason)
                s._push(_END)
                del streams[rid]
            for rid, error in ends:
                s = streams.pop(rid, None)
                if s is not None:
                    s._push(_END if error is None else RuntimeError(error))
        elif msg[0] == "reply":
            self._reply(msg[1], msg[2], msg[3])
        elif msg[0] == "replies":  # a batch of submits' answers
            for key, ok, value in msg[1]:
                self._reply(key, ok, value)

    def _reply(self, key: int, ok: bool, value) -> None:
        fut = self._replies.get(key)
        if fut is not None and not fut.done():
            fut.set_result((ok, value))

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
