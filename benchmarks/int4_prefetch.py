"""Does prefetching the next linear's int4 words into L2 (cuda_int4.PREFETCH) pay, and
with how long a gap between the linears? (issue 16)

A CUDA graph of L layers of Llama-3-8B's four int4 linears at one row through
cuda_int4's kernel, each linear followed by a spin kernel (``torch.cuda._sleep``) standing
for the kernels a decode step runs between them (attention after qkv, the add-norm after
o and after down, SiLU-mul after gate_up), replayed back to back. Per prefetch kind and
cap, and per scale of those gaps (0: the linears back to back), the replay's time less
that of a graph of the gaps alone is the linears' time a layer; bf16 ``F.linear`` on the
same shapes is the peer in the same run, and the int4 bytes a layer over that time the
bandwidth, against the device's measured copy bandwidth.

    python3 benchmarks/int4_prefetch.py --layers 32 --gaps 6,2,1.5,2 --scales 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wquant_sweep import model_shapes  # noqa: E402

LINEARS = ("qkv", "o", "gate_up", "down")  # a layer's decode order


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--gaps", default="6,2,1.5,2", help="us after qkv, o, gate_up, down")
    p.add_argument("--scales", default="0,1,2", help="the gaps times each of these")
    p.add_argument("--kinds", default=",lines,bulk", help="cuda_int4.PREFETCH values")
    p.add_argument("--caps", default="8,16,64", help="PREFETCH_BYTES in MiB")
    p.add_argument("--replays", type=int, default=20)
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from llamadist.cli.bench_shape import copy_bandwidth
    from llamadist.kernels import cuda_int4 as C
    from llamadist.kernels import wquant_torch as WT
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    shapes = model_shapes(a.shape)
    gaps = [float(g) for g in a.gaps.split(",")]
    group = 128
    layers = []
    for _ in range(a.layers):
        layer = []
        for name in LINEARS:
            n, k = shapes[name]
            t = WT._inner_k_tiles(k)
            packed = torch.randint(-2**31, 2**31 - 1, (n // 8, k // (16 * t), 32, t // 2),
                                   dtype=torch.int32, device=dev)
            sz = (torch.rand(k // group, n, 2, device=dev) * 0.01).to(torch.bfloat16)
            layer.append((n, k, t, packed, sz, torch.randn(1, k, device=dev).to(torch.bfloat16)))
        layers.append(layer)
    flat = [lin for layer in layers for lin in layer]
    int4_bytes = sum(p.numel() * 4 + s.numel() * 2 for _, _, _, p, s, _ in layers[0])

    def timed(fn, replays=a.replays) -> float:
        g = torch.cuda.CUDAGraph()
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        out = []
        for _ in range(replays):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e) * 1e3)  # us
        return statistics.median(out)

    # cycles a microsecond of torch.cuda._sleep, and the copy bandwidth (read + written)
    per_us = 1_000_000 / timed(lambda: [torch.cuda._sleep(1000) for _ in range(1000)])
    bw = copy_bandwidth(dev, 1 << 30)
    print(f"# torch.cuda._sleep: {per_us:.0f} cycles a us; copy {bw / 1e12:.2f} TB/s",
          flush=True)

    def step(scale: float, linear) -> None:
        for i, lin in enumerate(flat):
            if linear is not None:
                linear(i, lin)
            cycles = int(gaps[i % 4] * scale * per_us)
            if cycles:
                torch.cuda._sleep(cycles)

    def int4(i, lin):
        n, k, t, packed, sz, x = lin
        C.launch(x, packed, sz, n, group, t, nxt=flat[(i + 1) % len(flat)][3])

    bf16 = [torch.randn(n, k, device=dev).to(torch.bfloat16) for n, k, *_ in layers[0]]

    def dense(i, lin):
        F.linear(lin[5], bf16[i % 4])

    kinds = a.kinds.split(",")
    caps = [int(c) for c in a.caps.split(",")]
    print("| gaps x | gaps alone us | bf16 us a layer | int4 prefetch | cap MiB | "
          "int4 us a layer | vs bf16 | TB/s | of copy |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for scale in [float(s) for s in a.scales.split(",")]:
        alone = timed(lambda: step(scale, None)) if scale else 0.0
        dense_us = (timed(lambda: step(scale, dense)) - alone) / a.layers
        for kind in kinds:
            for cap in (caps if kind else [0]):
                C.PREFETCH, C.PREFETCH_BYTES = kind, cap << 20
                us = (timed(lambda: step(scale, int4)) - alone) / a.layers
                tbs = int4_bytes / us / 1e6
                print(f"| {scale:g} | {alone:.0f} | {dense_us:.1f} | {kind or 'off'} | "
                      f"{cap or '-'} | {us:.1f} | {us / dense_us:.3f} | {tbs:.2f} | "
                      f"{tbs * 1e12 / bw:.0%} |", flush=True)
    C.PREFETCH = ""
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
