"""Weight-only products by batch rows M on one CUDA GPU: which product should serve int4 /
int8 / fp8 weights when a step multiplies more than the GEMV's 4 rows (batched decode,
prefill). Issue 16: Llama-3-70B int4 on one H200 decoded batch 32 at 157 ms a step
against 23.8 ms at batch 1, and prefilled 4 096 tokens in 19 s (tinygemm, the default
int4 product, is a small-batch kernel).

For each decoder linear of the shape (per layer, N x K) and each M, timed in CUDA graphs
(``wquant_sweep.time_graph``; bf16 weights and tinygemm's int4 words rotated over copies
past the L2 cache, the other quantized forms not):

* ``bf16``: ``F.linear`` on the bf16 weight (the baseline);
* ``tinygemm`` (int4): ``aten._weight_int4pack_mm`` alone;
* ``torch`` (int4): the ``--wquant torch`` product (``wquant_torch.int4_linear``: tinygemm,
  the tensor-core tiles on tinygemm's layout or W dequantized from it and cuBLAS, by rows);
* ``rows`` (int4, M <= 16): ``cuda_int4.int4_rows`` (CUDA C++ on tinygemm's words, the
  rule's form), and ``rows:WARPSxNBxSTAGES[xEXACT[xPROBE[xWA[xHI[xTMA[xSTAGGER[xPERSIST]]]]]]][k]``
  for each ``--rows-configs`` entry (PROBE 1: without the math, 2: without the global
  loads, their errors large; WA 0: x as the mma's A operand, not W; HI 1: the decode's
  shifts as IMAD.HI; TMA 1: the ring filled by sm_90's bulk copies; STAGGER 1: each
  block's k-tiles from a rotated start; PERSIST 1: a grid of one wave looping over the
  tiles; a trailing k: the k-pair form, up to 4 rows, a warp's step two consecutive
  k-tiles of one n-tile, through the ring; kr: the same straight into registers);
* ``mma`` (int4): those tiles alone (``wquant_triton.tinygemm_mma``, the rule's config),
  and ``mma:LABEL`` for each ``--mma-configs`` entry (block_n x block_m x warps x split
  [x stages [x prefetch 0/1]], e.g. 64x16x4x0x1x1; split 0: the rule's for those tiles;
  stages 0: Triton's default);
* ``triton``: ``wquant_triton.packed_linear`` (the GEMV up to 4 rows, the tl.dot tiles
  above), the ``--wquant triton`` product;
* ``scaled`` (int8 / fp8): ``wquant_torch.scaled_linear``, the ``--wquant torch`` product
  past ``wquant_torch.TRITON_ROWS`` rows (fewer take the Triton kernels);
* ``dequant``: the weight dequantized to bf16, then ``F.linear`` (what a large M could do);
* ``read:MULTxBLOCKxWARPS`` (int4, for each ``--read-configs`` entry): no product, a plain
  streaming read of tinygemm's words (MULT programs an SM, each a contiguous run of the
  words in BLOCK-word steps, its XOR stored), the floor a product of those words stands
  on at this size: ``us`` and ``gbps`` of a read, ``err`` not checked;
* ``tileread:NBxSTEPxWARPS`` (int4): the same words read in int4_rows's order, a program
  NB n-tiles (all of K), STEP k-tiles of each a step (int4_rows: its WARPS warps' k-tiles
  w, w + WARPS, ..., together STEP = WARPS at a time): whether that order, not the kernel,
  is what reads slower.

One JSON line per case on stdout (us, ratio to bf16, TFLOP/s, GB/s of the product's
minimum bytes), a table on stderr. The largest error against the float32 product of the
dequantized weight is checked (``ok``: within 2^-6 of max |y|).

    python benchmarks/wquant_rows.py --shape llama3-70b --kinds int4_g32 --m 1,8,16,32,64,256,4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wquant_sweep import copy_rate, model_shapes, time_graph  # noqa: E402

KINDS = {"int4_g32": "int4-g32", "int4_g128": "int4", "int8": "int8", "fp8": "fp8"}
READS = ("read", "tileread")  # products that only read the words: no result to check


def parse_form(spec: str) -> list[int]:
    """WARPSxNBxSTAGES[xEXACT[xPROBE[xWA[xHI[xTMA[xSTAGGER[xPERSIST]]]]]]][k|kr] -> its
    eleven numbers (WA 1, the others 0 where left out; a trailing k: the k-pair form through
    the ring, KP 1, kr: straight into registers, KP 2)."""
    kp = 2 if spec.endswith("kr") else 1 if spec.endswith("k") else 0
    try:
        vals = [int(v) for v in spec.removesuffix("kr").removesuffix("k").split("x")]
    except ValueError:
        vals = []
    if not 3 <= len(vals) <= 10:
        raise SystemExit(f"--rows-configs: {spec!r} is not WARPSxNBxSTAGES[xEXACT[xPROBE[xWA"
                         "[xHI[xTMA[xSTAGGER[xPERSIST]]]]]]][k|kr]")
    return vals + [0, 0, 1, 0, 0, 0, 0][len(vals) - 3:] + [kp]


def rows_form(cuda_int4, x, tg, tz, n, g, tiles, warps, nb, stages, exact, probe, wa, hi,
              tma, stagger, persist, kp):
    """cuda_int4's kernel in one form (warps and n-tiles a block, stages, codes - 8 in bf16
    first; probe 1: no math, 2: no global loads, for where the time goes; wa 0: x as the
    A operand at any rows; hi 1: the decode's shifts as IMAD.HI; tma 1: bulk copies;
    stagger 1: each block's k-tiles from a rotated start; persist 1: a grid of one wave
    looping over the tiles; kp 1: a warp's step two consecutive k-tiles of one n-tile, 2:
    the same straight into registers)."""
    cuda_int4.CODES_EXACT, cuda_int4.PROBE = bool(exact), probe
    cuda_int4.HI_SHIFT, cuda_int4.BULK, cuda_int4.STAGGER = bool(hi), bool(tma), bool(stagger)
    try:
        cfg = cuda_int4.RowsConfig(warps, nb, cuda_int4.row_capacity(x.shape[0]), stages,
                                   bool(wa), bool(persist), kp)
        return cuda_int4.launch(x, tg, tz, n, g, tiles, cfg)
    finally:
        cuda_int4.CODES_EXACT, cuda_int4.PROBE = False, 0
        cuda_int4.HI_SHIFT, cuda_int4.BULK, cuda_int4.STAGGER = False, False, False


_READ = None


def stream_read(words, programs: int, block: int, warps: int):
    """A plain read of ``words`` (any int32 tensor) by ``programs`` programs, each XOR-ing
    a contiguous run of it in ``block``-word steps (the tail masked) and storing that
    (programs, block): what reading the bytes alone costs, no product."""
    global _READ
    import torch
    import triton
    import triton.language as tl
    if _READ is None:
        @triton.jit
        def read(W, OUT, total, run, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            offs = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK], dtype=tl.int32)
            start = pid.to(tl.int64) * run
            for i in range(0, run, BLOCK):
                at = start + i + offs
                acc ^= tl.load(W + at, mask=at < total, other=0, cache_modifier=".cg")
            tl.store(OUT + pid * BLOCK + offs, acc)
        _READ = read
    flat = words.view(torch.int32).reshape(-1)
    run = triton.cdiv(triton.cdiv(flat.numel(), programs), block) * block
    out = torch.empty(programs, block, dtype=torch.int32, device=words.device)
    _READ[(programs,)](flat, out, flat.numel(), run, BLOCK=block, num_warps=warps)
    return out


_TILE_READ = None


def tile_read(words, n: int, k: int, nb: int, step: int, warps: int):
    """tinygemm's int4 words of an N x K weight read in int4_rows's order: a program
    takes NB consecutive n-tiles (8 rows each, all of K: K words an n-tile, contiguous)
    and reads STEP k-tiles (128 words each) of every one of them a step; its XOR stored."""
    global _TILE_READ
    import torch
    import triton
    import triton.language as tl
    if _TILE_READ is None:
        @triton.jit
        def read(W, OUT, per_tile, NB: tl.constexpr, RUN: tl.constexpr):
            pid = tl.program_id(0)
            rows = (pid * NB + tl.arange(0, NB)).to(tl.int64)[:, None] * per_tile
            offs = tl.arange(0, RUN)[None, :]
            acc = tl.zeros([NB, RUN], dtype=tl.int32)
            for i in range(0, per_tile, RUN):
                acc ^= tl.load(W + rows + i + offs, cache_modifier=".cg")
            tl.store(OUT + pid * NB * RUN + tl.arange(0, NB)[:, None] * RUN + offs, acc)
        _TILE_READ = read
    flat = words.view(torch.int32).reshape(-1)
    tiles, per_tile = n // 8, flat.numel() // (n // 8)
    if tiles % nb or per_tile % (128 * step):
        raise ValueError(f"tileread {nb}x{step}: {tiles} n-tiles of {per_tile} words")
    out = torch.empty(tiles // nb, nb * 128 * step, dtype=torch.int32, device=words.device)
    _TILE_READ[(tiles // nb,)](flat, out, per_tile, NB=nb, RUN=128 * step, num_warps=warps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-70b")
    p.add_argument("--kinds", default="int4_g32,int8", type=lambda s: s.split(","))
    p.add_argument("--m", default="1,8,16,32,64,256,4096",
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--rotate-mb", type=float, default=256.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=150.0)
    p.add_argument("--products", default="", type=lambda s: [c for c in s.split(",") if c],
                   help="only these products (names as above; mma:* / rows:* for every "
                   "variant)")
    p.add_argument("--mma-configs", default="", type=lambda s: [c for c in s.split(",") if c])
    p.add_argument("--rows-configs", default="", type=lambda s: [c for c in s.split(",") if c])
    p.add_argument("--tileread-configs", default="",
                   type=lambda s: [c for c in s.split(",") if c],
                   help="NBxSTEPxWARPS reads of the int4 words in int4_rows's order")
    p.add_argument("--read-configs", default="", type=lambda s: [c for c in s.split(",") if c],
                   help="MULTxBLOCKxWARPS streaming reads of the int4 words, e.g. 4x2048x8")
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from llamadist.kernels import cuda_int4, gpu, wquant, wquant_torch, wquant_triton
    t_end = time.perf_counter() + a.max_seconds
    dev = torch.device("cuda:0")
    # as as_packed_linear decides it: the Triton kernels run and tinygemm's layout is known
    tg_triton = gpu.runs_on(dev) and wquant_torch.tinygemm_layout_known(dev)
    print(f"int4 past {wquant_torch.TINYGEMM_MAX_M} rows ({wquant_torch.WIDE_TINYGEMM_MAX_M} "
          f"on N >= 4 K) through Triton: {tg_triton} "
          f"(tensor-core tiles up to {wquant_torch.MMA_MAX_M} rows)", file=sys.stderr)
    sms = wquant_triton.device_traits(dev)[0]
    rows_ok = wquant_torch.int4_rows_ok(dev)
    print(f"cuda_int4.int4_rows runs: {rows_ok}", file=sys.stderr)
    copy = copy_rate(torch, dev, 2.0)
    print(f"copy rate {copy / 1e9:.0f} GB/s (read + write)", file=sys.stderr)
    torch.manual_seed(0)
    sums: dict[tuple[str, str, int], float] = {}
    for sname, (n, k) in model_shapes(a.shape).items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        copies = max(2, int(a.rotate_mb * 2**20 // (n * k * 2)) + 1)
        ws = [w] + [w.clone() for _ in range(min(copies, 3) - 1)]  # bf16: large already
        for kind in a.kinds:
            pw = wquant.quantize(w, KINDS[kind])
            deq = pw.dequantize(torch.bfloat16)
            products, tgs = {}, [None]   # name -> fn(x, tinygemm's words or None)
            if pw.kind == "int4" and wquant_torch.tinygemm_ok("int4", n, k, pw.group):
                tg = wquant_torch.tinygemm_pack(pw.q, k)
                # copies of the words past the L2 cache, as bf16's (70B's qkv is ~42 MB)
                tgs = [tg] + [tg.clone() for _ in range(
                    min(7, int(a.rotate_mb * 2**20 // tg.nbytes)))]
                tz = wquant_torch.tinygemm_scales_zeros(pw.scale, pw.offset, torch.bfloat16)
                g, tiles = pw.group, wquant_torch._inner_k_tiles(k)
                products["tinygemm"] = lambda x, tg: \
                    torch.ops.aten._weight_int4pack_mm(x, tg, g, tz)
                # the --wquant torch product: tinygemm, the tensor-core tiles or W
                # dequantized from tinygemm's layout (Triton) and cuBLAS, by rows
                products["torch"] = lambda x, tg: \
                    wquant_torch.int4_linear(x, tg, tz, g, n, triton=tg_triton,
                                                     cuda_rows=rows_ok)
                products["mma"] = lambda x, tg: wquant_triton.tinygemm_mma(x, tg, tz, n, g, tiles)
                if rows_ok:
                    products["rows"] = lambda x, tg: cuda_int4.int4_rows(x, tg, tz, n, g, tiles)
                for spec in a.rows_configs if rows_ok else ():
                    form = parse_form(spec)
                    products[f"rows:{spec}"] = lambda x, tg, form=form: \
                        rows_form(cuda_int4, x, tg, tz, n, g, tiles, *form)
                for spec in a.read_configs:
                    mult, block, warps = (int(v) for v in spec.split("x"))
                    products[f"read:{spec}"] = lambda x, tg, c=(sms * mult, block, warps): \
                        stream_read(tg, *c)
                for spec in a.tileread_configs:
                    nb, step, warps = (int(v) for v in spec.split("x"))
                    products[f"tileread:{spec}"] = lambda x, tg, c=(n, k, nb, step, warps): \
                        tile_read(tg, *c)
                kernels = gpu.load("wquant")
                for spec in a.mma_configs:  # split 0: the rule's for the tiles and M
                    bn, bm, warps, split, stages, pf = ([int(v) for v in spec.split("x")]
                                                        + [0, 0])[:6]
                    cfg = wquant_triton.MmaConfig(bn, bm, warps, split, stages or None, bool(pf))
                    products[f"mma:{spec}"] = lambda x, tg, cfg=cfg: kernels.tinygemm_mma(
                        x, tg, tz, n, g, tiles, cfg if cfg.split else
                        wquant_triton.mma_split(cfg, x.shape[0], n, k, tiles, sms))
            if pw.kind != "int4":
                products["scaled"] = lambda x, tg, pw=pw: wquant_torch.scaled_linear(
                    x, pw.q, pw.scale, pw.kind, pw.group)
            products["triton"] = lambda x, tg, pw=pw: wquant_triton.packed_linear(x, pw, None)
            products["dequant"] = lambda x, tg, pw=pw: F.linear(x, pw.dequantize(torch.bfloat16))
            if a.products:
                products = {name: fn for name, fn in products.items()
                            if name in a.products or f"{name.split(':')[0]}:*" in a.products}
            for m in a.m:
                if time.perf_counter() > t_end:
                    print(f"stopped at {sname} {kind} M={m}: --max-seconds", file=sys.stderr)
                    break
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = F.linear(x.float(), deq.float())
                flop = 2.0 * m * n * k
                if (sname, "bf16", m) not in sums:
                    us, _, _ = time_graph(torch, [lambda wi=wi: F.linear(x, wi) for wi in ws],
                                          len(ws) * 2, a.reps)
                    sums[(sname, "bf16", m)] = us
                    print(json.dumps({"shape": sname, "m": m, "product": "bf16", "us": us}))
                base = sums[(sname, "bf16", m)]
                for prod, fn in products.items():
                    if prod.startswith("rows") and m > cuda_int4.MAX_ROWS:
                        continue
                    try:
                        y = fn(x, tgs[0]).float()
                    except ValueError as e:  # a form that does not fit the device
                        print(f"{sname} {kind} M={m} {prod}: {e}", file=sys.stderr)
                        continue
                    err = (float("nan") if prod.startswith(READS) else
                           (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30))
                    rot = tgs if prod in ("tinygemm", "torch") or \
                        prod.startswith(("mma", "rows") + READS) \
                        else tgs[:1]
                    us, _, mode = time_graph(torch, [lambda fn=fn, t=t: fn(x, t) for t in rot],
                                             max(4, len(rot)), a.reps)
                    row = {"shape": sname, "kind": kind, "m": m, "product": prod,
                           "us": round(us, 2), "x_bf16": round(us / base, 3),
                           "tflops": round(flop / us / 1e6, 1),
                           "gbps": round(pw.nbytes / us / 1e3, 0), "err": err,
                           "ok": err < 2**-6, "mode": mode}
                    print(json.dumps(row), flush=True)
                    print(f"{sname:8} {kind:9} M={m:5} {prod:18} {us:9.1f} us "
                          f"{us / base:6.2f}x bf16 ({base:.1f}) {flop / us / 1e6:6.0f} TFLOP/s "
                          f"err {err:.1e}", file=sys.stderr, flush=True)
            del pw, deq, products, tgs
        del w, ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
