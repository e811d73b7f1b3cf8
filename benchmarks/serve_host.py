"""The server path's cost to the engine process (benchmarks/engine_host.py's ``serve``
workloads), over engine_host's null executor: the real ``EngineHost`` of
llamadist/serve/engine_host.py over an ``AsyncEngine``, and on the other end of a real
multiprocessing Pipe a consumer PROCESS that does what the HTTP process does with it: the
real ``EngineClient`` (serve/engine_client.py) submits ``batch`` requests at once (as
that many clients) and reads every stream in an asyncio loop, joining its text.

* ``serve``:       streaming clients (stream_text: the engine detokenizes every step);
* ``serve-whole``: clients that read the whole response at the end.

Only the plain decode steps are timed (every request has its first token, none finishes),
as engine_host's workloads: per sequence per step, in microseconds,
* ``step``:    the engine thread's CPU time in ``LLMEngine.step`` (LLM.run's path);
* ``deliver``: the engine thread's CPU time handing the step's outputs over (AsyncEngine's
               delivery, the EngineHost's message), ``send`` excluded;
* ``send``:    of that, pickling and writing the message (``EngineHost.send``);
* ``loop``:    the engine thread's CPU time between steps (its command queue);
* ``others``:  the engine process's other threads over the same window (process CPU time
               minus the engine thread's): the command thread, the garbage collector's
               share, ...;
* ``total``:   the engine process's CPU time over the window (``us``: the figure compared);
* ``consumer``: the consumer process's CPU time per sequence per token over its whole
               run (its own share of a shared machine's cores, not the engine's);
* ``submit/req``, ``observe/req``: microseconds per REQUEST (not timed in the window):
               the command thread handling a submit (unpickled: the engine's check, the
               queued command, the reply), the metrics of a finished request.

Both checkouts' EngineHost/EngineClient are driven through the calls they share
(``EngineHost(engine, metrics, conn)``, ``EngineClient(conn).submit(items,
stream_text=...)``, ``async for out in stream``), so ``--versions`` compares them.
"""

from __future__ import annotations

import os
import random
import threading
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the consumer is forked


def _consumer(conn, result, prompts, new: int, streaming: bool, tok) -> None:
    """The HTTP process's side: submit every request, read every stream."""
    import asyncio
    import inspect

    from llamadist.generation.sampling import SamplingParams
    from llamadist.serve.engine_client import EngineClient

    async def main():
        # the tokenizer, where this checkout's client takes it (as serve.http_server gives it)
        kw = {"tokenizer": tok} if "tokenizer" in inspect.signature(EngineClient).parameters \
            else {}
        client = EngineClient(conn, **kw).start()
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        c0 = time.process_time()
        jobs = await asyncio.gather(*(client.submit([(p, params)], stream_text=streaming)
                                      for p in prompts))

        async def read(stream):
            parts, reasons = [], []
            async for out in stream:
                parts.append(out.text)
                if out.finished:
                    reasons.append(out.finish_reason)
            return "".join(parts), list(stream.request.output_ids), reasons

        got = await asyncio.gather(*(read(s) for (s,) in jobs))
        result.send((got, time.process_time() - c0))

    asyncio.run(main())


class Window:
    """The engine thread's clocks around each step (+ its delivery) while timed."""

    def __init__(self, batch: int):
        self.batch = batch
        self.steps = 0
        self.s = {"step": 0.0, "deliver": 0.0, "send": 0.0}
        self.first = self.last = None  # (thread, process, wall) clocks at the window's ends
        self._plain = False
        self._send = None  # the engine thread's send time in this delivery (None: outside)

    @staticmethod
    def clocks() -> tuple[float, float, float]:
        return time.thread_time(), time.process_time(), time.perf_counter()

    def wrap(self, engine, host) -> None:
        """Time ``engine``'s step and delivery and ``host``'s send (instance attributes:
        the engine thread reads them at each call)."""
        llm, streams = engine.engine, engine._streams
        step, deliver, send = llm.step, engine._deliver, host.send

        def timed_step():
            # every request in and past its first token: a plain decode step
            plain = (len(streams) == self.batch and
                     all(s.request is not None and s.request.output_ids
                         for s in streams.values()))
            self._t0 = self.clocks()
            outs = step()
            self._t1 = time.thread_time()
            self._plain = plain and len(outs) == self.batch and \
                not any(o.finished for o in outs)
            return outs

        def timed_deliver(outs):
            t, self._send = time.thread_time(), 0.0
            try:
                return deliver(outs)
            finally:
                end, sent, self._send = self.clocks(), self._send, None
                if self._plain:
                    self.s["step"] += self._t1 - self._t0[0]
                    self.s["deliver"] += end[0] - t
                    self.s["send"] += sent
                    self.steps += 1
                    self.first = self.first or self._t0
                    self.last = end

        def timed_send(msg):
            if self._send is None or threading.current_thread() is not engine._thread:
                return send(msg)
            t = time.thread_time()
            try:
                return send(msg)
            finally:
                self._send += time.thread_time() - t

        llm.step, engine._deliver, host.send = timed_step, timed_deliver, timed_send
        self.per_request = {"submit": [0.0, 0], "observe": [0.0, 0]}
        handle, observe = host._handle, host.metrics.observe

        def timed_handle(msg):  # the command thread: a submit's unpickled message in
            t = time.thread_time()
            try:
                return handle(msg)
            finally:
                if msg[0] == "submit":
                    self.per_request["submit"][0] += time.thread_time() - t
                    self.per_request["submit"][1] += (  # (jobs' choices; before: one job)
                        sum(len(items) for _, items in msg[1]) if len(msg) == 2
                        else len(msg[2]))

        def timed_observe(req):  # a finished request's metrics
            t = time.thread_time()
            try:
                return observe(req)
            finally:
                self.per_request["observe"][0] += time.thread_time() - t
                self.per_request["observe"][1] += 1

        host._handle, host.metrics.observe = timed_handle, timed_observe

    def result(self) -> dict:
        per = 1e6 / (self.steps * self.batch)
        thread = self.last[0] - self.first[0]
        process = self.last[1] - self.first[1]
        ph = {"step": self.s["step"] * per,
              "deliver": (self.s["deliver"] - self.s["send"]) * per,
              "send": self.s["send"] * per,
              "loop": (thread - self.s["step"] - self.s["deliver"]) * per,
              "others": (process - thread) * per}
        for k, (sec, n) in self.per_request.items():
            ph[f"{k}/req"] = sec * 1e6 / max(n, 1)
        return {"us": process * per, "wall_us": (self.last[2] - self.first[2]) * per,
                "steps": self.steps, "phases": ph}


def run_serve(tok, text_ids: list[int], batch: int, new: int, workload: str, seed: int,
              ahead: bool = True) -> dict:
    """One run of a ``serve`` workload: the engine process is this one."""
    import multiprocessing as mp

    from engine_host import NullExecutor
    from llamadist.config import RuntimeConfig
    from llamadist.engine.async_engine import AsyncEngine
    from llamadist.engine.engine import LLMEngine
    from llamadist.serve.engine_host import EngineHost
    from llamadist.serve.metrics import ServeMetrics

    streaming = workload == "serve"
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 40000) for _ in range(128)] for _ in range(batch)]
    ctx = mp.get_context("fork")  # before this process starts any thread
    here, there = ctx.Pipe()
    res_r, res_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_consumer, args=(there, res_w, prompts, new, streaming, tok),
                        daemon=True)
    child.start()
    there.close()
    res_w.close()
    llm = LLMEngine(NullExecutor(text_ids, ahead=ahead), tok,
                    RuntimeConfig(max_batch=batch, max_seq_len=128 + new + 16))
    engine = AsyncEngine(llm)  # its thread waits for the first command
    host = EngineHost(engine, ServeMetrics(engine), here)
    win = Window(batch)
    win.wrap(engine, host)
    # the engine thread held until every request is queued: all start in one step (as
    # LLM.run's), whatever the order the consumer's submits arrive in
    gate = threading.Event()
    engine.call(lambda _: gate.wait(60))
    host.start()
    deadline = time.monotonic() + 60
    while engine._commands.qsize() < batch and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    try:
        got, consumer_s = res_r.recv()
    finally:
        host.close()
        engine.shutdown()
        child.join(10)
    for text, ids, reasons in got:
        assert len(ids) == new and reasons == ["length"], (len(ids), reasons)
        assert text == tok.decode(ids), (text[-40:], tok.decode(ids)[-40:])
    out = win.result()
    out["phases"]["consumer"] = consumer_s * 1e6 / (batch * new)
    return out
