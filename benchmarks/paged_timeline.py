"""One decode step of the serving engine's CUDA graph, kernel by kernel in time order.

``llamadist bench`` runs a checkpoint folder through LLMEngine, whose decode-only steps
replay the paged graphs (llamadist.runtime.paged_graphs). This script builds the engine
the same way (the bench command's own flags and job), runs the bench's batch, then replays
the batch's bucket graph under torch.profiler (CUPTI sees a graph's kernels) and prints:

* each replay's span, the kernels' own time, how much of it overlaps (programmatic
  dependent launches) and how much is idle, the median over ``--replays``;
* ``--order`` kernels of the step in time order from kernel ``--skip``: start after the
  step's first kernel, own time, the gap since the previous kernel ended (negative: they
  overlap) and what the kernel adds to the step (how far its end moves the latest end so
  far: with dependent launches the step's time is this chain of ends, not the sum of the
  kernels' own times), each the median over the replays;
* the kernels by name, their time summed over a step, and by what they add to it.

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

from gpu_profile import (advances, by_name, replay_spans,  # (this folder: the script's own)
                         span_summary)
from llamadist.cli.main import build_parser


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replays", type=int, default=5, help="replays profiled (default 5)")
    ap.add_argument("--order", type=int, default=40,
                    help="kernels to list in time order (default 40)")
    ap.add_argument("--skip", type=int, default=0,
                    help="the first kernel listed (default 0; a layer in the middle of "
                    "the step: the pre-layer kernels, then about 10 a layer)")
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
    adds = [advances(r) for r in runs]
    first, last = ours.skip, min(ours.skip + ours.order, *(len(r) for r in runs))
    print(f"kernels {first}-{last - 1}, us (medians): start, own time, gap after the one "
          "before, what it adds to the step")
    for i in range(first, last):
        start = statistics.median(r[i][0] - r[0][0] for r in runs)
        dur = statistics.median(r[i][1] - r[i][0] for r in runs)
        gap = statistics.median(r[i][0] - r[i - 1][1] for r in runs) if i else 0.0
        add = statistics.median(a[i] for a in adds)
        print(f"  {i:3d} {start:9.2f} {dur:8.2f} {gap:+8.2f} {add:8.2f}  {runs[0][i][2][:80]}")
    print("kernels by name (one replay)")
    by_name(runs[0], ours.rows)
    print("what they add to the step, by name (us, medians of the replays' sums)")
    for name, us in added_by_name(runs, adds)[:ours.rows]:
        print(f"    {us:9.1f} us  {name[:90]}")
    return 0


def added_by_name(runs: list[list[tuple[float, float, str]]], adds: list[list[float]]
                  ) -> list[tuple[str, float]]:
    """(name, median over the replays of what that name's kernels add to the step), most
    first."""
    sums: dict[str, list[float]] = {}
    for spans, add in zip(runs, adds):
        per: dict[str, float] = {}
        for (_, _, name), a in zip(spans, add):
            per[name] = per.get(name, 0.0) + a
        for name, a in per.items():
            sums.setdefault(name, []).append(a)
    return sorted(((n, statistics.median(v)) for n, v in sums.items()), key=lambda kv: -kv[1])


if __name__ == "__main__":
    sys.exit(main())
