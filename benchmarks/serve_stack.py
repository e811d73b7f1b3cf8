"""The serving stack's own ceiling, the model out of the way (issue 14): the real
``llamadist serve`` processes over engine_host's null executor (every step returns its
tokens at once), driven by streaming clients at a given concurrency, the serve_bench
request shape (a prompt of --prompt-len token ids, --max-tokens new tokens, EOS ignored,
``stream_options.include_usage``).

    this process: the engine side, as serve.server.serve builds it (LLMEngine over the
                  null executor, AsyncEngine, ServeMetrics, EngineHost, gc.freeze)
    HTTP process: serve.http_server's main, started and connected as serve.server's
                  HttpProcess does (optionally under cProfile, timing its event loop's
                  thread's CPU time: --profile-http)
    clients:      --client-procs processes; ``raw``: an asyncio HTTP/1.1 client that reads
                  the SSE bytes and parses only the usage event's JSON (a few us a chunk,
                  so the client is not what saturates); ``openai``: serve_bench's client
                  (the openai package parses each chunk: ~0.1 ms)

Per run: output tokens/s (first request sent to last answer), TTFT/TPOT p50, the HTTP
process's writes per token (``writes/tok``, the raw client's chunks: a server that keeps
up writes each stream's every step, one behind batches several steps a write), and each
process's CPU time over the load per output token (``us/tok``) and its share of one core
(``util``; ``http.sys``: the HTTP process's system time, in ``http`` too): the process
at ~1.0 core is the one that saturates; ``1e6 / us/tok`` is what that process alone could
carry on a core of its own (the H200 host has 16).

    PYTHONPATH=. python benchmarks/serve_stack.py [--concurrency 256] [--requests 1024] \
        [--versions /tmp/before,.] [--pythons PY1,PY2] [--rounds 3] \
        [--profile-http /tmp/http.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
TEXT = ("The history of distributed computing begins with the first networks of "
        "machines that shared work across a room, then a campus, then the world. ")


# ---- the client processes -------------------------------------------------------------
async def raw_one(host: str, port: int, conn: list, ids: list[int], new: int,
                  model: str = "null") -> dict:
    """One streamed completion over a kept-alive connection (``conn``: [reader, writer]
    or empty); the SSE bytes are counted, only the usage event is parsed."""
    if not conn:
        conn.extend(await asyncio.open_connection(host, port))
    reader, writer = conn
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": new, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True}).encode()
    key = os.environ.get("LLAMADIST_API_KEY")  # as serve_bench's openai client sends it
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    start, t0 = time.time(), time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                 b"application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                 % (host.encode(), auth, len(body), body))
    status = await reader.readline()
    assert b" 200 " in status, status
    while (await reader.readline()) != b"\r\n":
        pass
    first, tokens, events, chunks, done, buf = None, 0, 0, 0, False, b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            break
        data = (await reader.readexactly(size + 2))[:-2]
        chunks += 1  # one of the server's writes
        if first is None:
            first = time.perf_counter()
        buf += data
        *whole, buf = buf.split(b"\n\n")
        for ev in whole:
            events += 1
            if b'"usage"' in ev:
                tokens = json.loads(ev[6:])["usage"]["completion_tokens"]
            elif ev == b"data: [DONE]":
                done = True
    end = time.perf_counter()
    assert done and tokens == new, (done, tokens)
    return {"ttft": first - t0, "tpot": (end - first) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens, "events": events, "chunks": chunks, "start": start,
            "end": start + (end - t0)}


async def clients(url: str, work: list[list[int]], new: int, concurrency: int,
                  kind: str, model: str = "null") -> list[dict]:
    host, port = url.split("//")[1].split(":")
    queue, results = list(work), []
    if kind == "openai":
        sys.path.insert(0, str(HERE.parent))
        from openai import AsyncOpenAI
        from serve_bench import one
        client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                             timeout=3600)

    async def worker() -> None:
        conn: list = []
        while queue:
            ids = queue.pop()
            if kind == "openai":
                results.append(await one(client, model, ids, new))
            else:
                results.append(await raw_one(host, int(port), conn, ids, new, model))
        if conn:
            conn[1].close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def client_child() -> None:
    """``--client-child`` (its job as JSON on stdin): run the streams, print the results
    and this process's CPU seconds over them."""
    a = json.loads(sys.stdin.readline())
    c0 = time.process_time()
    res = asyncio.run(clients(a["url"], a["work"], a["new"], a["concurrency"], a["kind"]))
    print(json.dumps({"results": res, "cpu_s": time.process_time() - c0}), flush=True)


def http_child(address: str, profile: str | None) -> int:
    """The HTTP process: serve.http_server's main, under cProfile if asked."""
    from llamadist.serve import http_server
    if not profile:
        return http_server.main([address])
    import cProfile
    prof = cProfile.Profile(time.thread_time)  # CPU time: a busy machine's waits left out
    prof.enable()
    try:
        return http_server.main([address])
    finally:
        prof.disable()
        prof.dump_stats(profile)


# ---- the engine side (this process) ---------------------------------------------------
def timed_executor(base, step_s: float):
    """engine_host's null executor whose steps take ``step_s`` of a device's time: a step
    launched is done ``step_s`` after the later of its launch and the previous step's end
    (the engine's step ahead overlaps it, as on the GPU); ``collect`` waits for it
    without holding the interpreter lock, as a CUDA synchronize does."""

    class Timed(base):
        _busy_until = 0.0
        _ready: list[float] = []

        def launch(self, work) -> None:
            super().launch(work)
            self._busy_until = max(time.perf_counter(), self._busy_until) + step_s
            self._ready = self._ready + [self._busy_until]

        def collect(self) -> list[int]:
            ready, self._ready = self._ready[0], self._ready[1:]
            wait = ready - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return super().collect()

        def reset(self) -> None:
            super().reset()
            self._ready = []

    return Timed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> tuple[float, float]:
    """A process's (user + system, system) CPU seconds so far (/proc; threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, int(fields[12]) / tck


class Stack:
    """The engine side here and the HTTP process, as `llamadist serve` runs them."""

    def __init__(self, tok, text_ids: list[int], max_batch: int, max_seq_len: int,
                 profile: str | None = None, step_ms: float = 0.0):
        import gc
        import tempfile
        from multiprocessing.connection import Listener

        sys.path.insert(0, str(HERE.parent))
        from engine_host import NullExecutor
        from llamadist.config import RuntimeConfig
        from llamadist.engine.async_engine import AsyncEngine
        from llamadist.engine.engine import LLMEngine
        from llamadist.serve.engine_host import EngineHost
        from llamadist.serve.http_server import AUTHKEY_ENV, HttpConfig
        from llamadist.serve.metrics import ServeMetrics

        ex = (timed_executor(NullExecutor, step_ms / 1e3) if step_ms else NullExecutor)
        llm = LLMEngine(ex(text_ids), tok,
                        RuntimeConfig(max_batch=max_batch, max_seq_len=max_seq_len))
        self.engine = AsyncEngine(llm)
        metrics = ServeMetrics(self.engine)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="serve-stack-")
        address, key = os.path.join(self.dir, "engine.sock"), secrets.token_bytes(32)
        listener = Listener(address, family="AF_UNIX", authkey=key)
        argv = [sys.executable, str(HERE), "--http-child", address]
        if profile:
            argv += ["--profile-http", profile]
        self.proc = subprocess.Popen(argv, env={**os.environ, AUTHKEY_ENV: key.hex()},
                                     start_new_session=True)
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(conn=listener.accept()), daemon=True)
        t.start()
        t.join(120)
        listener.close()
        if "conn" not in box:
            self.proc.kill()
            raise SystemExit("the HTTP process did not connect")
        self.conn = box["conn"]
        self.conn.send(HttpConfig("null", tok, max_seq_len, llm.config.vocab_size, None,
                                  100000, "127.0.0.1", self.port))
        gc.collect()
        gc.freeze()
        self.host = EngineHost(self.engine, metrics, self.conn).start()
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the server did not answer /health")

    def stop(self) -> None:
        import shutil
        self.proc.terminate()
        self.proc.wait(60)
        self.host.close()
        self.engine.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_load(stack: Stack, work: list[list[int]], new: int, concurrency: int, procs: int,
             kind: str) -> dict:
    """``concurrency`` streams in ``procs`` client processes; every process's CPU time."""
    children = []
    for i in range(procs):
        spec = json.dumps({"url": stack.url, "work": work[i::procs], "new": new,
                           "concurrency": len(range(i, concurrency, procs)), "kind": kind})
        children.append(subprocess.Popen([sys.executable, str(HERE), "--client-child"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True))
        children[-1].stdin.write(spec + "\n")
        children[-1].stdin.flush()
    e0, h0 = time.process_time(), cpu_s(stack.proc.pid)
    outs = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    e1, h1 = time.process_time(), cpu_s(stack.proc.pid)
    res = [r for o in outs for r in o["results"]]
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    tokens = sum(r["tokens"] for r in res)
    per = 1e6 / tokens
    cpu = {"engine": (e1 - e0), "http": (h1[0] - h0[0]), "http.sys": h1[1] - h0[1],
           "client": sum(o["cpu_s"] for o in outs)}
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "events": sum(r.get("events", 0) for r in res),
            "chunks": sum(r.get("chunks", 0) for r in res),
            "ttft_p50_ms": 1e3 * statistics.median(r["ttft"] for r in res),
            "tpot_p50_ms": 1e3 * statistics.median(r["tpot"] for r in res if r["tpot"]),
            "us_per_tok": {k: v * per for k, v in cpu.items()},
            "util": {k: v / wall for k, v in cpu.items()}}


def engine_alone(tok, text_ids: list[int], work: list[list[int]], args) -> dict:
    """The same requests through the engine alone, as ``LLM.run`` runs them (all queued
    at once, --max-batch = the concurrency, no text until the end), over the same
    executor: the figure issue 14 compares the server with."""
    sys.path.insert(0, str(HERE.parent))
    from engine_host import NullExecutor
    from llamadist.config import RuntimeConfig
    from llamadist.engine.engine import LLMEngine
    from llamadist.generation.sampling import SamplingParams

    seq = -(-(args.prompt_len + args.max_tokens + 16) // 128) * 128
    ex = timed_executor(NullExecutor, args.step_ms / 1e3) if args.step_ms else NullExecutor
    llm = LLMEngine(ex(text_ids), tok, RuntimeConfig(max_batch=args.concurrency,
                                                     max_seq_len=seq))
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    c0, t0 = time.process_time(), time.perf_counter()
    reqs, steps = llm.submit(work, params, stream_text=False)
    for _ in steps:
        pass
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(r.output_ids) for r in reqs)
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "ttft_p50_ms": 1e3 * statistics.median(r.ttft_s for r in reqs),
            "tpot_p50_ms": 1e3 * statistics.median(r.tpot_s for r in reqs),
            "us_per_tok": {"engine": cpu * 1e6 / tokens}, "util": {"engine": cpu / wall}}


def measure(args) -> list[dict]:
    from llamadist.generation.tokenizer import load_hf_tokenizer
    tok = load_hf_tokenizer(Path(args.tokenizer_from))
    text_ids = tok.encode(TEXT, add_special_tokens=False)
    base = tok.encode(TEXT * (2 + (args.prompt_len + args.requests) // 20))
    work = [base[i:i + args.prompt_len] for i in range(args.requests)]
    seq = -(-(args.prompt_len + args.max_tokens + 16) // 128) * 128
    if args.engine:
        return [engine_alone(tok, text_ids, work, args) for _ in range(args.repeats)]
    stack = Stack(tok, text_ids, args.concurrency, seq, args.profile_http, args.step_ms)
    try:
        run_load(stack, work[:args.concurrency], 4, args.concurrency, args.client_procs,
                 args.client)  # warm-up
        return [run_load(stack, work, args.max_tokens, args.concurrency, args.client_procs,
                         args.client) for _ in range(args.repeats)]
    finally:
        stack.stop()


def show(label: str, r: dict) -> str:
    us, ut = r["us_per_tok"], r["util"]
    ev = f"writes/tok {r['chunks'] / r['tokens']:.2f}  " if r.get("chunks") else ""
    return (f"{label:>24} {r['tokens_per_s']:8.0f} tok/s  TTFT {r['ttft_p50_ms']:6.1f} ms  "
            f"TPOT {r['tpot_p50_ms']:5.2f} ms  {ev}us/tok (util): " + "  ".join(
                f"{k} {us[k]:5.1f} ({ut[k]:.2f})" for k in us))


def main() -> None:
    if sys.argv[1:] == ["--client-child"]:
        return client_child()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http-child", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--client", choices=("raw", "openai"), default="raw")
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="each step's device time (0: none; e.g. 12, the H200's 8B step at "
                        "256): the server then streams one event per stream per step")
    p.add_argument("--repeats", type=int, default=1, help="timed loads per server start")
    p.add_argument("--engine", action="store_true",
                   help="the engine alone instead (LLM.run's path, no server)")
    p.add_argument("--profile-http", help="cProfile the HTTP process into this file")
    p.add_argument("--tokenizer-from", default=str(ROOT / ".whl" / "smollm2-tok"))
    p.add_argument("--versions", help="checkouts to compare, comma-separated, alternating "
                                      "by round (each on PYTHONPATH of its own process)")
    p.add_argument("--pythons", help="the interpreter of each --versions checkout, "
                                     "comma-separated (e.g. venvs with and without "
                                     "uvicorn's optional httptools and uvloop)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.http_child:
        sys.exit(http_child(args.http_child, args.profile_http))
    if not Path(args.tokenizer_from).is_dir():
        args.tokenizer_from = "/work/main/.whl/smollm2-tok"
    if args.versions:
        return compare(args)
    rows = measure(args)
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(show("", r), flush=True)


def compare(args) -> None:
    """Each checkout in its own process, alternating by round (with --engine, the last
    checkout's engine alone too, as a column of its own)."""
    versions = args.versions.split(",")
    pythons = args.pythons.split(",") if args.pythons else [sys.executable] * len(versions)
    if len(pythons) != len(versions):
        raise SystemExit("--pythons: one interpreter per --versions checkout")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("concurrency", "requests", "prompt_len", "max_tokens", "client",
                      "client_procs", "repeats", "tokenizer_from", "step_ms")]
    columns = [(f"{v} ({py})" if args.pythons else v, v, py, [])
               for v, py in zip(versions, pythons)]
    if args.engine:
        columns.append((f"engine alone ({versions[-1]})", versions[-1], pythons[-1],
                        ["--engine"]))
    got: dict[str, list[dict]] = {label: [] for label, _, _, _ in columns}
    for rnd in range(args.rounds):
        for label, v, py, extra in columns:
            env = {**os.environ, "PYTHONPATH": str(Path(v).resolve())}
            out = subprocess.run([py, str(HERE), *flags, *extra, "--json"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows = json.loads(out.strip().splitlines()[-1])
            got[label] += rows
            for r in rows:
                print(show(f"round {rnd} {label}", r), flush=True)
    for label, rs in got.items():
        med = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
               "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rs),
               "tpot_p50_ms": statistics.median(r["tpot_p50_ms"] for r in rs),
               "chunks": statistics.median(r.get("chunks", 0) for r in rs),
               "tokens": statistics.median(r["tokens"] for r in rs),
               "us_per_tok": {k: statistics.median(r["us_per_tok"][k] for r in rs)
                              for k in rs[0]["us_per_tok"]},
               "util": {k: statistics.median(r["util"][k] for r in rs)
                        for k in rs[0]["util"]}}
        print(show(f"median {label}", med))


if __name__ == "__main__":
    main()
