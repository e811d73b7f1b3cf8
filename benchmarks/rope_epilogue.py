"""RoPE in int4_rows's epilogue (ROPE) against the product then eager_fused.rope, on one
CUDA GPU: what the decode step's q | k | v projection and its RoPE kernel cost together,
and what folding RoPE into the projection saves.

For a model's q | k | v weight (int4, groups of 128; Llama-3-8B by default: 32 q heads,
8 k / v heads of 128) and M rows (1, 2, 4 by default) it times, in CUDA graphs as
dependent launches (the decode graphs' launch kind on sm_90), with the words rotated over
enough copies that the L2 cache does not serve them:

* ``apart``: int4_rows (the rule's form), then eager_fused.rope on its q and k views;
* ``epilogue``: int4_rows with ROPE, q and k written rotated (the same form's sums);
* ``product``: int4_rows alone (what the projection costs without RoPE).

Each (median of the graphs' replays) is one JSON line on stdout, with the bytes of the
words and the rate they were read at against the device's copy rate; the two ways' results
are compared bit for bit first (``same``). A table goes to stderr.

    python benchmarks/rope_epilogue.py --shape llama3-8b --m 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wquant_sweep import copy_rate, time_graph  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", help="a config.named_shape name")
    p.add_argument("--m", default="1,2,4", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--rotate-mb", type=float, default=256.0)
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args(argv)

    import torch

    from llamadist.config import named_shape
    from llamadist.kernels import cuda_int4, eager_fused, gpu, wquant, wquant_torch

    if not torch.cuda.is_available():
        raise SystemExit("rope_epilogue.py needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    cfg = named_shape(a.shape)
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    n, k = (hq + 2 * hkv) * d, cfg.hidden_size
    rot = (hq + hkv) * d
    copy = copy_rate(torch, dev, 2.0)
    print(f"{torch.cuda.get_device_name(dev)}: copy rate {copy / 1e9:.0f} GB/s; "
          f"{a.shape} q | k | v {n} x {k}, heads {hq} + {hkv} + {hkv} of {d}", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    pw = wquant.quantize(torch.randn(n, k, generator=gen) * 0.02, "int4" if a.group == 128
                         else f"int4-g{a.group}")
    words = wquant_torch.tinygemm_pack(pw.q.to(dev), k)
    table = wquant_torch.tinygemm_scales_zeros(pw.scale, pw.offset).to(dev)
    tiles = wquant_torch._inner_k_tiles(k)
    copies = [words] + [words.clone() for _ in range(
        max(0, min(15, int(a.rotate_mb * 2**20 // words.nbytes) - 1)))]
    rows = []
    with gpu.dependent_launches():
        for m in a.m:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            cos, sin = (torch.randn(m, d, device=dev).to(torch.bfloat16) for _ in range(2))

            def apart(w):  # (q and k rotated; v is the product's y)
                y = cuda_int4.launch(x, w, table, n, pw.group, tiles)
                return y, eager_fused.rope(y[:, :hq * d].view(m, hq, d),
                                           y[:, hq * d:rot].view(m, hkv, d), cos, sin)

            def epilogue(w):
                return cuda_int4.launch(x, w, table, n, pw.group, tiles, rope=(cos, sin, rot))

            def product(w):
                return cuda_int4.launch(x, w, table, n, pw.group, tiles)

            y, (q, kk) = apart(words)
            want = torch.cat([q.view(m, -1), kk.view(m, -1), y[:, rot:]], dim=1)
            same = bool(torch.equal(want, epilogue(words)))
            for name, fn in (("apart", apart), ("epilogue", epilogue), ("product", product)):
                med, low, mode = time_graph(torch, [lambda w=w, f=fn: f(w) for w in copies],
                                            a.calls, a.reps)
                gbps = (words.nbytes + table.nbytes) / (med * 1e-6) / 1e9
                row = {"shape": a.shape, "m": m, "product": name, "us": round(med, 2),
                       "us_min": round(low, 2), "gbps": round(gbps, 1),
                       "of_copy": round(gbps * 1e9 / copy, 3), "same": same, "mode": mode}
                rows.append(row)
                print(json.dumps(row))
    print(f"{'m':>3} {'apart':>9} {'epilogue':>9} {'product':>9}  saved", file=sys.stderr)
    for m in a.m:
        t = {r["product"]: r["us"] for r in rows if r["m"] == m}
        print(f"{m:>3} {t['apart']:>9.2f} {t['epilogue']:>9.2f} {t['product']:>9.2f}  "
              f"{t['apart'] - t['epilogue']:.2f} us", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
