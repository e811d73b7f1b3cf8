"""Paged decode on CUDA: ms per decode-only step through LLMEngine (continuous batching,
paged KV cache, Triton paged kernel, per-bucket CUDA graphs) against the static decode path
(DecodeGraphs, split-KV kernel) on the same random Llama-3-8B-shaped bf16 weights in the
same run, at batch 1, 8, 32 and 128; MBU against the measured copy bandwidth.

    python3 benchmarks/paged_gpu.py [--batches 1,8,32,128] [--prompt 512] [--steps 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamadist.cli.bench_shape import (copy_bandwidth, make_engine, random_model,  # noqa: E402
                                       run_ours)
from llamadist.config import RuntimeConfig, named_shape  # noqa: E402
from llamadist.engine.engine import LLMEngine  # noqa: E402
from llamadist.generation.sampling import SamplingParams  # noqa: E402
from llamadist.model.fuse import fuse_projections  # noqa: E402
from llamadist.planning.profile import decode_step_bytes, profile  # noqa: E402

GiB = 1 << 30


def paged_decode_ms(engine, batch: int, prompt: int, steps: int, max_seq: int) -> dict:
    """LLMEngine over ``engine``: ``batch`` random prompts of ``prompt`` tokens, prefilled,
    then ``steps`` decode-only steps timed (after 8 untimed ones: capture, compile)."""
    runtime = RuntimeConfig(max_seq_len=max_seq, max_batch=batch, dtype="bfloat16",
                            max_batch_tokens=8192)
    llm = LLMEngine(engine, None, runtime)
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)
    reqs = [llm.add_request(torch.randint(0, engine.config.vocab_size, (prompt,),
                                          generator=gen).tolist(), params)
            for _ in range(batch)]
    t0 = time.perf_counter()
    while not all(r.output_ids for r in reqs):  # prefill (chunked under the budget)
        llm.step()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(8):  # first decode steps: graph capture (and compile) of the bucket
        llm.step()
    warm_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    graphs = engine._paged_graphs
    return dict(paged_ms=ms, paged_prefill_s=prefill_s, paged_warm_s=warm_s,
                paged_graphs=graphs is not None and bool(graphs.decoders[0].buckets),
                tokens=reqs[0].output_ids[:8])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    config = named_shape("llama3-8b")
    dtype = torch.bfloat16
    max_seq = -(-(args.prompt + args.steps + 32) // 256) * 256
    prof = profile(config, "bfloat16", max_seq)
    bw = copy_bandwidth(dev, 4 * GiB)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; llama3-8b shape bf16, prompt {args.prompt}, "
          f"{args.steps} timed steps, max_seq {max_seq}", flush=True)
    full = fuse_projections(random_model(config, dev, dtype))
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        runtime = RuntimeConfig(max_seq_len=max_seq, max_batch=b, dtype="bfloat16",
                                compile=not args.no_compile)
        engine = make_engine(config, full, [range(config.num_layers)], [str(dev)], dtype, b,
                             max_seq, runtime)
        row = dict(batch=b)
        row.update(paged_decode_ms(engine, b, args.prompt, args.steps, max_seq))
        prompts = torch.randint(0, config.vocab_size, (b, args.prompt))
        static = run_ours(engine, prompts, args.steps, 1)
        row["static_ms"] = static["decode_ms"]
        ctx = args.prompt + 8 + args.steps / 2  # mean context of the timed paged steps
        need = decode_step_bytes(prof, b, ctx)
        row["paged_mbu"] = need / (row["paged_ms"] / 1e3) / bw
        row["static_mbu"] = decode_step_bytes(prof, b, args.prompt + args.steps / 2) / (
            row["static_ms"] / 1e3) / bw
        row["paged_tok_s"] = b / (row["paged_ms"] / 1e3)
        print(f"batch {b:4d}: paged {row['paged_ms']:7.2f} ms/step (MBU {row['paged_mbu']:.0%},"
              f" {row['paged_tok_s']:.0f} tok/s, graphs {row['paged_graphs']}, warm-up "
              f"{row['paged_warm_s']:.1f} s) | static {row['static_ms']:7.2f} ms/step "
              f"(MBU {row['static_mbu']:.0%})", flush=True)
        rows.append(row)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(dict(copy_GBps=bw / 1e9, rows=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
