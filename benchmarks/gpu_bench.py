"""Run the GPU benchmark suite in one go and keep every log: the driver used for
benchmarks/results_gpu.md (one call on a lent machine runs several phases).

    PYTHONPATH=. python3 benchmarks/gpu_bench.py --out $OUT --phases env,bench,tests

Each phase is a subprocess with its own time limit (the remaining budget caps it); its
output is appended to OUT/run.log and each benchmark phase writes OUT/<phase>.json.
The benchmark logic itself is ``llamadist bench --shape`` (llamadist/cli/bench_shape.py),
with benchmarks/hf_compare.py (transformers on the same weights) and
benchmarks/load_compare.py (checkpoint loading) around it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from llamadist.cli.bench_shape import format_rows  # noqa: E402

PY = sys.executable
BENCH = [PY, "-m", "llamadist", "bench", "--shape"]
HF = [PY, "benchmarks/hf_compare.py", "--shape"]
LOAD = [PY, "benchmarks/load_compare.py", "--shape"]
PHASES: dict[str, tuple[list[str], int]] = {
    "env": ([PY, "-c", "import torch, transformers, importlib.util as u; "
             "print(torch.__version__, torch.version.cuda, transformers.__version__, "
             "torch.cuda.get_device_name(0), torch.cuda.mem_get_info(0)); "
             "print('gguf', u.find_spec('gguf') is not None, 'triton', "
             "u.find_spec('triton') is not None); import llamadist.api, llamadist.cli.bench_shape"], 60),
    "tests": ([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu/test_cuda_graph.py"],
              300),
    # Llama-3-8B shape: batches 1, 8, 32; 1, 2 and 4 stages on the one GPU; transformers.
    "bench": (HF + ["llama3-8b", "--batch", "1,8,32", "--prompt-len", "512", "--gen-len",
                    "128", "--stages", "1,2,4", "--graph-modes", "compiled,eager,off"], 480),
    "prefill": (BENCH + ["llama3-8b", "--batch", "1", "--prompt-len", "4096", "--gen-len", "16",
                         "--stages", "1", "--graph-modes", "compiled"], 150),
    "load": (LOAD + ["llama3-8b", "--repeats", "2"], 240),
    "offload": (BENCH + ["llama3-8b", "--batch", "1", "--prompt-len", "32", "--gen-len", "8",
                         "--prefill-reps", "1", "--devices", "cuda:0,cpu", "--strategy", "mixed", "--max-memory",
                         "12GiB,64GiB", "--graph-modes", "compiled", "--stage-stats"], 240),
    "profile": ([PY, "benchmarks/gpu_profile.py", "--shape", "llama3-8b", "--batch", "1,8",
                 "--rows", "12"], 200),
    "small": (HF + ["smollm2-135m", "--batch", "1,32", "--prompt-len", "512", "--gen-len",
                    "128", "--stages", "1,2", "--graph-modes", "compiled,off"], 200),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--phases", default="env,bench,tests")
    ap.add_argument("--budget", type=float, default=560, help="seconds for all phases")
    ap.add_argument("--extra", action="append", default=[],
                    help="PHASE=ARGS: extra arguments appended to a phase's command")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {k: v.split() for k, v in (e.split("=", 1) for e in args.extra)}
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.getcwd())
    t_end = time.time() + args.budget
    summary = []
    with open(out / "run.log", "a") as log:
        for phase in args.phases.split(","):
            cmd, limit = PHASES[phase]
            cmd = cmd + extra.get(phase, [])
            if any(cmd[:len(c)] == c for c in (BENCH, HF, LOAD)):
                cmd = cmd + ["--json-out", str(out / f"{phase}.json")]
            left = t_end - time.time()
            if left < 20:
                summary.append(f"{phase}: skipped (budget)")
                continue
            log.write(f"\n===== {phase}: {' '.join(cmd)}\n")
            log.flush()
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=min(limit, left)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            summary.append(f"{phase}: rc={rc} in {time.time() - t0:.0f} s")
            log.write(f"===== {phase} done: rc={rc} in {time.time() - t0:.0f} s\n")
            log.flush()
    print("\n".join(summary))
    for f in sorted(out.glob("*.json")):
        res = json.loads(f.read_text())
        print(f"--- {f.name}: ceilings {res.get('ceilings')} errors {res.get('errors')}")
        for k in ("logits_vs_hf", "fused_vs_unfused", "load"):
            if k in res:
                print(f"{k}: {res[k]}")
        if res.get("rows"):
            print(format_rows(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
