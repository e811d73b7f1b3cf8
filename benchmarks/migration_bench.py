"""KV migration against replay when a data-parallel replica is drained (issue 15).

    python benchmarks/migration_bench.py --mode local --lengths 128,512,1024
    python benchmarks/migration_bench.py --mode front --lengths 128,512,1024

One greedy request of L prompt tokens (fixed random ids) runs on replica 0 until it has
two output tokens; then replica 0 is drained with ``kv=migrate`` and again (a fresh run)
with ``kv=replay``. Measured: the pause of that request, from the drain to its next token
on the other replica (what a client sees: a migration's export + transfer + import + one
decode step, or a prefill of L + 2 tokens), the engine's own migration seconds and bytes,
a plain decode step for scale, the cost rule's estimates (engine.migration), and whether
both ways gave the same tokens.

--mode local: two in-process replicas (LocalExecutor; the KV is copied through host
memory). --mode front: `llamadist serve MODEL --nproc 2 --dp 2`, each length drained three
ways: ``kv=migrate-direct`` (replica 0's worker -> replica 1's worker over the workers' own
loopback listeners, distributed.kv_direct), ``kv=migrate-relay`` (worker -> front ->
worker over the front's links) and ``kv=replay``; the pause is the stream's gap around
the drain, seen by the client (medians of --repeat runs), and the bytes each way comes
from the server's relayed/direct counters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def prompt_ids(length: int, vocab: int, salt: int = 0) -> list[int]:
    """``length`` random ids; another ``salt``, other ids (no prefix-cache hit)."""
    rng = random.Random(length * 1000 + salt)
    return [rng.randrange(100, vocab - 1) for _ in range(length)]


def estimates(config, dtype: str, length: int, path) -> dict:
    import torch

    from llamadist.engine.migration import MigrationCost
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    cost = MigrationCost(config, dtype, size, "cpu")
    return {"est_migrate_s": cost.migrate_s(path, length), "est_replay_s": cost.replay_s(length)}


# ---- in-process ----------------------------------------------------------------------
def local_run(models, tok, runtime, ids: list[int], kv: str, new: int) -> dict:
    from llamadist.engine.engine import LLMEngine
    from llamadist.engine.executor import LocalExecutor
    from llamadist.generation.sampling import SamplingParams
    executors = []
    for k, m in enumerate(models):
        ex = LocalExecutor(m)
        ex.replica = k  # the replica's number (a front's RankExecutor has one)
        executors.append(ex)
    engine = LLMEngine(executors, tok, runtime, block_size=16)
    req = engine.add_request(ids, SamplingParams(max_new_tokens=new, ignore_eos=True), "r")
    assert engine._where["r"] is engine.replicas[0]
    step_s = []
    while len(req.output_ids) < 2:
        t = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t)
    engine.drain(0, kv=kv)
    have, t0 = len(req.output_ids), time.perf_counter()
    while len(req.output_ids) == have:
        engine.step()
    pause = time.perf_counter() - t0
    while engine.has_unfinished:
        engine.step()
    st = engine.stats
    return {"pause_s": pause, "decode_step_s": step_s[-1], "migration_s": st.migration_s,
            "migrated_bytes": st.migrated_bytes, "migrated": st.migrated_requests,
            "tokens": list(req.output_ids)}


def local(args) -> list[dict]:
    import torch

    from llamadist.config import RuntimeConfig
    from llamadist.runtime.engine import Engine
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    seq = max(args.lengths) + args.new + 16
    runtime = RuntimeConfig(max_seq_len=seq, max_batch=2, dtype="float32",
                            max_batch_tokens=seq)
    models = [Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32, 1,
                           seq, runtime=runtime, static_cache=False) for _ in range(2)]
    tok = ckpt.tokenizer()
    from llamadist.engine.executor import LocalExecutor
    path = LocalExecutor(models[0]).kv_path
    rows = []
    for n in args.lengths:
        ids = prompt_ids(n, ckpt.config.vocab_size)
        # warm-up: the first prefill of a new length is slow on this CPU (seconds); both
        # replicas see this length's shapes once before anything is timed
        for kv in ("migrate", "replay"):
            local_run(models, tok, runtime, ids, kv, 3)
        runs = {kv: [local_run(models, tok, runtime, ids, kv, args.new)
                     for _ in range(args.repeat)] for kv in ("migrate", "replay")}
        mig = runs["migrate"][0]
        rows.append({"length": n, "repeat": args.repeat,
                     "migrate_pause_s": median(r["pause_s"] for r in runs["migrate"]),
                     "replay_pause_s": median(r["pause_s"] for r in runs["replay"]),
                     "migration_s": median(r["migration_s"] for r in runs["migrate"]),
                     "migrated_MB": mig["migrated_bytes"] / 1e6, "migrated": mig["migrated"],
                     "decode_step_s": median(r["decode_step_s"] for r in runs["migrate"]),
                     "same_tokens": all(r["tokens"] == mig["tokens"]
                                        for r in runs["migrate"] + runs["replay"]),
                     **estimates(ckpt.config, "float32", n + 2, path)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- through the front ---------------------------------------------------------------
def front_run(url: str, ids: list[int], kv: str, new: int) -> tuple[list[str], float]:
    from recovery_bench import get
    body = json.dumps({"model": "m", "prompt": ids, "stream": True, "max_tokens": new,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    texts, times, drained = [], [], []

    def drain() -> None:
        r = urllib.request.Request(url + f"/admin/drain?replica=0&kv={kv}", data=b"",
                                   method="POST")
        with urllib.request.urlopen(r, timeout=60) as resp:
            resp.read()
        drained.append(time.time())
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            times.append(time.time())
            texts.append(json.loads(line[6:])["choices"][0]["text"])
            if len(texts) == 2:
                th = threading.Thread(target=drain)
                th.start()
    th.join()
    urllib.request.urlopen(urllib.request.Request(url + "/admin/undrain?replica=0", data=b"",
                                                  method="POST"), timeout=60).read()
    assert get(url + "/health")[0] == 200
    gaps = [b - a for a, b in zip(times[1:], times[2:])]  # after the first two
    return texts, max(gaps, default=0.0)


def metric(url: str, name: str) -> float:
    from recovery_bench import get
    for line in get(url + "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


WAYS = ("migrate-direct", "migrate-relay", "replay")
COUNTERS = ("kv_migration_seconds", "kv_migrated_bytes", "kv_relayed_bytes",
            "kv_direct_bytes", "kv_migrations")


def front(args) -> list[dict]:
    from recovery_bench import free_port, server_env, wait_up

    from llamadist.engine.migration import DIRECT_TCP, FRONT_RELAY, KVPath
    from llamadist.weights.checkpoint import open_checkpoint
    config = open_checkpoint(args.model).config
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seq = max(args.lengths) + args.new + 16
    cmd = [sys.executable, "-m", "llamadist", "serve", args.model, "--nproc", "2", "--dp", "2",
           "--port", str(port), "--max-batch", "2", "--max-seq-len", str(seq),
           "--served-model-name", "m", "--dtype", "float32", "--timeout", "60"]
    server = subprocess.Popen(cmd, env=server_env(), cwd=ROOT)
    rows, salt = [], 10

    def counters() -> dict:
        return {c: metric(url, f"llamadist_{c}_total") for c in COUNTERS}
    try:
        wait_up(server, url, 600)
        paths = {"migrate-direct": KVPath(DIRECT_TCP, hops=1, messages=2),
                 "migrate-relay": KVPath(FRONT_RELAY, hops=2, messages=2)}
        for n in args.lengths:
            # fresh ids for every run: the server's prefix caches must not hold them
            # (the replicas keep their caches between requests)
            front_run(url, prompt_ids(n, config.vocab_size, 1), "replay", 3)  # warm-up:
            front_run(url, prompt_ids(n, config.vocab_size, 2), "replay", 3)  # both see n
            runs: dict[str, list[dict]] = {w: [] for w in WAYS}
            for _ in range(args.repeat):
                for way in WAYS:
                    salt += 1
                    before = counters()
                    _, pause = front_run(url, prompt_ids(n, config.vocab_size, salt), way,
                                         args.new)
                    after = counters()
                    runs[way].append({"pause_s": pause, **{c: after[c] - before[c]
                                                           for c in COUNTERS}})
            row = {"length": n, "repeat": args.repeat}
            for way in WAYS:
                key = way.replace("migrate-", "")
                row[f"{key}_pause_s"] = median(r["pause_s"] for r in runs[way])
                if way in paths:
                    rs = runs[way]
                    row[f"{key}_migration_s"] = median(r["kv_migration_seconds"] for r in rs)
                    row[f"{key}_migrated"] = sum(r["kv_migrations"] for r in rs)
                    row[f"{key}_MB"] = median(r["kv_migrated_bytes"] for r in rs) / 1e6
                    row[f"{key}_relayed_MB"] = sum(r["kv_relayed_bytes"] for r in rs) / 1e6
                    row[f"{key}_direct_MB"] = sum(r["kv_direct_bytes"] for r in rs) / 1e6
                    est = estimates(config, "float32", n + 2, paths[way])
                    row[f"{key}_est_s"] = est["est_migrate_s"]
                    row["est_replay_s"] = est["est_replay_s"]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return rows


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("local", "front"), default="local")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="128,512,1024")
    ap.add_argument("--new", type=int, default=8, help="tokens each request generates")
    ap.add_argument("--repeat", type=int, default=3, help="runs per way (medians)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    load = os.getloadavg()
    rows = local(args) if args.mode == "local" else front(args)
    report = {"mode": args.mode, "model": args.model, "machine": cpu_model(),
              "cpus": os.cpu_count(), "load_before": load, "load_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
