"""Kernel-level sweep of the routed expert GEMV (llamadist.kernels.moe_routed) on one CUDA GPU.

One Mixtral-8x7B MoE layer (D 4096, F 14336, 8 experts, top-2, bf16) at N = 1, 2, 3 tokens
routed at random (seeded; A = 2N assignments). Per N it times, warm, in CUDA graphs
(median of --reps replays; min too), with the weights rotated over enough copies of the
expert stacks that the L2 cache does not serve them (a decode step reads each layer's
routed rows once from HBM):

* bf16 ``F.linear`` reading the same weight bytes, the dense comparison: ``dense_gate_up``
  (A 2F x D, x (N, D)), ``dense_down`` (D x A F, x (N, A F)) and both in a row
  (``dense_layer``);
* ``op``: the whole routed op (``routed_expert_sum``, both kernels) with DEFAULT;
* ``gate_up``: the gate/up kernel alone, per gate/up ``Cut``; ``down``: the down kernel
  (and its split-K sum) alone on a given act, per down ``Cut``. The kernels are
  independent, so each is swept alone: --configs near (DEFAULT's cut and its neighbours:
  prefetch, x in the tile's layout, tiles, warps, and split-K for down), mid (default: a
  grid of tiles x warps 4, 8 x prefetch 0-2 x x layout (x split 1, 2, 4, 8)) or wide.

It first measures a device-to-device copy of 2 GiB (read + write bytes per second) as the
reachable rate. Per case one JSON line on stdout: microseconds, the bytes the case reads
(``bytes``: the routed experts' rows, once per assignment, + x + act + out; the dense
cases their weight + x + y; ``bytes_distinct``: each routed expert once), GB/s, the
fraction of the copy rate, the time of the dense case of the same bytes
(``ratio_dense``), and the largest error relative to a float32 reference (``ok``: act
within 1e-3 of max |act|, out within 2e-2 of max |out|). A table goes to stderr. At the
end, per N: the best gate/up and down cuts, then the op with the two together, timed
(phase ``op``, ``best``), against DEFAULT's op and the dense layer.

Next session (one H200; ~5-7 minutes with --configs mid: ~650 Triton compiles in 12
processes, then ~1 000 timed cases, 2.8 GB of weights x 2 copies):

    python benchmarks/moe_routed_sweep.py > moesweep.jsonl 2> moesweep.txt

``--max-seconds`` (default 420, from the start, compiling included) stops starting new
cases after that long and says how many it skipped (dense, DEFAULT and the near cuts run
first; the best-of-N ops always run). ``--n 1`` etc. run a part. ``--interpret-smoke``
runs the same logic on the CPU under Triton's interpreter with tiny shapes, the near
cuts and no timing (a check that the script works, not a measurement). ``--predict
moesweep.jsonl`` runs nothing: per N it looks this tree's DEFAULT up in a past sweep's
lines (its op if timed, and its two kernels' sum) against that run's DEFAULT.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wquant_sweep import (compile_in_processes, copy_rate, sweep_main,  # noqa: E402
                          time_graph)

START = time.perf_counter()  # --max-seconds counts from here (compiling ahead included)
SHAPE = {"d": 4096, "f": 14336, "experts": 8, "k": 2}  # Mixtral-8x7B, one layer
SMOKE_SHAPE = {"d": 40, "f": 264, "experts": 8, "k": 2}  # tails; down: F over 2 tiles
TOL = {"gate_up": 1e-3, "down": 2e-2, "op": 2e-2}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="1,2,3", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--configs", default="mid", choices=["near", "mid", "wide"])
    p.add_argument("--rotate-mb", type=float, default=256.0,
                   help="weight copies rotated per case: at least this many MiB (> L2)")
    p.add_argument("--reps", type=int, default=7, help="graph replays timed per case")
    p.add_argument("--max-seconds", type=float, default=420.0)
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0, help="weights and routing")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="CPU, Triton's interpreter, tiny shapes, near cuts, no timing")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="processes compiling the Triton cases ahead (0: compile when timed; "
                   "default min(12, CPUs - 2) on CUDA, 0 with --interpret-smoke)")
    p.add_argument("--compile-timeout", type=float, default=240.0)
    p.add_argument("--compile-only", help=argparse.SUPPRESS)  # "i/n": a worker's share
    p.add_argument("--predict", metavar="SWEEP_JSONL",
                   help="no run: look this tree's DEFAULT up in a past sweep's JSON lines "
                   "per N against that run's DEFAULT (a prediction from measured cases)")
    return p.parse_args(argv)


# ---- the cuts ---------------------------------------------------------------------------
def _fits(c) -> bool:
    """8-64 weight elements a thread a tile (bf16: 4-32 registers, x3 with prefetch 2)."""
    return 8 <= c.rows * c.cols // (32 * c.warps) <= 64


def _near(base, splits: tuple[int, ...]) -> list:
    from dataclasses import replace as rep
    out = [base] + [rep(base, prefetch=p) for p in (1, 2)]
    out += [rep(base, x_tile=True), rep(base, prefetch=2, x_tile=True)]
    out += [rep(base, split=s) for s in splits] + [rep(base, split=s, prefetch=2)
                                                   for s in splits]
    out += [rep(base, rows=base.rows // 2), rep(base, rows=base.rows * 2),
            rep(base, cols=base.cols // 2), rep(base, cols=base.cols * 2),
            rep(base, warps=2), rep(base, warps=8), rep(base, warps=8, prefetch=2)]
    return out


def cuts(kernel: str, mode: str) -> list:
    """The ``kernel`` ("gate_up" / "down") cuts of ``mode``, DEFAULT's first, the near ones
    next, without repeats."""
    from llamadist.kernels.moe_routed import DEFAULT, Cut
    base = DEFAULT.gate_up if kernel == "gate_up" else DEFAULT.down
    splits = (2, 4, 8) if kernel == "down" else ()
    out = _near(base, splits)
    if mode != "near":
        tiles = ([(8, 256), (16, 128), (16, 256), (16, 512), (32, 128), (32, 256)]
                 if kernel == "gate_up" else
                 [(4, 512), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512)])
        if mode == "wide":
            tiles = list(itertools.product((4, 8, 16, 32, 64), (128, 256, 512, 1024)))
        warps = (2, 4, 8) if mode == "wide" else (4, 8)
        for (r, c), w, p, xt, s in itertools.product(tiles, warps, (0, 1, 2), (False, True),
                                                     (1,) + splits):
            out.append(Cut(r, c, warps=w, prefetch=p, split=s, x_tile=xt))
    seen, keep = set(), []
    for c in out:
        if c not in seen and (c == base or _fits(c)):
            seen.add(c)
            keep.append(c)
    return keep


# ---- one N's data -------------------------------------------------------------------------
class Routed:
    """One N's tensors: x (N, D), routing, the float32 references and the dense weights."""

    def __init__(self, torch, stacks, n: int, shape: dict, gen, refs: bool = True):
        d, f, e, k = shape["d"], shape["f"], shape["experts"], shape["k"]
        dev = stacks[0][0].device
        self.n, self.a = n, n * k
        self.x = torch.randn(n, d, device=dev, generator=gen).to(torch.bfloat16)
        self.index = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k]
                                  for _ in range(n)])  # (N, k) top-k of E, random
        self.weights = torch.softmax(torch.randn(n, k, device=dev, generator=gen), -1)
        self.group = self.index.flatten()  # (A,) every expert held
        self.wflat = self.weights.flatten()
        self.distinct = len(set(self.group.tolist()))
        w13, w2 = stacks[0]
        self.act_ref = self.out_ref = None
        if refs:  # float32 from the bf16 values, assignment by assignment
            act = []
            for a, g in enumerate(self.group.tolist()):
                h = w13[g].float() @ self.x[a // k].float()  # (2F,)
                act.append(torch.nn.functional.silu(h[:f]) * h[f:])
            self.act_ref = torch.stack(act)  # (A, F)
            out = torch.zeros(n, d, device=dev)
            for a, g in enumerate(self.group.tolist()):
                out[a // k] += self.wflat[a] * (w2[g].float() @ self.act_ref[a])
            self.out_ref = out  # (N, D)
        # the down kernel's input: the reference act (a random one without refs)
        self.act_in = self.act_ref if refs else torch.randn(self.a, f, device=dev,
                                                            generator=gen)
        es = 2  # bf16
        self.rows_gu = self.a * 2 * f * d * es  # routed rows, once per assignment
        self.rows_dn = self.a * d * f * es
        self.x_b, self.act_b, self.out_b = n * d * es, self.a * f * 4, n * d * es
        self.per_expert = (2 * f * d + d * f) * es

    def dense(self, torch, gen, copies: int) -> tuple[list[tuple], object]:
        """([(w_gate_up (A 2F, D), w_down (D, A F))] x ``copies``, the down's x (N, A F)):
        bf16 F.linear weights of the routed rows' bytes."""
        d, f = self.x.shape[1], self.act_in.shape[1]
        dev = self.x.device

        def rand(*shape):
            return (torch.randn(*shape, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        w = (rand(self.a * 2 * f, d), rand(d, self.a * f))
        xd = torch.randn(self.n, self.a * f, device=dev, generator=gen).to(torch.bfloat16)
        return [w] + [(w[0].clone(), w[1].clone()) for _ in range(copies - 1)], xd


def make_stacks(torch, shape: dict, dev, gen, copies: int) -> list[tuple]:
    """[(w13 (E, 2F, D), w2 (E, D, F))] bf16, ``copies`` identical copies (rotation)."""
    d, f, e = shape["d"], shape["f"], shape["experts"]
    w13 = (torch.randn(e, 2 * f, d, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(e, d, f, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    return [(w13, w2)] + [(w13.clone(), w2.clone()) for _ in range(copies - 1)]


def routed_cases(args, G, R, r: Routed, stacks, mode: str):
    """(phase, config label, cut or config, is DEFAULT, fn(copy) -> callable) of one N:
    DEFAULT's op and cuts first, then the rest (cut lists in ``mode``)."""
    from llamadist.kernels.moe_routed import DEFAULT
    first, later = [], []
    first.append(("op", DEFAULT.label(), DEFAULT, True, lambda c: (
        lambda: R.routed_expert_sum(r.x, r.weights, r.index, *stacks[c], config=DEFAULT))))
    for kernel in ("gate_up", "down"):
        base = DEFAULT.gate_up if kernel == "gate_up" else DEFAULT.down
        near = set(cuts(kernel, "near"))
        for cut in cuts(kernel, mode):
            if kernel == "gate_up":
                def fn(c, cut=cut):
                    return lambda: G.gate_up(r.x, r.group, stacks[c][0], cut)
            else:
                def fn(c, cut=cut):
                    return lambda: G.down_sum(r.act_in, r.wflat, r.group, stacks[c][1],
                                              r.n, cut)
            item = (kernel, cut.label(), cut, cut == base, fn)
            (first if cut == base or cut in near else later).append(item)
    return first, later


# ---- the sweep ------------------------------------------------------------------------------
class Sweep:
    def __init__(self, args, torch, copy_bps: float | None):
        self.args, self.torch, self.copy = args, torch, copy_bps
        self.rows: list[dict] = []
        self.dense: dict[tuple, float] = {}  # (n, phase) -> us
        self.skipped = 0
        self.cut_of = {c.label(): c for k in ("gate_up", "down") for c in cuts(k, args.configs)}

    def over(self) -> bool:
        return time.perf_counter() - START > self.args.max_seconds

    def time(self, fns: list) -> tuple[float, float, str]:
        if self.args.interpret_smoke:  # the interpreter's time: exercises the summary only
            t = time.perf_counter()
            fns[0]()
            us = (time.perf_counter() - t) * 1e6
            return us, us, "interpreter (not a measurement)"
        return time_graph(self.torch, fns, max(len(fns), 16), self.args.reps)

    def case(self, row: dict, fns: list, nbytes: int, distinct: int, check=None,
             force: bool = False) -> dict | None:
        """Time (or, smoke, just run) one case and report it; ``check(y)`` -> relative error."""
        if self.over() and not force:
            self.skipped += 1
            return None
        try:
            err = check(fns[0]()) if check else None
            us, us_min, mode = self.time(fns)
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            print(json.dumps(row | {"error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            return None
        ph = row["phase"]
        if ph.startswith("dense"):
            self.dense[(row["n"], ph)] = us
        dense = self.dense.get((row["n"], {"gate_up": "dense_gate_up", "down": "dense_down",
                                            "op": "dense_layer"}.get(ph, ph)))
        gbps = nbytes / (us * 1e-6) / 1e9
        row |= {"us": us, "us_min": us_min, "bytes": nbytes, "bytes_distinct": distinct,
                "GBps": gbps, "frac_copy": gbps * 1e9 / self.copy if self.copy else None,
                "dense_us": dense, "ratio_dense": us / dense if dense else None,
                "max_rel_err": err, "ok": err is None or err <= TOL[ph], "timing": mode}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        fmt = (lambda v, f: "-" if v is None else format(v, f))
        print(f"N={row['n']} {ph:>13} {row['config']:<28}{'*' if row.get('default') else ' '}"
              f"{fmt(us, '9.2f')} us {fmt(gbps, '7.0f')} GB/s "
              f"{fmt(row['frac_copy'], '5.2f')} copy {fmt(row['ratio_dense'], '5.2f')}x dense"
              f" err {fmt(err, '.1e')}{'' if row['ok'] else ' WRONG'}",
              file=sys.stderr, flush=True)
        return row


def rel_err(torch, ref):
    def check(y):
        return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return check


def run_n(sweep: Sweep, torch, G, R, stacks, r: Routed, gen) -> list:
    """Dense, DEFAULT and the near cuts of one N; returns the later cases (the rest)."""
    n, copies = r.n, len(stacks)
    dense_w, xd = r.dense(torch, gen, copies)
    lin = torch.nn.functional.linear
    base = {"n": n, "a": r.a}
    gu_b = dense_w[0][0].nbytes + r.x_b + n * dense_w[0][0].shape[0] * 2
    dn_b = dense_w[0][1].nbytes + xd.nbytes + r.out_b
    for ph, fn, nb in (("dense_gate_up", lambda c: (lambda: lin(r.x, dense_w[c][0])), gu_b),
                       ("dense_down", lambda c: (lambda: lin(xd, dense_w[c][1])), dn_b),
                       ("dense_layer", lambda c: (lambda: (lin(r.x, dense_w[c][0]),
                                                           lin(xd, dense_w[c][1]))),
                        gu_b + dn_b)):
        sweep.case(base | {"phase": ph, "config": "F.linear"}, [fn(c) for c in range(copies)],
                   nb, nb, force=True)
    first, later = routed_cases(sweep.args, G, R, r, stacks, sweep.args.configs)
    for item in first:
        routed_case(sweep, torch, r, stacks, item)
    return later


def routed_case(sweep: Sweep, torch, r: Routed, stacks, item, best: bool = False):
    phase, label, _, default, fn = item
    gu = r.rows_gu + r.x_b + r.act_b
    dn = r.rows_dn + r.act_b + r.out_b
    nbytes = {"gate_up": gu, "down": dn, "op": gu + dn}[phase]
    rows = {"gate_up": r.rows_gu, "down": r.rows_dn, "op": r.rows_gu + r.rows_dn}[phase]
    distinct = nbytes - rows + rows // r.a * r.distinct  # each routed expert once
    ref = {"gate_up": r.act_ref, "down": r.out_ref, "op": r.out_ref}[phase]
    row = {"n": r.n, "a": r.a, "phase": phase, "config": label, "default": default}
    if best:
        row["best"] = True
    return sweep.case(row, [fn(c) for c in range(len(stacks))], nbytes, distinct,
                      None if ref is None else rel_err(torch, ref), force=best)


def best_of(sweep: Sweep, torch, G, R, stacks, routed: dict) -> None:
    """Per N: the best gate/up and down cuts (correct ones), the op with both, timed."""
    from llamadist.kernels.moe_routed import RoutedConfig
    print("\nbest per N (the op with the best gate/up and down cuts):", file=sys.stderr)
    for n, r in routed.items():
        ok = [x for x in sweep.rows if x["n"] == n and x["ok"] and x.get("us") is not None]
        pick = {}
        for ph in ("gate_up", "down", "op"):
            rows = [x for x in ok if x["phase"] == ph]
            pick[ph] = min(rows, key=lambda x: x["us"]) if rows else None
        if not (pick["gate_up"] and pick["down"]):
            continue
        cfg = RoutedConfig(sweep.cut_of[pick["gate_up"]["config"]],
                           sweep.cut_of[pick["down"]["config"]])
        item = ("op", cfg.label(), cfg, False, lambda c, cfg=cfg: (
            lambda: R.routed_expert_sum(r.x, r.weights, r.index, *stacks[c], config=cfg)))
        got = routed_case(sweep, torch, r, stacks, item, best=True)
        default = [x for x in ok if x["phase"] == "op" and x["default"]]
        line = {"summary": "best", "n": n, "config": cfg.label(),
                "us": got and got["us"], "frac_copy": got and got["frac_copy"],
                "default_us": default[0]["us"] if default else None,
                "default_frac_copy": default[0]["frac_copy"] if default else None,
                "dense_layer_us": sweep.dense.get((n, "dense_layer")),
                "gate_up": {k: pick["gate_up"][k] for k in ("config", "us", "frac_copy")},
                "down": {k: pick["down"][k] for k in ("config", "us", "frac_copy")}}
        print(json.dumps(line), flush=True)
        if got and default:
            print(f"  N={n} {cfg.label()}: {got['us']:.2f} us "
                  f"({(got['frac_copy'] or 0):.2f} copy) against DEFAULT "
                  f"{default[0]['us']:.2f} us ({(default[0]['frac_copy'] or 0):.2f}), dense "
                  f"{line['dense_layer_us'] or 0:.2f} us", file=sys.stderr)
    if sweep.skipped:
        print(json.dumps({"summary": "skipped", "cases": sweep.skipped,
                          "max_seconds": sweep.args.max_seconds}), flush=True)
        print(f"\n{sweep.skipped} cases skipped after --max-seconds "
              f"{sweep.args.max_seconds:.0f}", file=sys.stderr)


def setup(args, torch, refs: bool = True, rotate: bool = True):
    """(device, Triton module, front module, weight stacks (copies if ``rotate``),
    {N: Routed}, generator)."""
    from llamadist.kernels import gpu
    from llamadist.kernels import moe_routed as R
    smoke = args.interpret_smoke
    dev = torch.device("cpu" if smoke else args.device)
    shape = SMOKE_SHAPE if smoke else SHAPE
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    per_call = 2 * (2 * shape["f"] * shape["d"]) * 2  # the smallest case's routed bytes
    copies = 1 if smoke or not rotate else max(2, math.ceil(args.rotate_mb * 2**20 / per_call))
    stacks = make_stacks(torch, shape, dev, gen, copies)
    routed = {n: Routed(torch, stacks, n, shape, gen, refs) for n in args.n}
    return dev, gpu.load("moe_routed"), R, stacks, routed, gen


def run(args, torch) -> list[dict]:
    from llamadist.kernels import gpu
    if not gpu.INSTALLED:
        raise SystemExit("moe_routed_sweep: triton is not installed")
    smoke = args.interpret_smoke
    if args.compile_workers is None:
        args.compile_workers = 0 if smoke else max(1, min(12, (os.cpu_count() or 4) - 2))
    if args.compile_workers > 0:
        compile_ahead(args)
    copy_bps = None if smoke else copy_rate(torch, torch.device(args.device), args.copy_gib)
    if copy_bps:
        print(json.dumps({"copy_GBps": copy_bps / 1e9, "copy_gib": args.copy_gib,
                          "device": torch.cuda.get_device_name(args.device)}), flush=True)
        print(f"device-to-device copy: {copy_bps / 1e9:.0f} GB/s (read + write)",
              file=sys.stderr, flush=True)
    _, G, R, stacks, routed, gen = setup(args, torch)
    sweep = Sweep(args, torch, copy_bps)
    later = []
    for n, r in routed.items():
        print(json.dumps({"routing": n, "index": r.index.tolist(), "distinct": r.distinct}),
              flush=True)
        later += [(r, it) for it in run_n(sweep, torch, G, R, stacks, r, gen)]
    for r, item in later:
        routed_case(sweep, torch, r, stacks, item)
    best_of(sweep, torch, G, R, stacks, routed)
    if not smoke:
        torch.cuda.synchronize()
    return sweep.rows


def compile_ahead(args) -> None:
    """Compile the Triton cases in ``args.compile_workers`` processes at once (each runs its
    share once; Triton's on-disk cache then serves the timed run)."""
    n = args.compile_workers
    base = [sys.executable, str(Path(__file__).resolve()), "--n", ",".join(map(str, args.n)),
            "--configs", args.configs, "--device", args.device, "--seed", str(args.seed)]
    if args.interpret_smoke:
        base += ["--interpret-smoke"]
    compile_in_processes(base, n, args.compile_timeout)


def compile_only(args, torch) -> int:
    """This process's share (``--compile-only i/n``) of the routed cases, run once each
    (every N: the down kernel's N = 1 is a specialization of its own)."""
    i, n = (int(v) for v in args.compile_only.split("/"))
    dev, G, R, stacks, routed, _ = setup(args, torch, refs=False, rotate=False)
    j = done = 0
    for r in routed.values():
        first, later = routed_cases(args, G, R, r, stacks[:1], args.configs)
        for phase, label, _, _, fn in first + later:
            if j % n == i:
                try:
                    fn(0)()
                    done += 1
                except Exception as e:  # noqa: BLE001 - the timed run reports it
                    print(f"compile {phase} {label}: {type(e).__name__}: {e}"[:300],
                          file=sys.stderr)
            j += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    print(f"compile worker {i}/{n}: {done} cases", file=sys.stderr, flush=True)
    return 0


def predict(path: str) -> int:
    """This tree's DEFAULT looked up in a past sweep's JSON lines, per N: its whole op where
    that run timed it, and the sum of its gate/up and down kernels timed alone (measured
    cases either way, with that run's code); against that run's DEFAULT (op and kernel
    sum), its best op and the dense layer. Cases with errors (not ``ok``) are left out."""
    from llamadist.kernels.moe_routed import DEFAULT
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    ok = [r for r in rows if r.get("phase") and r.get("ok") and r.get("us") is not None]
    us = {(r["n"], r["phase"], r["config"]): r["us"] for r in ok}
    print(f"DEFAULT of this tree ({DEFAULT.label()}) in {path}:")
    for n in sorted({r["n"] for r in ok}):
        def cuts(label):  # "gu<cut>_dn<cut>" -> (op, gate/up + down alone) us, None if not timed
            gu, dn = label[2:].split("_dn")
            parts = [us.get((n, "gate_up", gu)), us.get((n, "down", dn))]
            return us.get((n, "op", label)), None if None in parts else sum(parts)
        then = [r["config"] for r in ok if r["n"] == n and r["phase"] == "op" and r.get("default")]
        best = min((v, c) for (nn, ph, c), v in us.items() if nn == n and ph == "op")
        fmt = (lambda v: "      -" if v is None else f"{v:7.2f}")
        mine = cuts(DEFAULT.label())
        was = cuts(then[0]) if then else (None, None)
        print(f"  N={n}: this DEFAULT op {fmt(mine[0])} us, kernels {fmt(mine[1])} us | "
              f"the sweep's DEFAULT {then[0] if then else '-'} op {fmt(was[0])} us, kernels "
              f"{fmt(was[1])} us | best op {best[1]} {best[0]:7.2f} us | dense layer "
              f"{fmt(us.get((n, 'dense_layer', 'F.linear')))} us")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.predict:
        return predict(args.predict)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels load
        args.configs = "near"
    return sweep_main("moe_routed_sweep", args, compile_only, run)


if __name__ == "__main__":
    sys.exit(main())
