"""The CPU decode linear (llamadist/kernels/cpu_decode.c) against PyTorch's F.linear, on
SmolLM2-135M's shapes, in the same run.

    python benchmarks/cpu_decode.py [--rows 1 2 4 8 16] [--threads N]

Each shape is timed over enough copies of its weight (~256 MB) that every call reads its
weight from memory, as decode does. Reports GB/s of weight read, the ratio to F.linear and
the share of the read bandwidth of a plain ``sum`` over 256 MB measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from llamadist.kernels import cpu_decode

# (name, out, in): SmolLM2-135M with q|k|v and gate|up fused, and the tied head.
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("head", 49152, 576)]
STREAM_BYTES = 256 * 2**20


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def read_bandwidth() -> float:
    x = torch.randn(STREAM_BYTES // 4)
    x.sum()
    return x.nbytes / median_seconds(x.sum, 15)


def time_pair(weights: list[torch.Tensor], rows: int, reps: int) -> tuple[float, float]:
    """Median seconds of (our kernel, F.linear) over one pass through ``weights``."""
    n, k = weights[0].shape
    x = torch.randn(rows, k)
    assert torch.allclose(cpu_decode.linear(x, weights[0]), F.linear(x, weights[0]),
                          rtol=1e-4, atol=1e-3)
    fn = cpu_decode._fn  # called directly: linear() hands more than MAX_ROWS rows to torch
    threads = torch.get_num_threads()

    def ours():
        for w in weights:
            y = torch.empty(rows, n)
            fn(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), rows, n, k, k, n, threads)

    def peer():
        for w in weights:
            F.linear(x, w)
    ours(), peer()  # warm
    return median_seconds(ours, reps), median_seconds(peer, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_decode.available():
        raise SystemExit("the CPU linear kernel is unavailable here (see the warning above)")
    torch.manual_seed(0)
    bw = read_bandwidth()
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"read bandwidth (sum over 256 MB): {bw / 1e9:.1f} GB/s")
    print("| shape | rows | F.linear GB/s | ours GB/s | ours / F.linear | ours / read bw |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, n, k in SHAPES:
            copies = max(1, STREAM_BYTES // (n * k * 4))
            weights = [torch.randn(n, k) for _ in range(copies)]
            nbytes = copies * n * k * 4
            for rows in args.rows:
                t_ours, t_peer = time_pair(weights, rows, args.reps)
                print(f"| {name} {n}x{k} | {rows} | {nbytes / t_peer / 1e9:.1f} | "
                      f"{nbytes / t_ours / 1e9:.1f} | {t_peer / t_ours:.2f}x | "
                      f"{nbytes / t_ours / bw:.0%} |")


if __name__ == "__main__":
    main()
