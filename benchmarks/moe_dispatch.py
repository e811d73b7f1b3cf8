"""Expert-parallel token dispatch on the CPU over gloo: the "gather" dispatch (all-gather
every rank's tokens, local experts on all, reduce-scatter) against "all_to_all" (only the
routed rows travel) of llamadist.parallel.expert, one MoE layer, each rank holding its
own N tokens (data-parallel attention).

    python benchmarks/moe_dispatch.py [--ep 2,4] [--tokens 1,2,4,...,512] [--dim 512]
                                      [--inter 1024] [--experts 8] [--top-k 2]
                                      [--repeats 21] [--threads 1]

Prints one JSON line per (ep, tokens per rank): the median over --repeats of the slowest
rank's milliseconds per layer forward of each dispatch (the two interleaved, so they see
the same neighbours), the median of the repeats' gather / all_to_all ratios and the rows
rank 0's all-to-all sent to other ranks per token (the gather sends ep - 1 per token); then
the crossover: the most tokens per rank at which the gather was faster by more than 5%
(0: never). Each rank uses --threads threads; the layer is a
random one (same weights on every rank, router scaled so the routing spreads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamadist.config import ModelConfig  # noqa: E402
from llamadist.model.moe import SparseMoE  # noqa: E402
from llamadist.parallel.expert import ExpertParallelMoE, expert_shares  # noqa: E402

DISPATCH = ("gather", "all_to_all")


def layer_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=16, hidden_size=a.dim, intermediate_size=a.inter,
                       num_layers=1, num_heads=8, num_kv_heads=8, head_dim=a.dim // 8,
                       num_experts=a.experts, num_experts_per_tok=a.top_k)


def rank_main(rank: int, world: int, store: str, a: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = layer_config(a)
    torch.manual_seed(0)
    full = SparseMoE(cfg)
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    placement = expert_shares(cfg.num_experts, world)
    mods = {d: ExpertParallelMoE(cfg, placement[rank], None, d, placement=placement)
            for d in DISPATCH}
    for m in mods.values():
        m.load_state_dict(full.state_dict(), strict=False)
    rows = []
    gen = torch.Generator().manual_seed(rank)
    with torch.inference_mode():
        for n in a.tokens:
            x = torch.randn(n, cfg.hidden_size, generator=gen)
            times = {d: [] for d in DISPATCH}
            before = mods["all_to_all"].rows_out
            for rep in range(a.repeats + 1):  # the two interleaved: the same neighbours
                for d in DISPATCH:
                    dist.barrier()
                    t0 = time.perf_counter()
                    mods[d](x)
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's time
                    if rep:  # the first: warm-up
                        times[d].append(float(dt))
            ratio = median(g / x for g, x in zip(times["gather"], times["all_to_all"]))
            # rows rank 0 sent to other ranks per token (the gather: world - 1 copies of
            # each token out, and as many partial sums back)
            sent = (mods["all_to_all"].rows_out - before) / ((a.repeats + 1) * n)
            for d in DISPATCH:
                rows.append({"ep": world, "tokens_per_rank": n, "dispatch": d,
                             "s_per_layer": median(times[d]), "ratio": ratio,
                             "a2a_rows_out_per_token": sent})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def crossover(rows: list[dict], margin: float = 0.05) -> int:
    """"auto"'s crossover as measured: the most tokens per rank at which the gather was
    faster by more than ``margin`` (median repeat ratio below 1 - margin; 0: never, the
    all-to-all from the first token). The margin keeps one noisy size from deciding."""
    won = [r["tokens_per_rank"] for r in rows if r["ratio"] < 1.0 - margin]
    return max(won, default=0)


def main() -> None:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=ints, default=[2, 4])
    p.add_argument("--tokens", type=ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    with tempfile.TemporaryDirectory() as tmp:
        for ep in a.ep:
            out = Path(tmp) / f"ep{ep}.json"
            mp.spawn(rank_main, args=(ep, str(Path(tmp) / f"store{ep}"), a, str(out)),
                     nprocs=ep, join=True)
            rows = json.loads(out.read_text())
            t = {(r["tokens_per_rank"], r["dispatch"]): r["s_per_layer"] for r in rows}
            for n in a.tokens:
                g, x = t[(n, "gather")], t[(n, "all_to_all")]
                row = next(r for r in rows if r["tokens_per_rank"] == n)
                print(json.dumps({"ep": ep, "tokens_per_rank": n, "gather_ms": round(g * 1e3, 3),
                                  "all_to_all_ms": round(x * 1e3, 3),
                                  "gather/all_to_all": round(row["ratio"], 2),
                                  "a2a_rows_out_per_token":
                                  round(row["a2a_rows_out_per_token"], 2)}), flush=True)
            print(json.dumps({"ep": ep, "gather_up_to_tokens_per_rank": crossover(rows)}),
                  flush=True)


if __name__ == "__main__":
    main()
