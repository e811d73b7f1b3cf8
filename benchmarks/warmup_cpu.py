"""Warm-up of a stage's compiled decode layer in a fresh process, on the CPU (Inductor's
C++ backend), three ways, interleaved over rounds:

* cold:      an empty Inductor cache directory and no artifacts file (a fresh host)
* artifacts: an empty Inductor cache directory, and the --compile-cache file a previous
             process wrote (llamadist.runtime.compile_cache: a fresh host with the file)
* warm:      the Inductor cache directory a previous process filled (a restart on the
             same host: what recovery_bench measured on the H200)

Each process builds the whole tiny model as one stage (no C kernels: torch.compile
traces the torch layers) and runs one static decode step per bucket (1, 2, 4) through
DecodeGraphs, as LLMEngine.warmup does on a GPU. It prints seconds per bucket, Inductor's
cache hits and misses and the graphs dynamo made. CPU figures do not transfer to the GPU:
on the CPU a cache hit still compiles the C++ kernels, where on a GPU the Triton kernels
come bundled in the cached graph.

    PYTHONPATH=$PWD python benchmarks/warmup_cpu.py [--rounds 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from torch._dynamo.utils import counters
from llamadist.config import RuntimeConfig
from llamadist.runtime.cuda_graph import DecodeGraphs
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint
ck = open_checkpoint(sys.argv[1])
st = build_stage(ck, range(ck.config.num_layers), "cpu", torch.float32, 4, 64,
                 runtime=RuntimeConfig(cpu_kernels=False))
res = {"start_s": time.perf_counter() - t0}
t = time.perf_counter()
g = DecodeGraphs([st], static_cpu=True, compile_cache=sys.argv[2] or None)
res["make_s"] = time.perf_counter() - t
for b in (1, 2, 4):
    t = time.perf_counter()
    ids = torch.zeros(b, 1, dtype=torch.long)
    g.forward(ids, ids, 0, None)
    res[f"bucket{b}_s"] = time.perf_counter() - t
res["warmup_s"] = res["make_s"] + sum(res[f"bucket{b}_s"] for b in (1, 2, 4))
res["compiled"] = g.decoders[0].layer_fn is not None
res["graphs"] = counters["stats"]["unique_graphs"]
res["hits"] = counters["inductor"]["fxgraph_cache_hit"]
res["misses"] = counters["inductor"]["fxgraph_cache_miss"]
print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}))
"""


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tiny_model
    return make_tiny_model(folder, "gqa_tied")


def run(model: Path, inductor: Path, artifacts: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=str(inductor))
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), artifacts], cwd=ROOT,
                       env=env, text=True, capture_output=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", help="a Llama folder (default: the tests' tiny random one)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="warmup-cpu-"))
    model = Path(args.model) if args.model else tiny_model(tmp / "model")
    out = []
    for i in range(args.rounds):
        # cold fills its own Inductor dir and writes the artifacts file the others use
        cold_dir, art = tmp / f"ind-cold-{i}", tmp / f"art-{i}"
        rows = [("cold", run(model, cold_dir, str(art)))]
        rows.append(("artifacts", run(model, tmp / f"ind-fresh-{i}", str(art))))
        rows.append(("warm", run(model, cold_dir, "")))
        for kind, res in rows:
            res = dict(kind=kind, round=i, **res)
            print(json.dumps(res), flush=True)
            out.append(res)
    print(json.dumps({"load": os.getloadavg(), "cpus": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
