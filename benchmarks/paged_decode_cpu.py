"""CPU decode step, static KV cache against the paged one, on one model in one run.

    python benchmarks/paged_decode_cpu.py [--shape smollm2-135m] [--batch 1,8]
        [--context 256] [--steps 32] [--block-size 16]

Random fp32 weights of the named shape (fused, the CPU kernel passes). Per batch size:
prefill ``context`` tokens per sequence into both caches, then time ``steps`` decode steps
each way, alternating, and report the median ms/step of

* static:       Engine.forward over the left-padded static cache (the C decoder layer);
* paged C:      Engine.forward_paged, PagedBatch.build included (the C layer's block-table
                mode, blocks scattered over the pool in random order);
* paged torch:  the same with the C layer off (the PyTorch paged attention, CpuLinear on).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llamadist.cli.bench_shape import int_list, make_engine, random_model
from llamadist.config import RuntimeConfig, named_shape
from llamadist.model.fuse import fuse_projections
from llamadist.runtime.paged_kv import PagedBatch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    config = named_shape(args.shape)
    full = fuse_projections(random_model(config, "cpu", torch.float32))
    max_seq = args.context + args.steps + 1
    print(f"{args.shape} fp32, context {args.context}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'static ms':>10} {'paged C ms':>11} {'paged torch ms':>15}")
    for batch in int_list(args.batch):
        print(f"{batch:>5} " + " ".join(f"{v:>{w}.2f}" for v, w in zip(
            bench(config, full, batch, max_seq, args), (10, 11, 15))))


def bench(config, full, batch: int, max_seq: int, args) -> tuple[float, float, float]:
    engine = make_engine(config, full, [range(config.num_layers)], ["cpu"], torch.float32,
                         batch, max_seq, RuntimeConfig())
    bs = args.block_size
    per_seq = -(-max_seq // bs)
    engine.init_paged(batch * per_seq + 1, bs)
    perm = (torch.randperm(batch * per_seq, generator=torch.Generator().manual_seed(0)) + 1)
    tables = perm.view(batch, per_seq).tolist()  # scattered, scrambled blocks
    ctx = args.context
    ids = torch.randint(0, config.vocab_size, (batch, ctx))
    with torch.inference_mode():
        engine.forward(ids, torch.arange(ctx).expand(batch, ctx), 0)
        engine.forward_paged(ids.reshape(-1), PagedBatch.build(
            [(t, 0, ctx) for t in tables], bs))
    stage = engine.stages[0]
    c_layer = stage.layer_fn
    tok = torch.zeros(batch, 1, dtype=torch.long)
    times: dict[str, list[float]] = {"static": [], "paged": [], "torch": []}
    for i in range(args.steps):
        pos = ctx + i
        with torch.inference_mode():
            t0 = time.perf_counter()
            engine.forward(tok, torch.full((batch, 1), pos), pos)
            t1 = time.perf_counter()
            step = PagedBatch.build([(t, pos, 1) for t in tables], bs)
            engine.forward_paged(tok.view(-1), step)
            t2 = time.perf_counter()
            stage.layer_fn = None  # the PyTorch paged path, re-writing the same slot
            engine.forward_paged(tok.view(-1), PagedBatch.build([(t, pos, 1) for t in tables], bs))
            stage.layer_fn = c_layer
            t3 = time.perf_counter()
        times["static"].append(t1 - t0)
        times["paged"].append(t2 - t1)
        times["torch"].append(t3 - t2)
    return tuple(statistics.median(v) * 1e3 for v in times.values())


if __name__ == "__main__":
    main()
