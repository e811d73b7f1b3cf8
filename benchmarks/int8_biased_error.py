"""How much error int8's biased decode adds (issue 16, session 29), on the CPU.

The one-row GEMV with bf16 x decodes each int8 code q as the float32 2^15 + 128 + q and
lets each lane of its deferred sums add those products (exact: 16 + 8 significant bits)
for ceil(K range / BLOCK_K) tiles, then takes 32 896 times the lane's sum of x off
(``llamadist.kernels.gpu.wquant``'s BIASED). Each addition rounds at ~2^-24 of a sum near
32 896 times x: an absolute error, which grows with the lane's length where x keeps one
sign. This script replays that float32 arithmetic (each lane's chain of FMAs, then the
lanes summed in float32) in PyTorch, and compares its error against float64 with the int8
format's own quantization error (the float weights against their codes), for:

* lane lengths of the rule's cuts (Llama-3-8B: 8 / 16 / 14; Llama-3-70B's down: 56);
* x centred (N(0, 1)), of one sign (N(1, 0.5)), and centred with four outliers x100;
* weight rows N(0, 1), and rows with one outlier weight of 60 (their other codes small).

The kernel's own sums follow a different order along the lanes (a tree); the interpreter
runs the kernel itself (tests/gpu/test_wquant_gpu.py). ``wquant_triton.int8_biased``
takes the biased decode only where a lane holds at most INT8_BIASED_LANES (16) products.

    python benchmarks/int8_biased_error.py [--rows 256]
"""

from __future__ import annotations

import argparse

import torch

BIAS = 32896.0  # 2^15 + 128


def lane_sums(q: torch.Tensor, x: torch.Tensor, block_k: int, biased: bool) -> torch.Tensor:
    """float32 results of the deferred GEMV over q (rows, K) codes and x (K,) float32 (bf16
    values): each lane a chain of FMAs (one rounding each), then the lanes' sum."""
    rows, k = q.shape
    w = q + BIAS if biased else q
    d = torch.zeros(rows, block_k, dtype=torch.float32)
    xs = torch.zeros(block_k, dtype=torch.float32)
    for t in range(k // block_k):
        cols = slice(t * block_k, (t + 1) * block_k)
        d = (w[:, cols] * x[cols].double() + d.double()).float()  # FMA: exact, then rounded
        xs = xs + x[cols]
    if biased:
        d = (d.double() - BIAS * xs.double()).float()
    return d.sum(1, dtype=torch.float32).double()


def case(k: int, block_k: int, x_kind: str, w_kind: str, rows: int) -> dict:
    g = torch.Generator().manual_seed(k + block_k)
    w = torch.randn(rows, k, generator=g, dtype=torch.float64)
    if w_kind == "outlier":
        w[:, 0] = 60.0
    scale = w.abs().amax(1, keepdim=True) / 127
    q = torch.clamp(torch.round(w / scale), -127, 127)
    x = torch.randn(k, generator=g)
    if x_kind == "one-signed":
        x = x * 0.5 + 1.0
    elif x_kind == "outliers":
        x[torch.randperm(k, generator=g)[:4]] *= 100.0
    x = x.to(torch.bfloat16).float()
    exact = q @ x.double()                       # the codes' product, in code units
    quant = (exact - (w / scale) @ x.double()).pow(2).mean().sqrt()
    out = {"k": k, "block_k": block_k, "lane": k // block_k, "x": x_kind, "w": w_kind}
    for biased in (False, True):
        err = (lane_sums(q, x, block_k, biased) - exact).pow(2).mean().sqrt()
        out["biased" if biased else "exact"] = float(err / quant)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    args = p.parse_args()
    print("rms rounding error of the float32 sums / rms int8 quantization error")
    print(f"{'K':>6} {'BLOCK_K':>7} {'lane':>4}  {'x':10} {'weights':8} {'exact':>8} "
          f"{'biased':>8}")
    for k, block_k in ((4096, 512), (4096, 256), (14336, 1024), (8192, 512), (28672, 512)):
        for x_kind in ("centred", "one-signed", "outliers"):
            for w_kind in ("normal", "outlier"):
                r = case(k, block_k, x_kind, w_kind, args.rows)
                print(f"{k:>6} {block_k:>7} {r['lane']:>4}  {x_kind:10} {w_kind:8} "
                      f"{r['exact']:>8.1e} {r['biased']:>8.3f}")


if __name__ == "__main__":
    main()
