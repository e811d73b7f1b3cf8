"""The engine driven by one background thread, for callers on other threads or in asyncio
(the HTTP server): ``submit`` returns a stream of a request's outputs that can be iterated
(blocking) or async-iterated, and cancelled. The thread alone touches the LLMEngine:
submissions and cancellations reach it through a command queue, between steps.

    engine = AsyncEngine(llm.llm_engine)
    stream = engine.submit(prompt_ids, SamplingParams(max_new_tokens=32))
    async for out in stream:          # or: for out in stream
        print(out.text, end="")
    engine.shutdown()

A stream may instead be given a ``sink``: a callable that the engine thread calls once per
step with every ``(stream, item)`` pair of that step for that sink (an item is a
RequestOutput, a finished one being its stream's last; ``END`` when a stream ends without
a finished output: a cancel, a shutdown; or the engine's error). serve.engine_host uses
one to send a step's outputs to the HTTP process in one message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Sequence

from llamadist.engine.engine import LLMEngine, RequestOutput
from llamadist.engine.request import Request
from llamadist.generation.sampling import SamplingParams

log = logging.getLogger(__name__)
_END = object()  # a stream's last item
END = _END  # what a sink sees when a stream ends without a finished output (a cancel, a stop)


class RequestStream:
    """One request's outputs as they come: ``for out in stream`` or ``async for``; the
    engine's error, if it failed, is raised to the reader. ``request`` is filled in once
    the engine thread queued it. A stream submitted inside a running event loop is fed
    through that loop (``async for`` then waits without holding a thread: a server with
    hundreds of open streams must not need a thread each)."""

    def __init__(self, engine: "AsyncEngine", request_id: str,
                 sink: Callable[[list], None] | None = None):
        self.request_id = request_id
        self.request: Request | None = None
        self._engine = engine
        self._done = False
        self._sink = sink
        if sink is not None:  # read by the sink: neither a queue nor a loop (a server's
            # command thread makes one per request, under the engine thread's lock)
            self._items, self._loop, self._async_items = None, None, None
            return
        self._items: queue.Queue = queue.Queue()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._async_items: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:  # no loop in this thread: a blocking reader
            self._loop, self._async_items = None, None

    def _put(self, item) -> None:
        if self._sink is not None:
            self._sink([(self, item)])
            return
        if self._loop is None:
            self._items.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_items.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is reading any more
            pass

    def _next(self, item) -> RequestOutput:
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> RequestOutput:
        if self._done:
            raise StopIteration
        if self._sink is not None:
            raise TypeError("this stream's outputs go to its sink, not to a reader")
        if self._loop is not None:
            raise TypeError("this stream was submitted inside an event loop: read it with "
                            "`async for`")
        return self._next(self._items.get())

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._sink is not None:
            raise TypeError("this stream's outputs go to its sink, not to a reader")
        if self._async_items is not None:
            item = await self._async_items.get()
        else:
            item = await asyncio.get_running_loop().run_in_executor(None, self._items.get)
        try:
            return self._next(item)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        """Stop the request and free its KV blocks (the stream then ends)."""
        self._engine.cancel(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llamadist-engine",
                                        daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               request_id: str | None = None,
               sink: Callable[[list], None] | None = None,
               stream_text: bool = True) -> RequestStream:
        """Queue a request from any thread; refused at once (ValueError with the numbers)
        if it alone cannot fit, or (RuntimeError) if the engine has stopped. With ``sink``
        the stream's items go to ``sink`` on the engine thread (module docstring)."""
        if self._stop.is_set():
            raise RuntimeError(f"the engine has stopped ({self.error or 'shut down'})")
        self.engine.check(len(prompt_ids), params)  # reads fixed sizes only
        with self._lock:
            if request_id is None:
                self._ids += 1
                request_id = f"async-{self._ids}"
        stream = RequestStream(self, request_id, sink)
        self._commands.put(("add", (stream, list(prompt_ids), params, stream_text)))
        return stream

    def cancel(self, request_id: str) -> None:
        """Stop a request from any thread and free its blocks (its stream then ends)."""
        self._commands.put(("cancel", request_id))

    def call(self, fn: Callable[[LLMEngine], object]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps (e.g. ``drain``); its
        result or exception in the future (RuntimeError once the engine has stopped)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError(f"the engine has stopped ({self.error or 'shut down'})"))
        else:
            self._commands.put(("call", (fn, fut)))
        return fut

    @property
    def alive(self) -> bool:
        """The engine thread is stepping (False once it failed or was shut down)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; unfinished requests are cancelled and their streams end."""
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    self._deliver(self.engine.step())
                else:
                    self.engine.poll()  # an idle server still notices a lost worker
        except BaseException as e:  # noqa: BLE001 - every reader learns why, then we stop
            log.exception("the engine thread failed")
            self.error = e
            self._stop.set()
        finally:
            while not self._commands.empty():  # calls nobody will run: their callers learn it
                kind, arg = self._commands.get_nowait()
                stopped = RuntimeError(f"the engine has stopped ({self.error or 'shut down'})")
                if kind == "call":
                    arg[1].set_exception(stopped)
                elif kind == "add":
                    arg[0]._put(self.error or _END)
            for stream in self._streams.values():  # every reader first: cancelling below
                stream._put(self.error if self.error else _END)  # may fail (ranks gone)
            for rid in list(self._streams):
                try:
                    self.engine.cancel(rid)
                except Exception:  # noqa: BLE001 - a failed engine: its error is reported
                    if self.error is None:
                        raise
            self._streams.clear()

    def _apply_commands(self, block: bool) -> None:
        try:
            kind, arg = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "add":
                stream, prompt_ids, params, stream_text = arg
                try:
                    stream.request = self.engine.add_request(prompt_ids, params,
                                                             stream.request_id, stream_text)
                    self._streams[stream.request_id] = stream
                except ValueError as e:  # e.g. an id already in use: that reader learns it
                    stream._put(e)
            elif kind == "call":
                fn, fut = arg
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 - the caller learns it
                    fut.set_exception(e)
            elif kind == "cancel" and arg in self._streams:
                self.engine.cancel(arg)
                self._streams.pop(arg)._put(_END)
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outs: Sequence[RequestOutput]) -> None:
        """One step's outputs to their streams: streams read in an event loop get theirs
        in one callback per loop (a wake-up per step, not per token: at batch 256 the
        per-token wake-ups cost the engine thread more than its own step); a sink gets its
        streams' ``(stream, output)`` pairs in one call (a finished output is the stream's
        last: no END after it)."""
        batches: dict = {}  # an event loop or a sink -> its (stream, item) pairs
        streams = self._streams
        last_sink, last_pairs = None, None  # most outputs go to one sink: no dict lookup
        for out in outs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del streams[out.request_id]
            sink = stream._sink
            if sink is not None:
                if sink is not last_sink:
                    last_sink, last_pairs = sink, batches.setdefault(sink, [])
                last_pairs.append((stream, out))
            elif stream._loop is None:
                stream._items.put(out)
                if out.finished:
                    stream._items.put(_END)
            else:
                pairs = batches.setdefault(stream._loop, [])
                pairs.append((stream, out))
                if out.finished:
                    pairs.append((stream, _END))
        for loop, pairs in batches.items():
            if not isinstance(loop, asyncio.AbstractEventLoop):  # a sink: called here
                loop(pairs)
                continue
            try:
                loop.call_soon_threadsafe(_feed, pairs)
            except RuntimeError:  # the loop has closed: nobody is reading any more
                pass


def _feed(pairs: list) -> None:
    """On the readers' event loop: a step's items into their streams' queues."""
    for stream, item in pairs:
        stream._async_items.put_nowait(item)
