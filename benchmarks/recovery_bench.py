"""Recovery time of `llamadist serve --nproc N` when a worker dies mid-generation.

    python benchmarks/recovery_bench.py --model smollm2-135m --nproc 2 --pp 2
    python benchmarks/recovery_bench.py --model /data/llama3-8b --nproc 2 --pp 2 \
        --devices cuda --dtype bfloat16 --requests 8 --max-tokens 256     # a GPU box

Starts the server (no network needed), sends --requests concurrent streaming requests
(greedy, EOS ignored) once without a fault for the reference texts, then again and, once
every stream has its first text, SIGKILLs worker --victim (the front's child processes in
start order: worker index). Reports, per run, each stream's longest pause between two
chunks (what a client sees), and the front's own phases from /metrics (detect: from the
lost worker's last sign of life to the decision; restart: new processes started and
connected; reload: rendezvous and weights loaded; replay: until every interrupted request
had its next token again), the kill-to-detection time measured here, and whether every
text equals the reference; where one does not, the first token where it parts and both
runs' top-2 logprobs there (--top-logprobs: a gap of a bf16 rounding step or two is a
near-tie that the replay's other rounding may flip; a wide gap is a replay bug). A control
run without a fault says whether the texts part without one too (steps batched otherwise
from run to run round otherwise in bf16). A 1-rank layout runs in one process and has no worker to
lose; on one GPU use --nproc 2 --pp 2 --devices cuda (the two ranks share the GPU, their
hidden states going through host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of distributed computing", "Once upon a time", "The capital of France is",
           "def fibonacci(n):", "Water boils at", "The three primary colors are",
           "My favourite food is", "In the beginning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def stream(url: str, i: int, max_tokens: int, top: int, out: list,
           first: threading.Semaphore) -> None:
    body = {"model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if top:
        body["logprobs"] = top
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text, gaps, told, tokens = [], [], [False], []
    try:
        _read(req, text, gaps, first, told, tokens)
    finally:
        if not told[0]:
            first.release()  # a stream that failed early must not block the waiter
    out[i] = ("".join(text), max(gaps, default=0.0), tokens)


def _read(req, text: list, gaps: list, first: threading.Semaphore, told: list,
          tokens: list) -> None:
    last = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.time()
            if last is not None:
                gaps.append(now - last)
            last = now
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"])
            choice = data["choices"][0]
            text.append(choice["text"])
            lp = choice.get("logprobs")
            if lp:  # (token, its logprob, the top ones sorted) per token of the chunk
                tokens += [(t, v, sorted(top.values(), reverse=True)) for t, v, top in
                           zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]
            if not told[0]:
                told[0] = True
                first.release()


def run(url: str, n: int, max_tokens: int, top: int, kill=None) -> tuple[list, float | None]:
    out: list = [None] * n
    first = threading.Semaphore(0)
    threads = [threading.Thread(target=stream, args=(url, i, max_tokens, top, out, first))
               for i in range(n)]
    for t in threads:
        t.start()
    killed_at = None
    if kill is not None:
        for _ in threads:
            first.acquire()
        killed_at = time.time()
        kill()
    for t in threads:
        t.join()
    return out, killed_at


def parting(ref: list, got: list) -> list[dict]:
    """Per request whose tokens differ from the reference: where they part, each run's
    token there and its top-2 logprob gap (the reference's and the other run's)."""
    out = []
    for i, (r, g) in enumerate(zip(ref, got)):
        rt, gt = r[2], g[2]
        at = next((j for j, (a, b) in enumerate(zip(rt, gt)) if a[0] != b[0]), None)
        if at is None:
            continue
        gap = (lambda e: round(e[2][0] - e[2][1], 4) if len(e[2]) > 1 else None)
        out.append({"request": i, "token": at, "tokens": [rt[at][0], gt[at][0]],
                    "top2_gap_reference": gap(rt[at]), "top2_gap_other": gap(gt[at])})
    return out


def phases(metrics: str) -> dict:
    got = {}
    for line in metrics.splitlines():
        if line.startswith("llamadist_recovery_seconds_sum"):
            got[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--devices", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--victim", type=int, default=1, help="worker index to kill")
    ap.add_argument("--signal", choices=("kill", "stop"), default="kill",
                    help="SIGKILL the worker, or SIGSTOP it (a hung rank: --timeout applies)")
    ap.add_argument("--timeout", type=float, help="the server's --timeout")
    ap.add_argument("--top-logprobs", type=int, default=2,
                    help="logprobs asked per token, to show where a text parts (0: none)")
    ap.add_argument("--compile-cache", metavar="DIR", help="the server's --compile-cache")
    ap.add_argument("--compile", action="store_true", help="the server's --compile (a dense "
                    "float model compiles nothing by default: nothing for the cache to keep)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llamadist", "serve", args.model, "--nproc", str(args.nproc),
           "--pp", str(args.pp), "--port", str(port), "--max-batch", str(args.requests),
           "--max-seq-len", str(64 + args.max_tokens), "--served-model-name", "m"]
    cmd += ["--devices", args.devices] if args.devices else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--timeout", str(args.timeout)] if args.timeout else []
    cmd += ["--compile-cache", args.compile_cache] if args.compile_cache else []
    cmd += ["--compile"] if args.compile else []
    server = subprocess.Popen(cmd, env=server_env(), cwd=ROOT)
    try:
        start_s = wait_up(server, url, 900)  # launch to ready: load and warm-up (cold start)
        ref, _ = run(url, args.requests, args.max_tokens, args.top_logprobs)
        control, _ = run(url, args.requests, args.max_tokens, args.top_logprobs)
        victim = children(server.pid)[args.victim]
        got, killed_at = run(url, args.requests, args.max_tokens, args.top_logprobs,
                             kill=lambda: os.kill(victim, signal.SIGKILL if args.signal == "kill"
                                                  else signal.SIGSTOP))
        report = {"command": " ".join(cmd[1:]), "signal": args.signal, "machine": platform.processor() or
                  platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "requests": args.requests, "max_tokens": args.max_tokens,
                  "start_s": start_s, "compile_cache": args.compile_cache,
                  "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                  "equal_to_reference": [g[0] for g in got] == [r[0] for r in ref],
                  "parts_at": parting(ref, got),
                  "control_equal_to_reference": [c[0] for c in control] == [r[0] for r in ref],
                  "control_parts_at": parting(ref, control),
                  "pause_without_fault_s": max(r[1] for r in ref),
                  "pause_with_fault_s": max(g[1] for g in got),
                  "front_phases_s": phases(get(url + "/metrics")[1])}
        health = json.loads(get(url + "/health")[1])
        report["health_after"] = health
        last = health.get("last_recovery") or {}
        if "detected_at" in last:
            report["kill_to_detection_s"] = last["detected_at"] - killed_at
        print(json.dumps(report, indent=1))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def server_env() -> dict:
    """The environment a benchmark starts `llamadist serve` with: this checkout first on
    PYTHONPATH, the caller's entries kept (packages installed with --target there)."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": path}


def wait_up(server: subprocess.Popen, url: str, limit_s: float) -> float:
    """Until the server at ``url`` answers /health with 200 (SystemExit if its process
    ends first, or after ``limit_s`` seconds) -> seconds waited."""
    t0 = time.time()
    while True:
        try:
            if get(url + "/health")[0] == 200:
                return time.time() - t0
        except OSError:
            pass
        if server.poll() is not None or time.time() - t0 > limit_s:
            raise SystemExit("the server did not start")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
