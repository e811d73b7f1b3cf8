"""Drive `llamadist serve` with concurrent streaming clients (the openai client) and
report requests/s, output tokens/s, and time to first token / per output token (p50,
p99) per concurrency; optionally the engine's own run of the same workload in-process
(no HTTP), to show what the HTTP layer costs.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --concurrency 1,4,16
    python benchmarks/serve_bench.py --model smollm2-135m --concurrency 1,4,16 \
        --requests 32 --prompt-len 128 --max-tokens 64 --engine [--json-out F]

With --model the script starts the server itself (--max-batch = the largest concurrency,
--max-seq-len from the workload), measures, stops it (SIGTERM), then with --engine runs
the same prompts through `LLM.run` at each concurrency (--max-batch C, all submitted
at once). Every request is the same length: a prompt of --prompt-len tokens cut from a
fixed text (each request at another offset, so the prefix cache does not help), and
--max-tokens new tokens with EOS ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The history of distributed computing begins with the first networks of "
        "machines that shared work across a room, then a campus, then the world. ")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def prompts(model: str, n: int, length: int) -> list[list[int]]:
    from llamadist.weights.checkpoint import open_checkpoint
    tok = open_checkpoint(model).tokenizer()
    base = tok.encode(TEXT * (2 + (length + n) // 20))
    return [base[i:i + length] for i in range(n)]


async def one(client, model: str, ids: list[int], max_tokens: int) -> dict:
    start = time.time()  # wall clock: comparable across the client processes
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model=model, prompt=ids, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (first or end) - t0
    return {"ttft": ttft, "tpot": (end - first) / (tokens - 1) if first and tokens > 1
            else None, "tokens": tokens, "latency": end - t0, "start": start,
            "end": start + (end - t0)}


async def _clients(url: str, model: str, work: list[list[int]], max_tokens: int,
                   concurrency: int, kind: str = "openai") -> list[dict]:
    if kind == "raw":  # serve_stack.py's light client: the same requests, a few us a chunk
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve_stack import clients
        return await clients(url, work, max_tokens, concurrency, "raw", model)
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("LLAMADIST_API_KEY",
                                                                      "none"),
                         max_retries=0, timeout=3600)
    queue = list(work)
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            results.append(await one(client, model, queue.pop(), max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return results


def _client_process(args: tuple) -> list[dict]:
    return asyncio.run(_clients(*args))


def run_level(url: str, model: str, work: list[list[int]], max_tokens: int,
              concurrency: int, procs: int, kind: str = "openai") -> dict:
    """``concurrency`` streams in ``procs`` client processes (the openai client parses
    each chunk in Python, ~0.1-0.2 ms of a core: one process alone tops out at a few
    thousand chunks/s, below what one GPU serves)."""
    procs = max(1, min(procs, concurrency))
    if procs == 1:
        results = _client_process((url, model, work, max_tokens, concurrency, kind))
    else:
        import concurrent.futures
        import multiprocessing
        jobs = [(url, model, work[i::procs], max_tokens, len(range(i, concurrency, procs)),
                 kind) for i in range(procs)]
        with concurrent.futures.ProcessPoolExecutor(
                procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = [r for part in pool.map(_client_process, jobs) for r in part]
    # from the first request sent to the last answer (starting the client processes,
    # about a second, is not the server's time)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return summary("server", concurrency, results, wall)


def summary(kind: str, concurrency: int, results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"kind": kind, "concurrency": concurrency, "requests": len(results),
            "wall_s": wall, "requests_per_s": len(results) / wall,
            "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99)}


def engine_level(model: str, work: list[list[int]], max_tokens: int, concurrency: int,
                 max_seq_len: int) -> dict:
    """The same workload through the engine in this process: --max-batch C, all queued."""
    from llamadist.api import LLM
    from llamadist.generation.sampling import SamplingParams
    llm = LLM(model, max_batch=concurrency, max_seq_len=max_seq_len)
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    vocab = llm.config.vocab_size
    llm.run([[(t + 1) % vocab for t in p] for p in work[:concurrency]],
            SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    reqs, _ = llm.run(work, params)
    wall = time.perf_counter() - t0
    res = [{"ttft": r.ttft_s, "tpot": r.tpot_s, "tokens": len(r.output_ids)} for r in reqs]
    return summary("engine", concurrency, res, wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_seq_len: int, extra: list[str]):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.Popen([sys.executable, "-m", "llamadist", "serve", model, "--port",
                             str(port), "--max-batch", str(max_batch), "--max-seq-len",
                             str(max_seq_len), "--max-queue", "100000", *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def main() -> None:
    # --engine runs in this process: the OpenMP setting `llamadist serve` makes before torch
    # loads (cli.main), or spinning OpenMP workers make a busy CPU's engine run several
    # times slower than the server it is compared with (1.2k against 9k tokens/s measured)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server")
    ap.add_argument("--model", help="start a server on this model (and tokenize prompts)")
    ap.add_argument("--tokenizer-model", help="tokenize prompts with this model (--url)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32, help="per concurrency (at least C)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engine", action="store_true", help="also the engine alone (--model)")
    ap.add_argument("--engine-concurrency",
                    help="the engine's levels (default --concurrency; each level loads the "
                         "model again)")
    ap.add_argument("--server-flags", default="", help="more `serve` flags, one string")
    ap.add_argument("--client-procs", type=int, default=0,
                    help="client processes per level (default: one per 32 streams, at most "
                         "half the cores)")
    ap.add_argument("--client", choices=("openai", "raw"), default="openai",
                    help="openai: the openai package (~4 ms of a core per request and ~0.1 "
                         "ms per chunk: its processes' own refill delays the measured "
                         "server, benchmarks/RESULTS.md); raw: serve_stack.py's asyncio "
                         "client (bytes counted, only the usage event parsed)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    source = args.model or args.tokenizer_model
    if not source:
        raise SystemExit("give --model (or --url with --tokenizer-model)")
    n = max(args.requests, max(levels))
    work = prompts(source, n, args.prompt_len)
    seq_len = -(-(args.prompt_len + args.max_tokens) // 128) * 128
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, max(levels), seq_len, args.server_flags.split())
    rows = []
    try:
        model = served_model(url)
        def procs(c: int) -> int:
            return args.client_procs or max(1, min(-(-c // 32), (os.cpu_count() or 2) // 2))
        run_level(url, model, work[:max(levels)], 4, max(levels), procs(max(levels)),
                  args.client)  # warm-up
        for c in levels:
            rows.append(run_level(url, model, work[:max(args.requests, c)], args.max_tokens,
                                  c, procs(c), args.client))
            rows[-1]["client_procs"] = procs(c)
            rows[-1]["client"] = args.client
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            print(f"server exit code {proc.wait(60)}", file=sys.stderr)
    if args.engine and args.model:
        for c in [int(c) for c in (args.engine_concurrency or args.concurrency).split(",")]:
            rows.append(engine_level(args.model, work[:max(args.requests, c)], args.max_tokens,
                                     c, seq_len))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.machine(), "cpus": os.cpu_count(), "model": source,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "requests_per_level": f"max({args.requests}, concurrency)"}
    print(json.dumps(meta))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
