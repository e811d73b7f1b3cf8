"""Parallel layouts side by side: one process against TP, PP, DP (and TP x PP) over
processes, the same model and batch in one run.

    python benchmarks/layouts.py [--model smollm2-135m] [--batch 8] [--devices cpu|cuda]
        [--layouts "1,pp2,dp2,tp3"]

Each layout runs `llamadist bench --json` (the way users launch it: the CLI starts its own
workers), so the numbers include the real process groups (gloo on CPU, NCCL on GPUs).
A layout is "1" (one process) or a list of axes such as "tp2", "pp2", "dp2", "tp2pp2".
On GPUs (several of them) pass --devices cuda.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys


def layout_args(layout: str) -> list[str]:
    if layout == "1":
        return []
    axes = dict(re.findall(r"(tp|pp|dp)(\d+)", layout))
    nproc = 1
    for v in axes.values():
        nproc *= int(v)
    args = ["--nproc", str(nproc)]
    for axis, size in axes.items():
        args += [f"--{axis}", size]
    return args


def run_layout(layout: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "llamadist", "bench", args.model, "--batch", str(args.batch),
           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--json",
           *layout_args(layout)]
    if args.devices:
        cmd += ["--devices", args.devices]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--devices", help="cpu (default) or cuda")
    ap.add_argument("--layouts", default="1,pp2,dp2,tp3")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    print(f"# {args.model}, batch {args.batch}, prompt {args.prompt_len}, {args.gen_len} new; "
          f"{platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()}")
    print("| layout | processes | tokens/s | vs 1 process | prefill ms | decode ms/step | bubble |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for layout in args.layouts.split(","):
        r = run_layout(layout, args)
        if "error" in r:
            print(f"| {layout} | - | failed: {r['error']} | | | | |")
            continue
        rate = r["batch"] * r["gen_len"] / r["wall_s"]  # generated tokens/s, prefill included
        base = base or rate
        print(f"| {layout} | {r.get('processes', 1)} | {rate:.1f} | {rate / base:.2f}x | "
              f"{r['prefill_s'] * 1e3:.0f} | {r['decode_ms_per_step']:.1f} | "
              f"{r.get('bubble', 0.0):.0%} |")


if __name__ == "__main__":
    main()
