"""What the schedule alone gives at H200 speeds (issue 13): the real engine loop, scheduler
and block pool (``LLMEngine`` with schedule-ahead, as on one GPU) over an executor that
computes nothing and charges each step a modelled time on a virtual clock. So a serving
run's wall time splits into what the schedule costs when every step runs at the speed the
same machine showed in ``llamadist bench``, and what execution adds on top.

    PYTHONPATH=. python benchmarks/schedule_sim.py [--requests 256] [--prompt-min 128] \
        [--prompt-max 1024] [--new 256] [--budgets 1024,2048,4096,8192,16384,32768] \
        [--max-batches 256] [--kv-tb-s 4.1] [--fit-prefill-s 10.9] [--json-out F] \
        [--trace-out F]
    PYTHONPATH=. python benchmarks/schedule_sim.py --compare steps.jsonl  # measured vs model

The cost model (``H200``), per step of S sequences and N tokens, from the step's columns:

* a decode-only step runs through the CUDA graph of the bucket holding S (padding rows
  cost as real ones): ``curve(bucket)``, linear between the bench's decode ms/step at
  batch 1, 64 and 256 (128-token prompts, so 128-256 cached tokens per sequence), plus,
  with ``--kv-tb-s``, the K/V bytes of the cached tokens past the bench's mean of 192
  per sequence at that rate;
* any other step runs eagerly: ``N * token_s`` on the device (the bench's prefill of 256
  x 128 tokens: 32 768 tokens in 625 ms, all included), at least one read of the weights,
  the decodes' K/V reads as above, and the prompts' causal attention FLOPs at
  ``attn_flops_s``; its host enqueue (``eager_host_s``) overlaps the device's previous
  step, as schedule-ahead does on the GPU; a graph replay's is ``graph_host_s``;
* the engine's own host work per sequence: ``host_pre_s`` before launch (schedule, build),
  ``host_post_s`` after collect (update, outputs).

``--fit-prefill-s T`` also finds the eager per-token time that makes the default case's
time to every first token T (the measured run's), i.e. how fast its mixed steps ran.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass, replace

from llamadist.config import RuntimeConfig, named_shape
from llamadist.engine.engine import LLMEngine, run_stats
from llamadist.engine.step_trace import StepTrace
from llamadist.generation.sampling import SamplingParams
from llamadist.planning.profile import profile
from llamadist.runtime.cuda_graph import bucket_sizes
from llamadist.runtime.paged_graphs import bucket_for

# Measured on one H200 with the random Llama-3-8B-shaped bf16 folder (vocabulary 49152),
# `llamadist bench CK --devices cuda:0 --batch B --prompt-len 128 --gen-len 128`:
# (batch, decode ms/step, prefill s), benchmarks/RESULTS.md; session 11 (2026-12-02) for
# batch 1 and 256, session 9 (2026-12-01) for 64.
BENCH = ((1, 5.17e-3, 37.7e-3), (64, 7.17e-3, 248e-3), (256, 12.29e-3, 625.3e-3))


def llama3_8b():
    return replace(named_shape("llama3-8b"), vocab_size=49152)


@dataclass
class H200:
    """Seconds per step of the Llama-3-8B shape in bf16 on one H200 (see the module
    docstring; figures from benchmarks/RESULTS.md, BENCH above)."""
    curve: tuple = tuple((b, d) for b, d, _ in BENCH)  # (bucket, graph step s)
    ref_ctx: float = 192.0        # the bench's mean cached tokens per sequence in decode
    kv_s: float = 0.0             # s per cached token read (bf16 K+V of 32 layers / rate)
    token_s: float = BENCH[-1][2] / (256 * 128)  # eager step device s per token
    eager_host_s: float = 30e-3   # eager step host enqueue (bench batch 1 prefill 28-38 ms)
    graph_host_s: float = 0.3e-3  # graph replay: copy the step's table, launch
    host_pre_s: float = 3e-6      # engine host s per sequence before launch and after
    host_post_s: float = 5e-6     # collect (RESULTS: ~8 us/seq/step, streamed text)
    weights_s: float = 14.4e9 / 3.8e12  # one read of the weights at the copy rate
    attn_flops_s: float = 400e12  # prefill attention (SDPA) FLOP/s
    attn_flops_per_pair: float = 0.0  # set from the profile (all layers)

    def __post_init__(self) -> None:
        if not self.attn_flops_per_pair:
            prof = profile(llama3_8b(), dtype="bfloat16")
            self.attn_flops_per_pair = sum(r.attn_flops_per_ctx_token for r in prof.layers)

    def graph_step(self, bucket: int, kv_tokens: int, seqs: int) -> float:
        xs = [b for b, _ in self.curve]
        i = min(max(bisect.bisect_left(xs, bucket), 1), len(xs) - 1)
        (b0, t0), (b1, t1) = self.curve[i - 1], self.curve[i]
        base = t0 + (t1 - t0) * (bucket - b0) / (b1 - b0)
        return base + self.kv_s * max(0.0, kv_tokens - seqs * self.ref_ctx)

    def eager_step(self, tokens: int, decode_kv: int, pairs: int) -> float:
        return (max(self.weights_s, tokens * self.token_s)
                + self.kv_s * decode_kv + pairs * self.attn_flops_per_pair / self.attn_flops_s)


class SimExecutor:
    """The executor interface over a virtual clock: ``now`` is the host's time, ``free``
    when the device finishes what it was given. Every sampled token is 5 (EOS ignored)."""

    depth = 1
    blocking = True
    kv_path = None
    kv_dtype = "bfloat16"

    def __init__(self, cost: H200, max_batch: int, ahead: bool = True, graphs: bool = True):
        self.cost, self.ahead, self.graphs = cost, ahead, graphs
        self.config = llama3_8b()
        self.devices = ["cuda:0"]
        self.sizes = bucket_sizes(max_batch)
        self.now = self.free = 0.0
        self.graphed = False
        self._ends: deque = deque()

    def init_paged(self, num_blocks: int, block_size: int) -> None:
        pass

    def launch(self, work) -> None:
        cost = self.cost
        cols = work.columns
        q, st = cols.query_lens, cols.starts
        s = len(q)
        dec = q == 1
        kv_dec = int((st[dec] + 1).sum())
        self.now += cost.host_pre_s * s
        self.graphed = self.graphs and bool(dec.all())
        if self.graphed:
            device = cost.graph_step(bucket_for(s, self.sizes), kv_dec, s)
            host = cost.graph_host_s
        else:
            n, p = q[~dec], st[~dec]
            pairs = int((n * p + n * (n + 1) // 2).sum())
            device, host = cost.eager_step(int(q.sum()), kv_dec, pairs), cost.eager_host_s
        start = max(self.free, self.now)  # kernels run as they are enqueued
        self.now += host
        self.free = max(start + device, self.now)
        self._ends.append((self.free, int(cols.samples.sum()), s))

    def collect(self) -> list[int]:
        end, sampled, s = self._ends.popleft()
        self.now = max(self.now, end) + self.cost.host_post_s * s
        return [5] * sampled

    def idle(self) -> None:
        pass

    def reset(self) -> None:
        self._ends.clear()

    def close(self) -> None:
        pass


def simulate(prompt_lens: list[int], new: int, cost: H200, max_batch: int,
             budget: int | None = None, ahead: bool = True, trace: bool = True,
             max_seq: int | None = None) -> dict:
    """One run of every request arriving at once: run_stats on the virtual clock, the
    step trace's summary (engine.step_trace), and the StepTrace itself."""
    ex = SimExecutor(cost, max_batch, ahead=ahead)
    runtime = RuntimeConfig(max_batch=max_batch, max_seq_len=max_seq or max(prompt_lens) + new,
                            max_batch_tokens=budget)
    eng = LLMEngine(ex, None, runtime)
    clock = lambda: ex.now  # noqa: E731
    eng.scheduler.clock = clock
    if trace:
        eng.trace = StepTrace(clock=clock)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    rng = random.Random(0)
    reqs = []
    for n in prompt_lens:
        r = eng.add_request([rng.randrange(3, 49152) for _ in range(n)], params)
        r.arrival_s = 0.0
        reqs.append(r)
    by_id = {r.id: r for r in reqs}
    while eng.has_unfinished:
        for out in eng.step():
            if out.finished:  # the engine stamps its own clock: the virtual one instead
                by_id[out.request_id].finished_s = ex.now
    stats = run_stats(reqs, ex.now)
    stats["budget"] = eng.scheduler.max_batch_tokens
    stats["preemptions"] = eng.scheduler.preemptions
    if trace:
        stats["trace"] = eng.trace.summary()
        stats["_trace"] = eng.trace
    return stats


def bench_figures(batch: int, cost: H200, gen: int = 128) -> tuple[float, float]:
    """(decode s/step, prefill s) of `llamadist bench --batch B --prompt-len 128
    --gen-len gen` (default budget) as the simulation runs it."""
    st = simulate([128] * batch, gen, cost, batch, trace=False)
    return st["decode_s"] / (gen - 1), st["prefill_s"]


def fit_token_s(lens: list[int], new: int, cost: H200, max_batch: int, max_seq: int,
                target_s: float) -> H200:
    """The eager per-token time (bisection) that makes the run's time to every first
    token ``target_s``."""
    lo, hi = cost.token_s / 4, cost.token_s * 20
    for _ in range(18):
        mid = (lo * hi) ** 0.5
        st = simulate(lens, new, replace(cost, token_s=mid), max_batch, trace=False,
                      max_seq=max_seq)
        lo, hi = (mid, hi) if st["prefill_s"] < target_s else (lo, mid)
    return replace(cost, token_s=(lo * hi) ** 0.5)


def workload(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """benchmarks/serving.py's prompt lengths (its generator, same seed)."""
    rng = random.Random(seed)
    lens = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        for _ in range(k):
            rng.randrange(3, 49152)  # serving.py draws the tokens from the same generator
        lens.append(k)
    return lens


def row(label: str, st: dict) -> dict:
    t = st["trace"]
    out = {"case": label, "tokens_per_s": round(st["tokens_per_s"]),
           "wall_s": round(st["wall_s"], 2), "prefill_s": round(st["prefill_s"], 2),
           "ttft_p50_s": round(st["ttft_p50_s"], 2),
           "tpot_p50_ms": round(1e3 * st["tpot_p50_s"], 1),
           "tail_s": round(st["wall_s"] - st["prefill_s"], 2), "steps": t["all"]["steps"]}
    for k in ("decode_graph", "mixed", "prefill"):
        if k in t:
            out[k] = f"{t[k]['steps']} steps {t[k]['wall_s']:.2f} s"
    return out


def sweep(label: str, lens: list[int], args, cost: H200, res: dict) -> None:
    """The default case (schedule-ahead on and off) and every --budgets / --max-batches."""
    max_seq = args.prompt_max + args.new
    first = True
    for mb in [int(x) for x in args.max_batches.split(",")]:
        for budget in [None] + [int(x) for x in args.budgets.split(",")]:
            for ahead in ([True, False] if budget is None else [True]):
                st = simulate(lens, args.new, cost, min(mb, args.requests), budget, ahead,
                              max_seq=max_seq)
                case = (f"{label}: max_batch {mb}, budget {st['budget']}"
                        f"{' (default)' if budget is None else ''}"
                        f"{'' if ahead else ', no schedule-ahead'}")
                if first and args.trace_out:
                    st["_trace"].write(f"{args.trace_out}.{label}.jsonl")
                first = False
                st.pop("_trace", None)
                res["cases"].append({"case": case, **st})
                print(json.dumps(row(case, st)), flush=True)


def trace_cost(lens: list[int], new: int, cost: H200, rounds: int) -> dict:
    """The trace's own host cost: the default case's CPU time (this thread: the engine,
    scheduler and the simulated executor) per step with the trace off and on, rounds
    interleaved; medians."""
    import statistics
    import time
    got: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            t0 = time.thread_time()
            st = simulate(lens, new, cost, 256, trace=on, max_seq=max(lens) + new)
            steps = st["trace"]["all"]["steps"] if on else None
            got[on].append(time.thread_time() - t0)
        got.setdefault("steps", steps)
    off, on = statistics.median(got[False]), statistics.median(got[True])
    n = got["steps"]
    # and the trace's calls alone, for one step of 256 decodes (best of 5 x 200 calls)
    from llamadist.engine.request import Request
    from llamadist.engine.scheduler import Chunk
    chunks = [Chunk(Request(str(i), [1] * 600, SamplingParams(), 0), 700, 1, True)
              for i in range(256)]
    tr, best = StepTrace(), float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for k in range(200):
            tr.launched(k, chunks, 0.0, 0.0, True)
            tr.collected(k, 0.0)
        best = min(best, (time.perf_counter() - t0) / 200)
        tr.records.clear()
    return {"steps": n, "off_us_per_step": 1e6 * off / n, "on_us_per_step": 1e6 * on / n,
            "trace_us_per_step": 1e6 * (on - off) / n, "rounds": rounds,
            "calls_us_per_256_decode_step": 1e6 * best}


def compare(path: str, cost: H200, max_batch: int = 256) -> dict:
    """A measured trace (serving.py --trace) step by step against the model: per kind of
    step, measured and modelled seconds and their ratio, for the first 5 steps of the kind
    and the rest (one-off costs show in the first). The model's eager time here leaves out
    the decodes' K/V reads and the prompts' attention (a trace has no per-sequence data)."""
    from llamadist.engine.step_trace import _label, read
    sizes = bucket_sizes(max_batch)
    out: dict = {}
    seen: dict[str, int] = {}
    for r in read(path):
        label = _label(r)
        if r["graph"]:
            model = cost.graph_step(bucket_for(r["decode_seqs"], sizes), r["kv_tokens"],
                                    r["decode_seqs"])
        else:
            model = cost.eager_step(r["prefill_tokens"] + r["decode_seqs"], 0, 0)
        part = "first5" if seen.get(label, 0) < 5 else "rest"
        seen[label] = seen.get(label, 0) + 1
        d = out.setdefault(f"{label}.{part}", {"steps": 0, "measured_s": 0.0, "model_s": 0.0})
        d["steps"] += 1
        d["measured_s"] += r["wall_s"]
        d["model_s"] += model
    for d in out.values():
        d["ratio"] = d["measured_s"] / d["model_s"] if d["model_s"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-min", type=int, default=128)
    p.add_argument("--prompt-max", type=int, default=1024)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--budgets", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--max-batches", default="256", help="--max-batch values to simulate")
    p.add_argument("--decode-ms", default=",".join(f"{b}:{1e3 * d:g}" for b, d, _ in BENCH),
                   help="graph decode ms/step by batch (BATCH:MS,...)")
    p.add_argument("--prefill-tok-s", type=float, help="eager tokens/s (default: the "
                   "bench's 256 x 128 prefill)")
    p.add_argument("--kv-tb-s", type=float, help="read the cached tokens past the bench's "
                   "at this rate (TB/s; default: free)")
    p.add_argument("--fit-prefill-s", type=float, help="also fit the eager tokens/s to this "
                   "time to every first token and sweep again with it")
    p.add_argument("--trace-cost", type=int, metavar="ROUNDS", help="only measure the "
                   "trace's host cost per step (trace off and on, interleaved)")
    p.add_argument("--compare", metavar="TRACE", help="only compare a measured trace "
                   "(serving.py --trace) with the model, step by step, by kind")
    p.add_argument("--json-out")
    p.add_argument("--trace-out", help="prefix of the default cases' simulated traces")
    args = p.parse_args(argv)
    prof = profile(llama3_8b(), dtype="bfloat16")
    cost = H200(curve=tuple((int(b), float(m) / 1e3) for b, m in
                            (x.split(":") for x in args.decode_ms.split(","))))
    if args.prefill_tok_s:
        cost = replace(cost, token_s=1 / args.prefill_tok_s)
    if args.kv_tb_s:
        cost = replace(cost, kv_s=prof.kv_bytes_per_token / (args.kv_tb_s * 1e12))
    print("cost model:", json.dumps(asdict(cost)), flush=True)
    if args.compare:
        print(json.dumps(compare(args.compare, cost), indent=1))
        return 0
    for b, d, pf in BENCH:
        sd, sp = bench_figures(b, cost)
        print(f"  bench batch {b} as simulated: decode {1e3 * sd:.2f} ms/step (measured "
              f"{1e3 * d:.2f}), prefill {1e3 * sp:.0f} ms (measured {1e3 * pf:.0f})",
              flush=True)
    lens = workload(args.requests, args.prompt_min, args.prompt_max)
    print(f"workload: {len(lens)} prompts, {sum(lens)} prompt tokens, {args.new} new each",
          flush=True)
    if args.trace_cost:
        print(json.dumps(trace_cost(lens, args.new, cost, args.trace_cost)))
        return 0
    res = {"cost": asdict(cost), "prompt_tokens": sum(lens), "cases": []}
    sweep("bench", lens, args, cost, res)
    if args.fit_prefill_s:
        fit = fit_token_s(lens, args.new, cost, min(256, args.requests),
                          args.prompt_max + args.new, args.fit_prefill_s)
        res["fitted"] = asdict(fit)
        print(f"fitted: eager steps at {1 / fit.token_s:.0f} tokens/s "
              f"({1e6 * fit.token_s:.1f} us/token; the bench's {1 / cost.token_s:.0f}) give "
              f"{args.fit_prefill_s} s to every first token", flush=True)
        sweep("fitted", lens, args, fit, res)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
