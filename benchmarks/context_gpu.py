"""The single-GPU long-context baseline for context parallelism (issue 18), for one H200:
the llama3.1-8b shape (128k context, llama3 RoPE; random bf16 weights built on the GPU)
through `llamadist bench --shape`:

* prefill of a 32k-token prompt: seconds and MFU (prefill FLOPs / time / measured
  matmul peak);
* batch-1 decode (ms per token, CUDA graphs with the split-KV kernel) with 512, 32k and
  ~128k tokens in the cache: the split-KV kernel should keep a long cache's cost close to
  its bytes (128k tokens of KV = 16 GiB in bf16, ~1x the 16 GB of weights).

    python benchmarks/context_gpu.py [--device cuda:0] [--out results.jsonl]

One JSON line per measurement on stdout (and appended to --out); under ~8 minutes on an
H200 (the 128k case prefills once). Multi-GPU CP figures need several GPUs: run
`llamadist bench MODEL --nproc N --cp N --devices cuda` on such a machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (cached prompt tokens, prefill repetitions): 32k is the prefill measurement
CASES = [(512, 3), (32768, 2), (131072 - 128, 1)]
GEN = 64


def run(device: str, prompt: int, reps: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    args = [sys.executable, "-m", "llamadist", "bench", "--shape", "llama3.1-8b", "--devices",
            device, "--batch", "1", "--prompt-len", str(prompt), "--gen-len", str(GEN),
            "--stages", "1", "--graph-modes", "compiled", "--prefill-reps", str(reps),
            "--json-out", out]
    done = subprocess.run(args, cwd=ROOT, text=True, capture_output=True, timeout=480,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        return [{"prompt_len": prompt, "error": done.stderr.strip().splitlines()[-1:]}]
    res = json.loads(Path(out).read_text())
    rows = res.get("rows", res) if isinstance(res, dict) else res
    keep = ("impl", "mode", "batch", "prefill_ms", "prefill_mfu", "decode_ms")
    return [{"shape": "llama3.1-8b", "prompt_len": prompt, "gen_len": GEN,
             **{k: r[k] for k in keep if k in r}} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    for prompt, reps in CASES:
        for row in run(a.device, prompt, reps):
            line = json.dumps(row)
            print(line, flush=True)
            if a.out:
                with a.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
