"""One decode step of the serving engine's CUDA graph, kernel by kernel in time order.

``llamadist bench`` runs a checkpoint folder through LLMEngine, whose decode-only steps
replay the paged graphs (llamadist.runtime.paged_graphs). This script builds the engine
the same way (the bench command's own flags and job), runs the bench's batch, then replays
the batch's bucket graph under torch.profiler (CUPTI sees a graph's kernels) and prints:

* each replay's span, the kernels' own time, how much of it overlaps (programmatic
  dependent launches) and how much is idle, the median over ``--replays``;
* the first ``--order`` kernels of the step in time order: start after the step's first
  kernel, own time, and the gap since the previous kernel ended (negative: they overlap),
  each the median over the replays: where a layer's time goes between kernels;
* the kernels by name, their time summed over a step.

    PYTHONPATH=. python3 benchmarks/paged_timeline.py CHECKPOINT --devices cuda:0 \\
        --quantize int4 --quantize-head --batch 1 --prompt-len 128 --gen-len 16

``--setup PYTHON`` runs first, in this process (an A/B's module switches, as
benchmarks/gpu_session.sh's ``ab`` sets them). CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from gpu_profile import by_name, replay_spans, span_summary  # (this folder: the script's own)
from llamadist.cli.main import build_parser


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replays", type=int, default=5, help="replays profiled (default 5)")
    ap.add_argument("--order", type=int, default=40,
                    help="the step's first kernels to list in time order (default 40)")
    ap.add_argument("--rows", type=int, default=20, help="kernel names to list (default 20)")
    ap.add_argument("--setup", default="", help="Python to run first, in this process")
    ours, rest = ap.parse_known_args(argv)
    args = build_parser().parse_args(["bench", *rest])
    if not torch.cuda.is_available():
        print("paged_timeline needs CUDA", file=sys.stderr)
        return 2
    exec(ours.setup, {})  # noqa: S102 - the caller's own A/B switches

    from llamadist.api import LLM
    from llamadist.cli.jobs import bench_job
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    job = bench_job(args, ckpt, tok)
    llm = LLM(ckpt, tokenizer=tok, runtime=job.runtime, layout=job.layout)
    engine = llm.llm_engine
    for ids in job.encoded:
        engine.add_request(ids, job.params)
    while engine.has_unfinished:
        engine.step()
    graphs = llm.engine._paged_graphs
    buckets = [bk for bk in graphs.decoders[0].buckets.values()
               if bk.graph is not None and bk.size >= len(job.encoded)] if graphs else []
    if not buckets:
        print("no captured decode graph (CUDA graphs off, or no decode-only step)",
              file=sys.stderr)
        return 1
    if len(graphs.decoders) > 1:
        print(f"{len(graphs.decoders)} stages: the first stage's graph only")
    bk = min(buckets, key=lambda b: b.size)
    runs = [replay_spans(bk.graph) for _ in range(ours.replays)]
    if not runs[0]:
        print("no kernels recorded (this profiler does not see a graph's)", file=sys.stderr)
        return 1
    sums = [span_summary(r) for r in runs]
    span, own, over, idle = (statistics.median(s[i] for s in sums) for i in range(4))
    print(f"bucket {bk.size} ({len(job.encoded)} sequences): {len(runs[0])} kernels a step; "
          f"span {span / 1e3:.3f} ms, their own time {own / 1e3:.3f} ms, overlapped "
          f"{over / 1e3:.3f} ms, idle {idle / 1e3:.3f} ms (medians of {len(runs)} replays)")
    n = min(ours.order, *(len(r) for r in runs))
    print(f"the first {n} kernels, us (medians): start, own time, gap after the one before")
    for i in range(n):
        start = statistics.median(r[i][0] - r[0][0] for r in runs)
        dur = statistics.median(r[i][1] - r[i][0] for r in runs)
        gap = statistics.median(r[i][0] - r[i - 1][1] for r in runs) if i else 0.0
        print(f"  {i:3d} {start:9.2f} {dur:8.2f} {gap:+8.2f}  {runs[0][i][2][:90]}")
    print("kernels by name (one replay)")
    by_name(runs[0], ours.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
