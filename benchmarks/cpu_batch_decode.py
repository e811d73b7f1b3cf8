"""Batched decode on the CPU: llamadist against llama.cpp on the same GGUF files, batch
sizes and threads, in one run (issue 16's CPU side, past batch 1).

    python benchmarks/cpu_batch_decode.py --llama-batched-bench PATH [--models F.gguf ...]
                                          [--batches 1,4,8,16] [--prompt 32] [--gen 32]
                                          [--rounds 3] [--threads 2]

Ours: `llamadist bench FILE --devices cpu --batch B --prompt-len P --gen-len G --json`, a
process per cell (the CLI's path: the checkpoint loaded as users load it, the engine's
decode steps timed); decode tokens/s = B x 1000 / its ms a step. llama.cpp:
`llama-batched-bench -npp P -ntg G -npl B -t T` (B parallel sequences, each its own
prompt; not part of llamadist: build it yourself, see RESULTS.md), its ``speed_tg``.
Rounds interleave ours and llama.cpp on every file and batch, so a noisy neighbour hurts
both alike. The table: medians over the rounds, ours / llama.cpp, and the rate ours reads
the weights at (weight bytes a step / the step: at batch 1 the GEMVs stream them; past it
the arithmetic binds, the bytes stay the same).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from llamadist.weights.checkpoint import resolve_model_path


def ours(path: str, batch: int, prompt: int, gen: int, threads: int) -> tuple[float, float]:
    """(decode tokens/s, weight GB/s) of one `llamadist bench` run."""
    cmd = [sys.executable, "-m", "llamadist", "bench", path, "--devices", "cpu", "--batch",
           str(batch), "--prompt-len", str(prompt), "--gen-len", str(gen), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"llamadist bench failed on {path}:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ms = out["decode_ms_per_step"]
    weights = sum(s["weight_bytes"] for s in out["stages"])
    return batch * 1e3 / ms, weights / ms / 1e6


def llama(binary: str, path: str, batch: int, prompt: int, gen: int, threads: int) -> float:
    """llama.cpp's generation tokens/s over ``batch`` parallel sequences."""
    cmd = [binary, "-m", path, "-c", str(batch * (prompt + gen) + 64), "-npp", str(prompt),
           "-ntg", str(gen), "-npl", str(batch), "-t", str(threads), "--output-format", "jsonl"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"llama-batched-bench failed on {path}:\n{res.stderr[-2000:]}")
    rows = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    return rows[-1]["speed_tg"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-batched-bench", required=True,
                   help="path of llama.cpp's llama-batched-bench binary")
    p.add_argument("--models", nargs="*", help="GGUF files (default: SmolLM2's Q4_1 file)")
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not os.access(args.llama_batched_bench, os.X_OK):
        raise SystemExit(f"--llama-batched-bench {args.llama_batched_bench} is not an "
                         "executable: build llama.cpp's llama-batched-bench target first")
    paths = args.models or [str(resolve_model_path("smollm2-135m"))]
    batches = [int(b) for b in args.batches.split(",")]
    cells = {(f, b): {"ours": [], "gbs": [], "llama": []} for f in paths for b in batches}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for (f, b), c in cells.items():
            tps, gbs = ours(f, b, args.prompt, args.gen, args.threads)
            c["ours"].append(tps)
            c["gbs"].append(gbs)
            c["llama"].append(llama(args.llama_batched_bench, f, b, args.prompt, args.gen,
                                    args.threads))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; greedy, {args.gen} tokens "
          f"after {args.prompt}-token prompts, {args.rounds} interleaved rounds, load average "
          + ", ".join(f"{x:.1f}" for x in loads) + "\n")
    print("| file | batch | llamadist decode tok/s | llama.cpp | llamadist / llama.cpp "
          "| rounds' ratios | llamadist weight GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for (f, b), c in cells.items():
        mine, theirs = statistics.median(c["ours"]), statistics.median(c["llama"])
        per = ", ".join(f"{a / t:.2f}" for a, t in zip(c["ours"], c["llama"]))
        print(f"| {os.path.basename(f)} | {b} | {mine:.1f} | {theirs:.1f} | "
              f"{mine / theirs:.2f}x | {per} | {statistics.median(c['gbs']):.1f} |")


if __name__ == "__main__":
    main()
