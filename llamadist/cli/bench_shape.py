"""``llamadist bench --shape NAME``: speed of a named Llama shape with random weights.

No checkpoint and no tokenizer: the model is built directly on its device(s) with random
weights (std 0.02, as Hugging Face initialises), prompts are random token ids. One run
measures the two ceilings of the device first (a large copy, a large matmul in the run's
dtype) and reports, per (graph mode, stages, batch): prefill time and MFU (FLOPs / time /
measured matmul peak), decode ms per step, tokens/s and MBU (bytes a step must read /
step time / measured copy bandwidth), and peak device memory. FLOPs and bytes come from
``llamadist.planning.profile``, the one cost model.

``--quantize int8|int4|fp8`` (or per device, as the run commands take it) builds the
decoder layers' linears quantized, one matrix at a time: each is drawn in the run's dtype
and quantized at once, so the float model is never whole in memory (Llama-3-70B in bf16,
140 GB, does not fit one H200; in int4 it does). The random stream is the one the float
build draws, so the quantized model is the float model quantized.

Runs on the CPU (``--devices cpu``) and on CUDA. Comparisons that are benchmark jobs rather
than a user command live in ``benchmarks/``: transformers on the same weights
(``hf_compare.py``), checkpoint loading unsplit vs split (``load_compare.py``) and a
kernel-level profile (``gpu_profile.py``); they reuse the pieces below.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from llamadist.config import (QUANTIZE_HEAD_ALONE, ConfigError, ModelConfig, RuntimeConfig,
                              named_shape, quantize_for)
from llamadist.generation.generate import Generator
from llamadist.generation.sampling import SamplingParams
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.planning.strategies import uniform_ends
from llamadist.kernels import wquant
from llamadist.planning.profile import (ModelProfile, decode_step_bytes, prefill_flops, profile,
                                        quantized_profile)
from llamadist.runtime.engine import Engine
from llamadist.runtime.kernel_passes import apply_kernel_passes
from llamadist.runtime.stage import Stage, parse_dtype
from llamadist.weights.loader import LAYER_LINEAR, _retie, _set_param, _untie_quantized

log = logging.getLogger(__name__)
GiB = 1 << 30


# ---- options ----------------------------------------------------------------------------
def int_list(value: str | int | list[int]) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(x) for x in value]
    return [int(x) for x in str(value).split(",") if x.strip()]


# decode paths of a --shape run: compiled layers, eager layers (both in CUDA graphs), compile
# where it pays (RuntimeConfig.compile None), no graphs
GRAPH_MODES = ("compiled", "eager", "auto", "off")


@dataclass
class ShapeOptions:
    """Every flag ``bench --shape`` reads (the argparse dest names), with its default."""
    shape: str = "smollm2-135m"
    devices: str | None = None          # first device runs unsplit layouts; default cuda:0 or cpu
    strategy: str | None = None         # with max_memory, device_speed, boundaries: a planned
    max_memory: str | None = None       # layout over several devices (planning.layout)
    device_speed: str | None = None
    boundaries: str | None = None
    dtype: str | None = None            # default bfloat16 on CUDA, float32 on CPU
    max_seq_len: int | None = None      # default prompt + gen rounded up to 128
    no_cuda_graphs: bool = False
    compile: bool | None = None         # --compile / --no-compile (None: where it pays)
    no_cpu_kernels: bool = False
    decode_attention: str = "split"
    eager_kernels: str | None = None    # --eager-kernels (None: RuntimeConfig's default)
    batch: list[int] = field(default_factory=lambda: [4])   # int or "1,8,32" or a list
    prompt_len: int = 64
    gen_len: int = 32
    stages: list[int] = field(default_factory=lambda: [1])  # uniform stages on one device
    graph_modes: list[str] | None = None  # of GRAPH_MODES
    prefill_reps: int = 3
    stage_stats: bool = False
    json_out: str | None = None
    quantize: str | None = None         # decoder linears built quantized (--quantize)
    quantize_head: bool = False         # the head too (--quantize-head)
    wquant: str | None = None           # the product of GPU-quantized weights (--wquant)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ShapeOptions":
        given = {f.name: getattr(args, f.name) for f in fields(cls)
                 if getattr(args, f.name, None) is not None}
        opts = cls(**given)
        opts.batch = int_list(opts.batch)
        opts.stages = int_list(opts.stages)
        if isinstance(opts.graph_modes, str):
            opts.graph_modes = [m.strip() for m in opts.graph_modes.split(",") if m.strip()]
        for name in ("prompt_len", "gen_len", "prefill_reps"):
            if getattr(opts, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(opts, name)}")
        if not opts.batch or min(opts.batch) < 1 or not opts.stages or min(opts.stages) < 1:
            raise ValueError(f"--batch {opts.batch} and --stages {opts.stages}: give positive "
                             f"numbers, e.g. --batch 1,8 --stages 1,2")
        return opts


def device_list(devices: str | None) -> list[str]:
    return [d.strip() for d in (devices or "").split(",") if d.strip()]


def check_device(name: str) -> torch.device:
    """``name`` as a torch device this machine has, or a ValueError that says the fix."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--devices {name}: unknown device; use cpu or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"--devices {name}: bench --shape runs on cpu or cuda:N only")
    if not torch.cuda.is_available():
        raise ValueError(f"--devices {name}: CUDA is not available on this machine "
                         f"(torch {torch.__version__} sees no GPU); use --devices cpu")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ValueError(f"--devices {name}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}; pick one of them or use --devices cpu")
    return torch.device("cuda", index)


def sync_all() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


# ---- ceilings -----------------------------------------------------------------------------
def _median_time(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large copy on ``device``, counting bytes read plus written."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), 10, device)
    return 2 * nbytes / t


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` on random data."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = _median_time(lambda: a @ b, 20 if device.type == "cuda" else 5, device)
    return 2 * n ** 3 / t


def ceilings(dev: torch.device, dtype: torch.dtype) -> dict:
    """The device's measured copy bandwidth and matmul rate (smaller probes on the CPU)."""
    big = dev.type == "cuda"
    return dict(copy_Bps=copy_bandwidth(dev, 4 * GiB if big else 64 << 20),
                matmul_flops=matmul_peak(dev, 8192 if big else 512, dtype),
                matmul_dtype=str(dtype).removeprefix("torch."))


# ---- models with random weights -------------------------------------------------------------
def quantize_weight(w: torch.Tensor, fmt: str, dtype: torch.dtype, name: str = "weight"):
    """A float linear weight in ``fmt`` as a stage on w's device holds it (what the loader
    makes of --quantize): GGUF Q8_0 / Q4_1 blocks on the CPU, a PackedWeight on a GPU."""
    if w.device.type == "cpu":
        return wquant.to_gguf_blocks(w, fmt, dtype, name)
    return wquant.quantize(w, fmt)


def random_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 layers: range | None = None, has_embed: bool | None = None,
                 has_head: bool | None = None, seed: int = 0, std: float = 0.02,
                 quantize: str | None = None, quantize_head: bool = False) -> Llama:
    """A stage with random weights created directly on ``device`` (no host copy).
    ``quantize``: each decoder linear (``quantize_head``: and the head, a tied one as its
    own copy) is quantized as soon as it is drawn (peak memory: the quantized model plus
    one float matrix); the random stream is the float build's."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Llama(config, layers, has_embed=has_embed, has_head=has_head)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        value = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("bias"):
            value.zero_()
        elif p.dim() == 1:
            value.fill_(1.0)  # RMSNorm scales
        else:
            value.normal_(0.0, std, generator=gen)
            if quantize is not None and (LAYER_LINEAR.search(name) or quantize_head
                                         and name == "lm_head.weight"):
                value = quantize_weight(value, quantize, dtype, name)
        _set_param(model, name, value)
        del value
    _retie(model)
    if quantize is not None and quantize_head:
        _untie_quantized(model, quantize, device, dtype)
    return model.eval()


def share_model(full: Llama, layers: range, has_embed: bool, has_head: bool) -> Llama:
    """A stage that shares ``full``'s modules for its layers (no new weight memory)."""
    with torch.device("meta"):
        m = Llama(full.config, layers, has_embed=has_embed, has_head=has_head)
    m.model.layers = nn.ModuleDict({str(i): full.model.layers[str(i)] for i in layers})
    if has_embed:
        m.model.embed_tokens = full.model.embed_tokens
    if has_head:
        m.model.norm = full.model.norm
        m.lm_head = full.lm_head
    return m.eval()


def uniform_ranges(n: int, k: int) -> list[range]:
    """n layers in k near-equal stages: the planner's uniform split."""
    ends = uniform_ends(n, k)
    return [range(s, e) for s, e in zip([0, *ends], ends)]


def _indexed(d: torch.device) -> torch.device:
    """"cuda" as the device its tensors report ("cuda:N", N the current device), so that a
    stage on "cuda" is recognised as the one ``full`` lives on."""
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def make_engine(config: ModelConfig, full: Llama | None, ranges: list[range], devices: list[str],
                dtype: torch.dtype, batch: int, max_seq: int,
                runtime: RuntimeConfig | None = None) -> Engine:
    """One stage per (range, device): stages on ``full``'s device share its (fused) modules,
    stages elsewhere get their own random weights; the kernel passes build_stage would apply
    for ``runtime`` (None: RuntimeConfig())."""
    runtime = runtime or RuntimeConfig()
    stages, n = [], len(ranges)
    full_dev = next(full.parameters()).device if full is not None else None
    for i, (r, d) in enumerate(zip(ranges, devices)):
        d = _indexed(torch.device(d))
        if full_dev is not None and d == full_dev:
            m = share_model(full, r, i == 0, i == n - 1)
        else:
            m = fuse_projections(random_model(config, d, dtype, r, i == 0, i == n - 1, seed=i + 1,
                                              quantize=runtime.quantize_for(str(d)),
                                              quantize_head=runtime.quantize_head))
        m.setup_rope(max_seq, d)
        apply_kernel_passes(m, d, runtime, dtype)
        stages.append(Stage(m, d, dtype, batch, max_seq, runtime=runtime))
    return Engine(config, stages, runtime=runtime)


def fits(prof: ModelProfile, dev: torch.device) -> bool:
    """Whether the whole model fits on ``dev`` (CUDA: 80% of free memory; CPU: assumed)."""
    if dev.type != "cuda":
        return True
    return prof.total_weight_bytes < 0.8 * torch.cuda.mem_get_info(dev)[0]


# ---- timing our engine ---------------------------------------------------------------------
def time_prefill(forward: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        sync_all()
        t0 = time.perf_counter()
        forward()
        sync_all()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _generate(engine: Engine, ids: list[list[int]], n: int) -> Generator:
    gen = Generator(engine, None, SamplingParams(max_new_tokens=n, ignore_eos=True))
    for _ in gen.stream(ids):
        pass
    return gen


def _cuda_devices(engine: Engine) -> set[torch.device]:
    return {s.device for s in engine.stages if s.device.type == "cuda"}


def run_ours(engine: Engine, prompts: torch.Tensor, gen_len: int, prefill_reps: int,
             timed_stats: bool = False) -> dict:
    """Warm up, time ``prefill_reps`` prefills of ``prompts`` (B, T), then generate
    ``gen_len`` tokens per sequence: seconds per prefill and ms per decode step."""
    b, t = prompts.shape
    ids = prompts.tolist()
    dev0 = engine.stages[0].device
    t0 = time.perf_counter()
    _generate(engine, ids, 3)  # warm-up: prefill kernels, decode graph capture (and compile)
    warm_s = time.perf_counter() - t0
    tok, pos = prompts.to(dev0), torch.arange(t, device=dev0).expand(b, t)
    prefill_s = time_prefill(lambda: engine.forward(tok, pos, 0, None), prefill_reps)
    for d in _cuda_devices(engine):
        torch.cuda.reset_peak_memory_stats(d)
    gen = _generate(engine, ids, gen_len)
    st = gen.stats
    out = dict(prefill_s=prefill_s, gen_prefill_s=st.prefill_s,
               decode_ms=1e3 * st.decode_s / max(1, st.decode_steps),
               decode_steps=st.decode_steps, warm_s=warm_s,
               peak_bytes=sum(torch.cuda.max_memory_allocated(d) for d in _cuda_devices(engine)),
               tokens=gen.sequences[0].token_ids)
    if engine._graphs is not None:
        out["graph_prepare_s"] = engine._graphs.prepare_s
    if timed_stats:
        out.update(timed_stage_run(engine, ids, min(gen_len, 16)))
    return out


def timed_stage_run(engine: Engine, ids: list[list[int]], n: int) -> dict:
    """A second generation with every stage timed on its device (CUDA events, read at the
    end: runtime.work_timer): where the time goes per stage. The same engine in a
    measurement mode (not a run-time setting): timing switched on for this run only, so
    both runs share the weights and the captured graphs."""
    engine.timed = True
    for s in engine.stages:
        s.stats.compute_s = s.stats.transfer_s = 0.0
        s.stats.calls = s.stats.bytes_in = 0
    t0 = time.perf_counter()
    try:
        _generate(engine, ids, n)
    finally:
        engine.timed = False
    stats = engine.stage_stats(settle=True)
    return dict(timed_wall_s=time.perf_counter() - t0, stage_stats=stats)


# ---- rows -------------------------------------------------------------------------------------
def make_row(impl: str, mode: str, stages: int, batch: int, r: dict, prof: ModelProfile,
             prompt_len: int, gen_len: int, ceil: dict) -> dict:
    """One reported row: measured times in ``r`` against the profile's FLOPs and bytes."""
    step_s = r["decode_ms"] / 1e3
    ctx = prompt_len + gen_len / 2  # mean cached positions over the decode steps
    flops = prefill_flops(prof, batch, prompt_len)
    step_bytes = decode_step_bytes(prof, batch, ctx)
    row = dict(impl=impl, mode=mode, stages=stages, batch=batch,
               prefill_ms=1e3 * r["prefill_s"], prefill_flops=flops,
               prefill_mfu=flops / r["prefill_s"] / ceil["matmul_flops"],
               decode_ms=r["decode_ms"], tokens_per_s=batch / step_s,
               decode_context=ctx, decode_bytes_per_step=step_bytes,
               decode_mbu=step_bytes / step_s / ceil["copy_Bps"],
               peak_gib=r.get("peak_bytes", 0) / GiB)
    row.update({k: v for k, v in r.items() if k not in row and k not in ("prefill_s", "peak_bytes")})
    return row


def format_rows(res: dict) -> str:
    head = (f"{'impl':<10} {'mode':<14} {'st':>2} {'B':>3} {'prefill ms':>10} {'MFU':>5} "
            f"{'ms/step':>8} {'tok/s':>8} {'MBU':>5} {'peak GiB':>8} {'vs HF':>6}")
    lines = [head]
    for r in res["rows"]:
        vs = f"{r['speedup_vs_hf']:.1f}x" if "speedup_vs_hf" in r else ""
        lines.append(f"{r['impl']:<10} {r['mode']:<14} {r['stages']:>2} {r['batch']:>3} "
                     f"{r['prefill_ms']:>10.1f} {r['prefill_mfu']:>5.0%} {r['decode_ms']:>8.2f} "
                     f"{r['tokens_per_s']:>8.0f} {r['decode_mbu']:>5.0%} {r['peak_gib']:>8.1f} "
                     f"{vs:>6}")
    return "\n".join(lines)


def format_stage_stats(rows: list[dict]) -> str:
    """Where the time goes, per stage, for rows with a timed stage run."""
    lines = []
    for r in rows:
        for st in r.get("stage_stats", []):
            n = max(1, st["calls"])
            lines.append(f"  B={r['batch']} stage {st['stage']} layers {st['layers'][0]}:"
                         f"{st['layers'][1]} on {st['device']}: compute "
                         f"{1e3 * st['compute_s'] / n:.2f} ms/call, transfer "
                         f"{1e3 * st['transfer_s'] / n:.3f} ms/call, "
                         f"{st['bytes_in'] / n:.0f} bytes in/call ({st['calls']} calls)")
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class ShapeRun:
    """What every measurement of one invocation shares (resolved once from the options)."""
    opts: ShapeOptions
    config: ModelConfig
    device: torch.device
    dtype_name: str
    dtype: torch.dtype
    max_seq: int
    prof: ModelProfile
    modes: list[str]
    prompts: dict[int, torch.Tensor]   # batch -> (B, prompt_len) random token ids
    res: dict
    ceil: dict = field(default_factory=dict)

    def emit(self) -> None:
        if self.opts.json_out:
            Path(self.opts.json_out).write_text(json.dumps(self.res, indent=1, default=str))


def _graph_modes(opts: ShapeOptions, devices: list[torch.device]) -> list[str]:
    if opts.graph_modes:
        bad = [m for m in opts.graph_modes if m not in GRAPH_MODES]
        if bad:
            raise ValueError(f"--graph-modes {','.join(bad)}: choose from "
                             f"{', '.join(GRAPH_MODES)}")
        return opts.graph_modes
    if opts.no_cuda_graphs or all(d.type == "cpu" for d in devices):
        return ["off"]  # the CPU decodes without graphs (its C kernels are the fast path)
    return [{True: "compiled", False: "eager", None: "auto"}[opts.compile]]


def prepare(args: argparse.Namespace) -> ShapeRun:
    """Options checked (shape, devices, lengths) before any tensor is made."""
    opts = ShapeOptions.from_args(args)
    config = named_shape(opts.shape)
    names = device_list(opts.devices) or ["cuda:0" if torch.cuda.is_available() else "cpu"]
    devices = [check_device(n) for n in names]
    dev = devices[0]
    dtype_name = opts.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    fmts = {quantize_for(opts.quantize, str(d)) for d in devices}  # refuses fp8 on a CPU
    if opts.quantize_head and not opts.quantize:
        raise ConfigError(QUANTIZE_HEAD_ALONE)
    plen, glen = opts.prompt_len, opts.gen_len
    max_seq = opts.max_seq_len or (plen + glen + 127) // 128 * 128
    if max_seq < plen + glen:
        raise ValueError(f"--max-seq-len {max_seq} is below --prompt-len {plen} + --gen-len "
                         f"{glen}; raise it to at least {plen + glen}")
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, config.vocab_size, (b, plen), generator=gen)
               for b in opts.batch}
    res = dict(shape=opts.shape, device=torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else "cpu", torch=torch.__version__, dtype=dtype_name, prompt_len=plen,
               gen_len=glen, max_seq_len=max_seq, rows=[], errors=[], quantize=opts.quantize)
    prof = profile(config, dtype=dtype_name, seq_len=max_seq)
    if len(fmts) > 1:
        raise ValueError(f"--quantize {opts.quantize}: bench --shape costs one format for "
                         f"every device; give one format")
    # bytes a step reads (MBU) and whether the model fits: the quantized weights'
    prof = quantized_profile(prof, fmts.pop(), sorted({d.type for d in devices}),
                             head=opts.quantize_head)
    return ShapeRun(opts, config, dev, dtype_name, parse_dtype(dtype_name), max_seq, prof,
                    _graph_modes(opts, devices), prompts, res)


def layouts(run: ShapeRun, batch: int) -> list[tuple[list[range], list[str]]]:
    """(layer ranges, devices) to time: a planned layout over several devices, or
    ``--stages`` uniform stages on the one device."""
    o = run.opts
    if len(device_list(o.devices)) > 1 or o.strategy or o.max_memory or o.boundaries:
        from llamadist.planning.layout import resolve_layout
        lay = resolve_layout(run.config, devices=o.devices, strategy=o.strategy,
                             max_memory=o.max_memory, device_speed=o.device_speed,
                             boundaries=o.boundaries, dtype=run.dtype_name, max_batch=batch,
                             max_seq_len=run.max_seq, quantize=o.quantize,
                             quantize_head=o.quantize_head)
        return [(list(lay.layer_ranges), list(lay.devices))]
    return [(uniform_ranges(run.config.num_layers, k), [str(run.device)] * k)
            for k in o.stages]


def attempt(res: dict, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with the error recorded in ``res["errors"]`` (keep measuring)."""
    try:
        return fn()
    except Exception as e:
        log.exception("%s failed", what)
        res["errors"].append(f"{what}: {type(e).__name__}: {e}")
        return None
    finally:
        gc.collect()  # engines and their decode graphs reference each other
        sync_all()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def shape_runtime(o: ShapeOptions, mode: str) -> RuntimeConfig:
    """The RuntimeConfig of one graph mode of a --shape run (its kernels and formats)."""
    given = {k: v for k, v in (("quantize", o.quantize), ("wquant", o.wquant),
                                ("eager_kernels", o.eager_kernels),
                                ("quantize_head", o.quantize_head)) if v}
    compile = {"compiled": True, "auto": None}.get(mode, False)
    return RuntimeConfig(cuda_graphs=mode != "off", compile=compile,
                         cpu_kernels=not o.no_cpu_kernels, decode_attention=o.decode_attention,
                         **given)


def bench_layout(run: ShapeRun, full: Llama | None, ranges: list[range], devices: list[str],
                 batch: int, mode: str) -> dict | None:
    """Time one (layout, batch, graph mode); append and return its row (None if it failed)."""
    o = run.opts

    def measure() -> dict:
        runtime = shape_runtime(o, mode)
        engine = make_engine(run.config, full, ranges, devices, run.dtype, batch, run.max_seq,
                             runtime)
        try:
            return run_ours(engine, run.prompts[batch], o.gen_len, o.prefill_reps,
                            timed_stats=len(set(devices)) > 1 or o.stage_stats)
        finally:
            del engine

    r = attempt(run.res, f"ours {mode} stages {len(ranges)} batch {batch}", measure)
    if r is None:
        return None
    row = make_row("llamadist", mode, len(ranges), batch, r, run.prof, o.prompt_len, o.gen_len,
                   run.ceil)
    row["layout"] = [f"{d}:{rg.start}-{rg.stop}" for rg, d in zip(ranges, devices)]
    run.res["rows"].append(row)
    return row


def bench_all(run: ShapeRun, full: Llama | None) -> None:
    """Every batch x layout; the first graph mode on every layout, the others (for
    comparison) on unsplit layouts only."""
    for b in run.opts.batch:
        for ranges, devices in layouts(run, b):
            for mode in run.modes if len(ranges) == 1 else run.modes[:1]:
                row = bench_layout(run, full, ranges, devices, b, mode)
                if row is not None:
                    print(format_rows(dict(rows=[row])).splitlines()[-1], file=sys.stderr)
                run.emit()


def measure_ceilings(run: ShapeRun) -> None:
    run.res["ceilings"] = run.ceil = ceilings(run.device, run.dtype)
    print(f"# {run.res['device']}: copy {run.ceil['copy_Bps'] / 1e9:.1f} GB/s, "
          f"{run.ceil['matmul_dtype']} matmul {run.ceil['matmul_flops'] / 1e12:.2f} TFLOP/s",
          file=sys.stderr)
    run.emit()


def bench_shape_cmd(args: argparse.Namespace) -> int:
    """The ``bench --shape`` command: argparse namespace in (flags: ShapeOptions), exit
    code out. Prints one row per measurement; 1 if any measurement failed."""
    run = prepare(args)
    measure_ceilings(run)
    full = None
    if fits(run.prof, run.device):
        fmt = quantize_for(run.opts.quantize, str(run.device))
        full = fuse_projections(random_model(run.config, run.device, run.dtype, quantize=fmt,
                                             quantize_head=run.opts.quantize_head))
    bench_all(run, full)
    run.emit()
    print(format_rows(run.res))
    stats = format_stage_stats(run.res["rows"])
    if stats:
        print(stats)
    for e in run.res["errors"]:
        print(f"llamadist: error: {e}", file=sys.stderr)
    return 1 if run.res["errors"] else 0
