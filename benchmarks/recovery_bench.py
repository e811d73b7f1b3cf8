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
text equals the reference. A 1-rank layout runs in one process and has no worker to
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


def stream(url: str, i: int, max_tokens: int, out: list, first: threading.Semaphore) -> None:
    body = json.dumps({"model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    text, gaps, told = [], [], [False]
    try:
        _read(req, text, gaps, first, told)
    finally:
        if not told[0]:
            first.release()  # a stream that failed early must not block the waiter
    out[i] = ("".join(text), max(gaps, default=0.0))


def _read(req, text: list, gaps: list, first: threading.Semaphore, told: list) -> None:
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
            text.append(data["choices"][0]["text"])
            if not told[0]:
                told[0] = True
                first.release()


def run(url: str, n: int, max_tokens: int, kill=None) -> tuple[list, float | None]:
    out: list = [None] * n
    first = threading.Semaphore(0)
    threads = [threading.Thread(target=stream, args=(url, i, max_tokens, out, first))
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
    server = subprocess.Popen(cmd, env=server_env(), cwd=ROOT)
    try:
        wait_up(server, url, 900)
        ref, _ = run(url, args.requests, args.max_tokens)
        victim = children(server.pid)[args.victim]
        got, killed_at = run(url, args.requests, args.max_tokens,
                             kill=lambda: os.kill(victim, signal.SIGKILL if args.signal == "kill"
                                                  else signal.SIGSTOP))
        report = {"command": " ".join(cmd[1:]), "signal": args.signal, "machine": platform.processor() or
                  platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "requests": args.requests, "max_tokens": args.max_tokens,
                  "equal_to_reference": [g[0] for g in got] == [r[0] for r in ref],
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


def wait_up(server: subprocess.Popen, url: str, limit_s: float) -> None:
    """Until the server at ``url`` answers /health with 200 (SystemExit if its process
    ends first, or after ``limit_s`` seconds)."""
    t0 = time.time()
    while True:
        try:
            if get(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        if server.poll() is not None or time.time() - t0 > limit_s:
            raise SystemExit("the server did not start")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
