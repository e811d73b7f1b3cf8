"""Kernel-level sweep of the weight-only GEMV (decode, M = 1..4) on one CUDA GPU.

For each Llama-3-8B decode linear (per layer, N x K: qkv 6144 x 4096, o 4096 x 4096,
gate_up 28672 x 4096, down 4096 x 14336) and M in (1, 2, 4) it times, warm, in CUDA
graphs (several replays, median), with the weights rotated over enough copies that the
L2 cache does not serve them (a decode step reads each layer's weights once from HBM):

* bf16 ``F.linear`` (the baseline);
* torch's products: int8 / fp8 ``scaled_linear`` (eager; ``--wquant torch`` since session
  16 takes it only past TRITON_ROWS rows), int4 tinygemm
  (groups 128 and 32);
* the ``--wquant triton`` GEMV: the former kernel ("v0"), the GEMM's tensor-core tiles
  ("dot", 16 rows: M = 2 and 4 may be issue-bound in FP32 FMAs), the rule's GemvConfig
  (``wquant_triton.gemv_config``) and, with ``--configs near`` (default), its neighbours
  (split-K on / off / doubled, BLOCK_N and BLOCK_K halved and doubled, 2 and 8 warps,
  prefetch depths, the other decode: int8 / fp8 native conversion or bit decode, int4
  group sums), or a wider grid with ``--configs wide``.

It first measures a device-to-device copy of 2 GiB (read + write bytes per second) as the
reachable rate. Per case one JSON line on stdout: microseconds (median; min too), the bytes
the product must move (codes + scales + offsets + x + y), GB/s, the fraction of the copy
rate, the ratio to bf16's time for the same shape and M, and the largest error relative
to the float32 product of the dequantized weight (``ok``: within 2^-6 of max |y|). A
compact table goes to stderr; at the end, the best Triton configuration per (kind,
shape, M), how far the rule's is from it, and the four linears' sum per kind and M
against bf16's (the share of a decode step these kernels decide: x32 layers).

``--model llama3-70b`` (any config.named_shape) times that model's four linears instead;
kind ``int8_g32`` is int8 with a scale per 32 inputs (a GGUF Q8_0's grid on a GPU).
Next session (one H200; ~3 minutes; compile time dominates, Triton caches it):

    python benchmarks/wquant_sweep.py > sweep.jsonl 2> sweep.txt

First, up to 12 processes (``--compile-workers``) compile the Triton cases at once (Triton's disk
cache then serves the timed run). ``--max-seconds`` (default 170, from the start) stops
starting new cases after that long and says how many it skipped (baselines and the rule's
configs run first, then the neighbours by M); ``--m 4`` etc. run a part.
``--interpret-smoke`` runs the same logic on the CPU under Triton's interpreter with tiny
shapes and no timing (a check that the script works, not a measurement). ``--predict
sweep.jsonl`` runs nothing: it looks the current rule's configs up in a past sweep's
lines, row by row against that run's rule and its best, and sums them per layer (what a
rule change should give, from measured cases).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
# the smoke's tiny stand-ins: same roles, rows not a multiple of every BLOCK_N
SMOKE_SHAPES = {"qkv": (96, 256), "o": (64, 512), "gate_up": (200, 256), "down": (64, 768)}
START = time.perf_counter()  # --max-seconds counts from here (compiling ahead included)
KINDS = {"int8": ("int8", None), "int4_g128": ("int4", 128), "int4_g32": ("int4", 32),
         "fp8": ("fp8", None), "int8_g32": ("int8", 32)}  # int8_g32: a GGUF Q8_0's grid


def model_shapes(config) -> dict[str, tuple[int, int]]:
    """(N, K) of the four fused decoder linears of ``config`` (a ModelConfig, or a
    config.named_shape name)."""
    if isinstance(config, str):
        from llamadist.config import named_shape
        config = named_shape(config)
    d, f = config.hidden_size, config.intermediate_size
    return {"qkv": (config.q_size + 2 * config.kv_size, d), "o": (d, config.q_size),
            "gate_up": (2 * f, d), "down": (d, f)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), type=lambda s: s.split(","))
    p.add_argument("--model", default="llama3-8b",
                   help="whose linears (config.named_shape; default Llama-3-8B's, SHAPES)")
    p.add_argument("--extra-shapes", default="", metavar="NAME=NxK,...",
                   type=lambda s: {kv.split("=")[0]: tuple(int(v) for v in kv.split("=")[1]
                                                           .split("x"))
                                   for kv in s.split(",") if kv},
                   help="more shapes by name, for --shapes (e.g. gate_up's K with N giving "
                   "the rule's grid whole waves: w3=25344x4096)")
    p.add_argument("--kinds", default=",".join(KINDS), type=lambda s: s.split(","))
    p.add_argument("--int8-rows", nargs="*", default=None, metavar="WxTxP",
                   type=lambda s: tuple(int(v) for v in s.split("x")),
                   help="also time kernels.cuda_int8 (int8 per row, CUDA): its rule's form "
                   "and these (warps x 16-row tiles x chunks ahead)")
    p.add_argument("--m", default="1,2,4", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--configs", default="near",
                   choices=["rule", "near", "wide", "defer", "cross", "grid1"],
                   help="Triton GEMV configurations: the rule's, its neighbours, a grid; "
                   "defer: the rule's and each row's deferred sums (near has them too); "
                   "cross: the rule's and the other 8-bit kind's (int8 <-> fp8) cut; "
                   "grid1: one row's deferred cuts (rows, tile, warps, split)")
    p.add_argument("--stages", default="", type=lambda s: [int(v) for v in s.split(",") if v],
                   help="also try the rule's config with these num_stages")
    p.add_argument("--rotate-mb", type=float, default=256.0,
                   help="weight copies rotated per case: at least this many MiB (> L2)")
    p.add_argument("--reps", type=int, default=7, help="graph replays timed per case")
    p.add_argument("--max-seconds", type=float, default=170.0)
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--interpret-smoke", action="store_true",
                   help="CPU, Triton's interpreter, tiny shapes, no timing")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="processes compiling the Triton cases ahead (0: compile when timed; "
                   "default min(12, CPUs - 2) on CUDA, 0 with --interpret-smoke)")
    p.add_argument("--compile-timeout", type=float, default=150.0)
    p.add_argument("--compile-only", help=argparse.SUPPRESS)  # "i/n": a worker's share
    p.add_argument("--predict", metavar="SWEEP_JSONL",
                   help="no run: look the current rule's configs up in a past sweep's JSON "
                   "lines, row by row against that run's rule and the best, summed per "
                   "layer (a prediction from measured cases)")
    p.add_argument("--sms", type=int, default=132, help="--predict: the device's SMs")
    p.add_argument("--no-fp8-native", action="store_true",
                   help="--predict: a device without float8 conversions (before sm_89)")
    return p.parse_args(argv)


# ---- timing ---------------------------------------------------------------------------
def copy_rate(torch, device, gib: float) -> float:
    """Bytes read + written per second by a device-to-device copy of ``gib`` GiB."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / min(times)


def time_graph(torch, fns: list, calls: int, reps: int) -> tuple[float, float, str]:
    """(median, min) microseconds per call of ``fns`` taken in turn, replayed in a CUDA
    graph of ``calls`` calls (eager events if capture fails)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for j in range(calls):
                fns[j % len(fns)]()
        run = g.replay
    except Exception:  # noqa: BLE001 - a product that cannot be captured: time it eagerly
        mode, g = "eager", None

        def run():
            for j in range(calls):
                fns[j % len(fns)]()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    times.sort()
    return times[len(times) // 2], times[0], mode


# ---- products ---------------------------------------------------------------------------
def nbytes(*ts) -> int:
    return sum(t.nbytes for t in ts if t is not None)


def candidates(T, kind: str, m: int, n: int, k: int, group: int, sms: int, native: bool,
               mode: str, stages: list[int]) -> list:
    """The rule's GemvConfig first, then (``mode``) others, without repeats of one
    effective cut (BLOCK_K as the group lets it)."""
    rule = T.gemv_config(kind, m, n, k, group, sms, native)  # as wquant_triton.launch picks
    rep = dataclasses.replace
    out = [rule] + [rep(rule, stages=s) for s in stages]
    if mode not in ("rule", "cross"):
        out += [rep(rule, split=1) if rule.split > 1 else rep(rule, split=2),
                rep(rule, split=rule.split * 2),
                rep(rule, block_n=max(8, rule.block_n // 2)), rep(rule, block_n=rule.block_n * 2),
                rep(rule, block_k=rule.block_k * 2), rep(rule, block_k=max(16, rule.block_k // 2)),
                rep(rule, warps=8), rep(rule, warps=2)]
        out += [rep(rule, prefetch=p) for p in (2, 1, 0) if p != rule.prefetch]
        if kind == "int8" or (kind == "fp8" and native):  # the other decode: bits / the
            out += [rep(rule, native=not rule.native),    # hardware's conversion
                    rep(rule, native=not rule.native, prefetch=0)]
        if kind == "int4":  # the group's scale and offset on each tile's sums
            out += [rep(rule, group_sums=True),
                    rep(rule, group_sums=True, prefetch=1 if rule.prefetch == 0 else 0)]
    if mode in ("near", "defer"):  # each row's sums deferred to after the loop: at the
        # rule's cut, then narrower programs without split-K (where the rule defers
        # already, "near" times the cuts one field from it, not the former split-K cut);
        # more rows hold more tiles of sums, so shorter tiles
        bks = ((64, 128) if kind == "int4" else (256, 512, 1024) if m == 1
               else (128, 256, 512))
        out += [rep(rule, defer=True), rep(rule, defer=True, prefetch=0)]
        out += [rep(rule, defer=True, split=1, block_n=bn, block_k=bk)
                for bn in (8, 16, 32) for bk in bks]
        if kind == "int8":  # the bit decode, as one row's cut takes it
            out += [rep(rule, defer=True, split=1, block_n=bn, block_k=bk, native=False,
                        prefetch=0) for bn in (8, 16) for bk in bks]
    if mode == "cross" and kind in ("int8", "fp8"):  # the other 8-bit kind's cut, with
        # each decode, summed per tile or deferred (does int8 gain from fp8's cut?)
        other = T.gemv_config("fp8" if kind == "int8" else "int8", m, n, k, group, sms, native)
        for nat in (False, True) if kind == "int8" or native else (False,):
            out += [rep(other, native=nat, defer=d) for d in (False, True)]
    if mode == "grid1" and m == 1 and kind != "int4":  # one row's deferred cuts, the rule's
        # decode: 8-32 rows a program, tiles of 256-2 048 bytes, 4 or 8 warps, split 1 or 2
        out += [rep(rule, block_n=bn, block_k=bk, warps=w, split=sp, defer=True, prefetch=0)
                for bn in (8, 16, 32) for bk in (256, 512, 1024, 2048) for w in (4, 8)
                for sp in (1, 2)]
    if mode == "wide":
        bks = (16, 32, 64, 128) if kind == "int4" else (64, 128, 256, 512)
        for bn in (8, 16, 32, 64, 128):
            for bk in bks:
                for w in (2, 4, 8):
                    for split in sorted({1, rule.split}):
                        out.append(rep(rule, block_n=bn, block_k=bk, warps=w, split=split))
    grouped = kind == "int4" or group < k
    gb = (group // 2 if kind == "int4" else group) if grouped else None
    seen, keep = set(), []
    for c in out:
        key = dataclasses.replace(c, block_k=T.tile_k(c, kind, gb)[0])
        if key not in seen:
            seen.add(key)
            keep.append(c)
    return keep


def products(args, torch, W, T, WT, kind_name: str, w, m: int, sms: int, native: bool):
    """(product, config label, is_rule, make(copy) -> zero-arg callable, bytes, packed
    copy 0) for one kind on the bf16 weight ``w``; the callables close over x."""
    kind, group = KINDS[kind_name]
    n, k = w.shape
    pw = (W.quantize_int4(w, group) if kind == "int4" else W.quantize_int8(w, group)
          if kind == "int8" else W.QUANTIZERS[kind](w))
    dev = w.device
    out = []
    if kind == "int4":
        if WT.tinygemm_ok("int4", n, k, group):
            table = torch.bfloat16 if dev.type == "cuda" else torch.float32
            tg = (WT.tinygemm_pack(pw.q, k), WT.tinygemm_scales_zeros(pw.scale, pw.offset, table))
            out.append(("torch", "tinygemm", False, lambda c, x, tg=tg: (
                lambda: WT.int4_linear(x, c[0], c[1], group, n)), tg, nbytes(*tg)))
    else:
        out.append(("torch", "scaled", False, lambda c, x: (
            lambda: WT.scaled_linear(x, c.q, c.scale, kind, pw.group)), pw, pw.nbytes))
    # the former GEMV; the GEMM's tensor-core tiles (16 rows; not in the smoke: Triton's
    # interpreter has no bfloat16 dot, tests/gpu checks that path in float16 / float32)
    for old in ("v0",) if args.interpret_smoke else ("v0", "dot"):
        out.append(("triton", old, False, lambda c, x, old=old: (
            lambda: T.launch(x, kind, c.q, c.scale, c.offset, None, c.group, n, k, old)),
            pw, pw.nbytes))
    if args.int8_rows is not None and kind == "int8" and group is None \
            and not args.interpret_smoke:
        from llamadist.kernels import cuda_int8 as C8  # the CUDA tensor-core rows
        x0 = torch.zeros(m, k, dtype=torch.bfloat16, device=dev)
        if C8.ok(dev) and C8.supports(x0, pw.q, pw.scale, n):
            rule = C8.form_for(m, n, sms)
            for form in [rule] + [C8.Int8Form(w, t, p, rule.rows)
                                  for w, t, p in args.int8_rows]:
                out.append(("cuda", f"int8_rows:{form.label()}", False, lambda c, x, f=form: (
                    lambda: C8.launch(x, c.q, c.scale, n, f)), pw, pw.nbytes))
    cands = candidates(T, kind, m, n, k, pw.group, sms, native, args.configs, args.stages)
    for i, cfg in enumerate(cands):
        out.append(("triton", cfg.label(), i == 0, lambda c, x, cfg=cfg: (
            lambda: T.launch(x, kind, c.q, c.scale, c.offset, None, c.group, n, k, cfg)),
            pw, pw.nbytes))
    return pw, out


def clone(torch, obj):
    """A fresh copy of a product's weight tensors (PackedWeight or a tuple of tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(t.clone() for t in obj)
    return type(obj)(obj.kind, obj.q.clone(), obj.scale.clone(),
                     None if obj.offset is None else obj.offset.clone(), obj.group,
                     tuple(obj.shape))


# ---- the sweep ----------------------------------------------------------------------------
class Sweep:
    def __init__(self, args, torch, copy_bps: float | None):
        self.args, self.torch, self.copy = args, torch, copy_bps
        self.t0 = START
        self.rows: list[dict] = []
        self.base: dict[tuple, float] = {}
        self.skipped = 0

    def over(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.max_seconds

    def case(self, row: dict, weight, make, moved: int, x, ref) -> None:
        """Time (or, smoke, just run) one product and report it."""
        torch, a = self.torch, self.args
        if self.over():
            self.skipped += 1
            return
        wbytes = max(1, moved)
        copies = [weight]
        if not a.interpret_smoke:
            want = max(2, math.ceil(a.rotate_mb * 2**20 / wbytes))
            copies += [clone(torch, weight) for _ in range(want - 1)]
        fns = [make(c, x) for c in copies]
        try:
            y = fns[0]()
            err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            if a.interpret_smoke:  # the interpreter's time: exercises the summary only
                t = time.perf_counter()
                fns[0]()
                us = us_min = (time.perf_counter() - t) * 1e6
                mode = "interpreter (not a measurement)"
            else:
                us, us_min, mode = time_graph(torch, fns, max(len(fns), 16), a.reps)
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            print(json.dumps(row | {"error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            return
        finally:
            del copies, fns
        total = moved + x.nbytes + row["m"] * row["n"] * x.element_size()
        key = (row["shape"], row["m"])
        if row["kind"] == "bf16" and us is not None:
            self.base[key] = us
        gbps = total / (us * 1e-6) / 1e9 if us else None
        row |= {"us": us, "us_min": us_min, "bytes": total, "GBps": gbps,
                "frac_copy": gbps * 1e9 / self.copy if gbps and self.copy else None,
                "ratio_bf16": us / self.base[key] if us and key in self.base else None,
                "max_rel_err": err, "ok": err <= 2.0 ** -6, "timing": mode}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        fmt = (lambda v, f: "-" if v is None else format(v, f))
        print(f"{row['shape']:>7} m={row['m']} {row['kind']:>9} {row['product']:>6} "
              f"{row['config']:<22}{'*' if row.get('rule') else ' '} "
              f"{fmt(us, '9.2f')} us {fmt(gbps, '7.0f')} GB/s "
              f"{fmt(row['frac_copy'], '5.2f')} copy {fmt(row['ratio_bf16'], '5.2f')}x bf16 "
              f"err {err:.1e}{'' if row['ok'] else ' WRONG'}", file=sys.stderr, flush=True)


def cases(args, torch, dev, sms: int, native: bool, refs: bool = True):
    """Every case in the order it is timed: per M and shape the bf16 baseline, the torch
    products, "v0" and the rule's config; then the neighbours, by M. Yields (row, weight,
    make, bytes moved, x, reference y or None)."""
    from llamadist.kernels import wquant as W
    from llamadist.kernels import wquant_torch as WT
    from llamadist.kernels import wquant_triton as T
    table = (SMOKE_SHAPES if args.interpret_smoke else model_shapes(args.model)) \
        | args.extra_shapes
    later = []  # the neighbours, after every shape's baselines and rule configs
    gen = torch.Generator(device=dev).manual_seed(0)
    for m in args.m:
        for shape in args.shapes:
            n, k = table[shape]
            w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            base = {"shape": shape, "n": n, "k": k, "m": m}
            yield (base | {"kind": "bf16", "product": "bf16", "config": "F.linear"}, w,
                   lambda c, x: (lambda: torch.nn.functional.linear(x, c)), w.nbytes, x,
                   x.float() @ w.float().t() if refs else None)
            for kname in args.kinds:
                pw, prods = products(args, torch, W, T, WT, kname, w, m, sms, native)
                qref = x.float() @ pw.dequantize(torch.float32).t() if refs else None
                for prod, label, rule, make, weight, moved in prods:
                    row = base | {"kind": kname, "product": prod, "config": label, "rule": rule}
                    item = (row, weight, make, moved, x, qref)
                    if prod == "triton" and label not in ("v0", "dot") and not rule:
                        later.append(item)
                    else:
                        yield item
                del pw, prods, qref
            del w
    later.sort(key=lambda it: it[0]["m"])
    yield from later


def compile_ahead(args) -> None:
    """Compile the Triton cases in ``args.compile_workers`` processes at once (each runs
    its share once; Triton's on-disk cache then serves the timed run): compiling one by
    one would take most of the run's minutes."""
    n = args.compile_workers
    base = [sys.executable, str(Path(__file__).resolve()), "--shapes", ",".join(args.shapes),
            "--kinds", ",".join(args.kinds), "--m", ",".join(map(str, args.m)),
            "--configs", args.configs, "--device", args.device, "--model", args.model]
    if args.stages:
        base += ["--stages", ",".join(map(str, args.stages))]
    if args.extra_shapes:
        base += ["--extra-shapes", ",".join(f"{name}={n}x{k}" for name, (n, k)
                                            in args.extra_shapes.items())]
    if args.interpret_smoke:
        base += ["--interpret-smoke"]
    compile_in_processes(base, n, args.compile_timeout)


def compile_in_processes(argv: list[str], n: int, timeout: float) -> None:
    """Run ``argv --compile-only i/n`` for i < n at once (each compiles its share of the
    Triton cases, which Triton's on-disk cache then serves the timed run) and say how long
    that took and how many failed (also used by moe_routed_sweep.py)."""
    import subprocess
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv + ["--compile-only", f"{i}/{n}"]) for i in range(n)]
    failed = 0
    for p in procs:
        try:
            failed += p.wait(timeout=timeout) != 0
        except subprocess.TimeoutExpired:
            p.kill()
            failed += 1
    print(f"compiled ahead in {n} processes: {time.perf_counter() - t0:.0f} s"
          f"{f', {failed} failed (their cases compile when timed)' if failed else ''}",
          file=sys.stderr, flush=True)


def compile_only(args, torch) -> int:
    """This process's share (``--compile-only i/n``) of the Triton cases, run once each."""
    from llamadist.kernels import wquant_triton as T
    i, n = (int(v) for v in args.compile_only.split("/"))
    dev = torch.device("cpu" if args.interpret_smoke else args.device)
    sms, native = T.device_traits(dev)
    j = done = 0
    for row, weight, make, _, x, _ in cases(args, torch, dev, sms, native, refs=False):
        if row["product"] != "triton":
            continue
        if j % n == i:
            try:
                make(weight, x)()
                done += 1
            except Exception as e:  # noqa: BLE001 - the timed run reports it
                print(f"compile {row}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
        j += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    print(f"compile worker {i}/{n}: {done} cases", file=sys.stderr, flush=True)
    return 0


def run(args, torch) -> list[dict]:
    from llamadist.kernels import gpu
    from llamadist.kernels import wquant_triton as T
    if not gpu.INSTALLED:
        raise SystemExit("wquant_sweep: triton is not installed")
    smoke = args.interpret_smoke
    dev = torch.device("cpu" if smoke else args.device)
    if args.compile_workers is None:
        args.compile_workers = 0 if smoke else max(1, min(12, (os.cpu_count() or 4) - 2))
    if args.compile_workers > 0:
        compile_ahead(args)
    copy_bps = None if smoke else copy_rate(torch, dev, args.copy_gib)
    if copy_bps:
        print(json.dumps({"copy_GBps": copy_bps / 1e9, "copy_gib": args.copy_gib,
                          "device": torch.cuda.get_device_name(dev),
                          "sms": T.device_traits(dev)[0],
                          "fp8_native": T.device_traits(dev)[1]}), flush=True)
        print(f"device-to-device copy: {copy_bps / 1e9:.0f} GB/s (read + write)",
              file=sys.stderr, flush=True)
    sms, native = T.device_traits(dev)
    sweep = Sweep(args, torch, copy_bps)
    for item in cases(args, torch, dev, sms, native):
        sweep.case(*item)
    if not smoke:
        torch.cuda.synchronize()
    summary(sweep)
    return sweep.rows


def summary(sweep: Sweep) -> None:
    """Best Triton config per (kind, shape, M); the rule's gap to it; per kind and M the
    four linears' summed time against bf16's (best product of each kind)."""
    rows = [r for r in sweep.rows if r.get("us") is not None and r.get("ok")]
    best: dict[tuple, dict] = {}
    rule: dict[tuple, dict] = {}
    fastest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kind"], r["shape"], r["m"])
        if r["product"] == "triton" and r["config"] not in ("v0", "dot"):
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
            if r.get("rule"):
                rule[key] = r
        if key not in fastest or r["us"] < fastest[key]["us"]:
            fastest[key] = r
    print("\nbest Triton GEMV per (kind, shape, M):", file=sys.stderr)
    for key in sorted(best):
        b, rl = best[key], rule.get(key)
        line = {"summary": "best_triton", "kind": key[0], "shape": key[1], "m": key[2],
                "config": b["config"], "us": b["us"], "frac_copy": b["frac_copy"],
                "ratio_bf16": b["ratio_bf16"],
                "rule_us": rl["us"] if rl else None, "rule_config": rl["config"] if rl else None}
        print(json.dumps(line), flush=True)
        gap = f"  (rule {rl['us']:.2f} us)" if rl else ""
        print(f"  {key[0]:>9} {key[1]:>7} m={key[2]} {b['config']:<22} {b['us']:8.2f} us "
              f"{(b['frac_copy'] or 0):5.2f} copy {(b['ratio_bf16'] or 0):5.2f}x bf16{gap}",
              file=sys.stderr)
    print("\nfour linears of a layer, summed (best product per shape):", file=sys.stderr)
    kinds = sorted({k[0] for k in fastest})
    ms = sorted({k[2] for k in fastest})
    for m in ms:
        shapes = sorted({k[1] for k in fastest if k[2] == m and k[0] == "bf16"})
        base = sum(fastest[("bf16", s, m)]["us"] for s in shapes)
        for kind in kinds:
            if kind == "bf16" or not all((kind, s, m) in fastest for s in shapes) or not base:
                continue
            tot = sum(fastest[(kind, s, m)]["us"] for s in shapes)
            tri = [best.get((kind, s, m)) for s in shapes]
            tri_tot = sum(b["us"] for b in tri) if all(tri) else None
            print(json.dumps({"summary": "layer", "kind": kind, "m": m, "shapes": shapes,
                              "bf16_us": base, "best_us": tot, "ratio_bf16": tot / base,
                              "triton_best_us": tri_tot,
                              "triton_ratio_bf16": tri_tot / base if tri_tot else None}),
                  flush=True)
            print(f"  m={m} {kind:>9}: {tot:8.2f} us vs bf16 {base:8.2f} us = {tot / base:.2f}x"
                  + (f" (Triton alone {tri_tot / base:.2f}x)" if tri_tot else ""),
                  file=sys.stderr)
    if sweep.skipped:
        print(json.dumps({"summary": "skipped", "cases": sweep.skipped,
                          "max_seconds": sweep.args.max_seconds}), flush=True)
        print(f"\n{sweep.skipped} cases skipped after --max-seconds "
              f"{sweep.args.max_seconds:.0f}", file=sys.stderr)


def predict(path: str, sms: int, fp8_native: bool) -> int:
    """The current ``gemv_config``'s choice per (kind, shape, M) looked up in a past sweep's
    JSON lines against that run's rule (its ``rule`` lines) and the best measured GEMV, and
    the four linears' sums against bf16's. A prediction: each linear was timed alone, with
    that run's code; a config the sweep did not time is named, not guessed."""
    from llamadist.kernels import wquant_triton as T
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "kind" in r and r.get("us") is not None and r.get("ok")]
    us = {(r["kind"], r["shape"], r["m"], r["config"]): r["us"] for r in rows
          if r["product"] in ("triton", "bf16")}
    then = {(r["kind"], r["shape"], r["m"]): (r["config"], r["us"]) for r in rows
            if r.get("rule")}
    shape_nk = {r["shape"]: (r["n"], r["k"]) for r in rows}
    print(f"the rule of this tree ({sms} SMs, float8 conversion {fp8_native}) in {path}:")
    print("  " + " ".join(["kind".rjust(9), "shape".rjust(7), "M ", "this rule".ljust(20),
                           "us".rjust(7), "  the sweep's rule".ljust(22), "us".rjust(7),
                           "  best measured".ljust(22), "us".rjust(7)]))
    sums = []
    for m in sorted({r["m"] for r in rows}):
        shapes = sorted({r["shape"] for r in rows if r["m"] == m and r["kind"] == "bf16"})
        bf16 = sum(us[("bf16", s, m, "F.linear")] for s in shapes)
        for kname in [k for k in KINDS if any(r["kind"] == k for r in rows)]:
            kind, group = KINDS[kname]
            got, old, best, missing = 0.0, 0.0, 0.0, []
            for s in shapes:
                n, k = shape_nk[s]
                label = T.gemv_config(kind, m, n, k, group or k, sms, fp8_native).label()
                mine = us.get((kname, s, m, label))
                got += mine or 0.0
                if mine is None:
                    missing.append(f"{s} {label}")
                was = then.get((kname, s, m), ("-", math.nan))
                old += was[1]
                top = min((v, c) for (kd, sh, mm, c), v in us.items()
                          if (kd, sh, mm) == (kname, s, m) and c not in ("v0", "dot"))
                best += top[0]
                print(f"  {kname:>9} {s:>7} {m}  {label:<20} "
                      + ("      -" if mine is None else f"{mine:7.2f}")
                      + f"   {was[0]:<20} {was[1]:7.2f}   {top[1]:<20} {top[0]:7.2f}")
            sums.append(f"  m={m} {kname:>9}: " + (f"rule {got:8.2f} us = {got / bf16:.2f}x"
                        if not missing else f"not timed: {', '.join(missing)}")
                        + f"   the sweep's rule {old:8.2f} us = {old / bf16:.2f}x"
                        + f"   best measured GEMV {best:8.2f} us = {best / bf16:.2f}x"
                        + f"   bf16 {bf16:.2f} us")
    print("four linears of a layer, summed:")
    print("\n".join(sums))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.predict:
        return predict(args.predict, args.sms, not args.no_fp8_native)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels launch / import
        args.m = [m for m in args.m if m <= 4]
    unknown = [s for s in args.shapes if s not in SHAPES and s not in args.extra_shapes] + \
        [k for k in args.kinds if k not in KINDS]
    if unknown:
        print(f"wquant_sweep: unknown shapes/kinds {unknown}", file=sys.stderr)
        return 2
    return sweep_main("wquant_sweep", args, compile_only, run)


def sweep_main(name: str, args, compile_only, run) -> int:
    """The sweeps' common end (this one's and moe_routed_sweep's): a CUDA device unless
    interpreted, then ``compile_only(args, torch)`` or ``run(args, torch)``'s rows, 1 if
    any gave a wrong result."""
    import torch
    if not args.interpret_smoke and not torch.cuda.is_available():
        print(f"{name}: no CUDA device (use --interpret-smoke for the CPU check)",
              file=sys.stderr)
        return 2
    if args.compile_only:
        return compile_only(args, torch)
    rows = run(args, torch)
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"{len(bad)} cases gave wrong results (see 'ok': false)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
