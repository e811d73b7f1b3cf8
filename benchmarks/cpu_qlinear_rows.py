"""The CPU GEMV on GGUF blocks at 1-16 rows of x (batched decode), every native type,
against PyTorch's F.linear on the same weight dequantized to float32, in the same run.

    python benchmarks/cpu_qlinear_rows.py [--rows 1 2 4 8 16] [--n 3072] [--k 1024]
                                          [--types Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K F16 BF16]
                                          [--int8-x]

Each call runs ``cpu_quant.qlinear`` (the kernel the C decoder layer calls) over copies of
one random N x K weight (~64 MB of blocks in all, so a call reads its weight from memory,
as decode does), best of the repeats. Reports us a call, G weight-row products a second
(N K rows / time: the rate the arithmetic runs at, since past one row the bytes do not
grow) and F.linear's time on the float32 copy (4 bytes a weight, 3.5-8x the blocks').
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llamadist.kernels import cpu_quant  # noqa: E402
from llamadist.kernels.quant_ref import TYPE_IDS, dequantize  # noqa: E402
from tests.quant_blocks import random_blocks  # noqa: E402


def best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--k", type=int, default=1024, help="a multiple of 256 (the K types)")
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K",
                                                  "Q6_K", "F16", "BF16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--int8-x", action="store_true",
                   help="x quantized to int8 per 32 (--quant-activations int8: Q4_0 / Q4_1 / "
                   "Q8_0; the other types ignore it)")
    args = p.parse_args()
    if args.k % 256:
        raise SystemExit(f"--k {args.k}: give a multiple of 256 (the K types' blocks)")
    unknown = [t for t in args.types if t not in TYPE_IDS]
    if unknown:
        raise SystemExit(f"unknown --types {unknown}; choose from {sorted(TYPE_IDS)}")
    if not cpu_quant.available():
        raise SystemExit("the C kernels are not built here (no C compiler?)")
    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; W {args.n} x "
          f"{args.k}, best of {args.reps}{', int8 x' if args.int8_x else ''}\n")
    print("| type | rows | us a call | G products/s | F.linear fp32 us | F.linear time / ours |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.types:
        qt = TYPE_IDS[name]
        one = random_blocks(qt, args.n, args.k, rng)
        copies = max(1, (64 << 20) // one.nbytes)
        blocks = [torch.from_numpy(one.copy()) for _ in range(copies)]
        wf = [torch.from_numpy(dequantize(one, qt, args.k).astype(np.float32))
              for _ in range(max(1, copies * one.nbytes // (args.n * args.k * 4)))]
        for m in args.rows:
            x = torch.randn(m, args.k)
            ours = best_seconds(lambda: [cpu_quant.qlinear(x, b, qt, args.n, None, args.int8_x)
                                         for b in blocks], args.reps) / len(blocks)
            ref = best_seconds(lambda: [F.linear(x, w) for w in wf], args.reps) / len(wf)
            print(f"| {name} | {m} | {ours * 1e6:.0f} | {args.n * args.k * m / ours / 1e9:.1f} "
                  f"| {ref * 1e6:.0f} | {ref / ours:.2f}x |")


if __name__ == "__main__":
    main()
