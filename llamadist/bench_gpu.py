"""``llamadist bench --shape NAME``: speed of a named Llama shape with random weights.

No checkpoint and no tokenizer: the model is built directly on its device(s) with
random weights (std 0.02, as Hugging Face initialises), prompts are random token ids.
One run measures the two ceilings of the machine first (a large device-to-device copy,
a large bf16 matmul) and reports, per (implementation, stages, batch):
prefill time and MFU (FLOPs / time / measured matmul peak), decode ms per step,
tokens/s and MBU (bytes a step must read: weights + the KV cache up to the current
position / step time / measured copy bandwidth), and peak device memory.
``--compare hf`` runs transformers' LlamaForCausalLM on the same weights (the tensors
are shared, not copied). ``--load-compare`` writes a safetensors checkpoint of the
model and times loading it unsplit and as 2 stages.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from llamadist.config import ModelConfig, RuntimeConfig, named_shape
from llamadist.generation.generate import Generator
from llamadist.generation.sampling import SamplingParams
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.runtime.engine import Engine
from llamadist.runtime.kernel_passes import apply_kernel_passes
from llamadist.runtime.stage import Stage, parse_dtype
from llamadist.weights.loader import _retie, _set_param

log = logging.getLogger(__name__)
GiB = 1 << 30


def int_list(value: str | int | list[int]) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(x) for x in value]
    return [int(x) for x in str(value).split(",") if x.strip()]


def sync_all() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


# ---- ceilings -----------------------------------------------------------------------
def _median_time(fn, reps: int, device: torch.device) -> float:
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
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), 10, device)
    del src, dst
    return 2 * nbytes / t


def matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    t = _median_time(lambda: a @ b, 20, device)
    return 2 * n ** 3 / t


# ---- cost accounting --------------------------------------------------------------------
def layer_matmul_params(c: ModelConfig) -> int:
    return (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size)


def decode_step_bytes(c: ModelConfig, batch: int, context: float, elem: int) -> float:
    """Bytes one decode step must read: every decoder weight, the final norm and head,
    one embedding row per sequence, and the KV cache up to ``context`` positions."""
    weights = c.num_layers * (layer_matmul_params(c) + 2 * c.hidden_size)
    weights += c.hidden_size + c.vocab_size * c.hidden_size + batch * c.hidden_size
    kv = 2 * c.num_layers * batch * c.kv_size * context
    return (weights + kv) * elem


def prefill_flops(c: ModelConfig, batch: int, t: int) -> float:
    """Matmul FLOPs of a causal prefill of t tokens, head on the last token only."""
    proj = 2 * layer_matmul_params(c) * t
    attn = 2 * 2 * c.q_size * t * t / 2  # QK^T and PV, causal half
    return batch * (c.num_layers * (proj + attn) + 2 * c.vocab_size * c.hidden_size)


# ---- models with random weights ----------------------------------------------------------
def random_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 layers: range | None = None, has_embed: bool | None = None,
                 has_head: bool | None = None, seed: int = 0, std: float = 0.02) -> Llama:
    """A stage with random weights created directly on ``device`` (no host copy)."""
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
        _set_param(model, name, value)
    _retie(model)
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
    base, extra = divmod(n, k)
    out, s = [], 0
    for i in range(k):
        e = s + base + (1 if i < extra else 0)
        out.append(range(s, e))
        s = e
    return out


def make_engine(config: ModelConfig, full: Llama | None, ranges: list[range], devices: list[str],
                dtype: torch.dtype, batch: int, max_seq: int,
                runtime: RuntimeConfig | None = None) -> Engine:
    """An engine over random (or ``full``'s shared) weights, with the kernel passes that
    build_stage would apply for ``runtime`` (None: RuntimeConfig())."""
    runtime = runtime or RuntimeConfig()
    stages, n = [], len(ranges)
    full_dev = next(full.parameters()).device if full is not None else None
    for i, (r, d) in enumerate(zip(ranges, devices)):
        d = torch.device(d)
        if full_dev is not None and d == full_dev:
            m = share_model(full, r, i == 0, i == n - 1)
        else:
            m = fuse_projections(random_model(config, d, dtype, r, i == 0, i == n - 1, seed=i + 1))
        m.setup_rope(max_seq, d)
        apply_kernel_passes(m, d, runtime)
        stages.append(Stage(m, d, dtype, batch, max_seq, runtime=runtime))
    return Engine(config, stages, runtime=runtime)


# ---- our engine -----------------------------------------------------------------------------
def time_prefill(forward, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync_all()
        t0 = time.perf_counter()
        forward()
        sync_all()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_ours(engine: Engine, prompts: torch.Tensor, gen_len: int, prefill_reps: int,
             timed_stats: bool = False) -> dict:
    b, t = prompts.shape
    ids = prompts.tolist()
    dev0 = engine.stages[0].device
    t0 = time.perf_counter()
    for _ in Generator(engine, None, SamplingParams(max_new_tokens=3, ignore_eos=True)).stream(ids):
        pass  # warm-up: prefill kernels, decode graph capture (and compilation)
    warm_s = time.perf_counter() - t0
    tok, pos = prompts.to(dev0), torch.arange(t, device=dev0).expand(b, t)
    prefill_s = time_prefill(lambda: engine.forward(tok, pos, 0, None), prefill_reps)
    for d in {s.device for s in engine.stages if s.device.type == "cuda"}:
        torch.cuda.reset_peak_memory_stats(d)
    gen = Generator(engine, None, SamplingParams(max_new_tokens=gen_len, ignore_eos=True))
    for _ in gen.stream(ids):
        pass
    st = gen.stats
    out = dict(prefill_s=prefill_s, gen_prefill_s=st.prefill_s,
               decode_ms=1e3 * st.decode_s / max(1, st.decode_steps), warm_s=warm_s,
               peak_bytes=sum(torch.cuda.max_memory_allocated(d) for d in
                              {s.device for s in engine.stages if s.device.type == "cuda"}),
               tokens=gen.sequences[0].token_ids)
    if engine._graphs is not None:
        out["graph_prepare_s"] = engine._graphs.prepare_s
    if timed_stats:
        engine.timed = True
        for s in engine.stages:
            s.stats.compute_s = s.stats.transfer_s = 0.0
            s.stats.calls = s.stats.bytes_in = 0
        g2 = Generator(engine, None, SamplingParams(max_new_tokens=min(gen_len, 16),
                                                      ignore_eos=True))
        t0 = time.perf_counter()
        for _ in g2.stream(ids):
            pass
        out["timed_wall_s"] = time.perf_counter() - t0
        out["stage_stats"] = engine.stage_stats()
        engine.timed = False
    return out


# ---- transformers on the same weights ---------------------------------------------------------
def hf_model(full: Llama, config: ModelConfig, device: torch.device):
    """transformers' LlamaForCausalLM sharing ``full``'s (unfused) tensors."""
    import transformers
    d = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "torch_dtype")}
    cfg = transformers.LlamaConfig(**d)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    sd = {k: v for k, v in full.state_dict().items()}
    hf.load_state_dict(sd, strict=False, assign=True)
    rot = hf.model.rotary_emb
    try:  # the inverse frequencies are a non-persistent buffer: rebuild it off meta
        hf.model.rotary_emb = type(rot)(config=hf.config, device=device)
    except TypeError:  # transformers versions without the device argument
        hf.model.rotary_emb = type(rot)(config=hf.config).to(device)
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    left = [n for n, p in list(hf.named_parameters()) + list(hf.named_buffers()) if p.is_meta]
    if left:
        raise RuntimeError(f"transformers model has tensors left on meta: {left[:4]}")
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.eval()


def run_hf(hf, prompts: torch.Tensor, gen_len: int, **kw) -> dict:
    ids = prompts.to(hf.device)
    attn = torch.ones_like(ids)

    @torch.inference_mode()
    def gen(n: int):
        sync_all()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, **kw)
        sync_all()
        return out, time.perf_counter() - t0

    gen(2)  # warm-up
    torch.cuda.reset_peak_memory_stats(hf.device) if hf.device.type == "cuda" else None
    _, t1 = gen(1)
    out, tn = gen(gen_len)
    return dict(prefill_s=t1, decode_ms=1e3 * (tn - t1) / max(1, gen_len - 1),
                peak_bytes=torch.cuda.max_memory_allocated(hf.device)
                if hf.device.type == "cuda" else 0,
                tokens=out[0, ids.shape[1]:].tolist())


# ---- loading a real checkpoint --------------------------------------------------------------
def write_checkpoint(model: Llama, config: ModelConfig, folder: Path,
                     shard_bytes: int = 4 * GiB) -> int:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    shard, size, n, total, weight_map = {}, 0, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shard[name] = t.detach().cpu().contiguous()
        size += t.nbytes
        total += t.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def time_load(folder: Path, k: int, device: str, dtype: torch.dtype) -> float:
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(folder)
    ranges = uniform_ranges(ckpt.config.num_layers, k)
    sync_all()
    t0 = time.perf_counter()
    stages = [build_stage(ckpt, r, device, dtype, 1, 256, has_embed=i == 0, has_head=i == k - 1)
              for i, r in enumerate(ranges)]
    sync_all()
    dt = time.perf_counter() - t0
    del stages
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dt


def load_compare(full: Llama, config: ModelConfig, device: str, dtype: torch.dtype,
                 repeats: int, where: str | None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="llamadist-ckpt-", dir=where))
    try:
        t0 = time.perf_counter()
        nbytes = write_checkpoint(full, config, folder)
        write_s = time.perf_counter() - t0
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for k in (1, 2):
                times[k].append(time_load(folder, k, device, dtype))
        return dict(checkpoint_bytes=nbytes, write_s=write_s, unsplit_s=times[1],
                    split2_s=times[2],
                    ratio=statistics.median(times[2]) / statistics.median(times[1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the command --------------------------------------------------------------------------------
def _row(impl: str, mode: str, stages: int, batch: int, r: dict, config: ModelConfig,
         prompt_len: int, gen_len: int, ceil: dict, elem: int) -> dict:
    step_s = r["decode_ms"] / 1e3
    ctx = prompt_len + gen_len / 2  # mean position over the decode steps
    row = dict(impl=impl, mode=mode, stages=stages, batch=batch,
               prefill_ms=1e3 * r["prefill_s"],
               prefill_mfu=prefill_flops(config, batch, prompt_len) / r["prefill_s"]
               / ceil["matmul_flops"],
               decode_ms=r["decode_ms"], tokens_per_s=batch / step_s,
               decode_mbu=decode_step_bytes(config, batch, ctx, elem) / step_s / ceil["copy_Bps"],
               peak_gib=r.get("peak_bytes", 0) / GiB)
    row.update({k: v for k, v in r.items() if k not in row and k not in ("prefill_s", "peak_bytes")})
    return row


def _layouts(args: argparse.Namespace, config: ModelConfig, dev: torch.device, batch: int,
             max_seq: int, dtype: str) -> list[tuple[list[range], list[str]]]:
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    if len(devices) > 1 or args.strategy or args.max_memory or args.boundaries:
        from llamadist.api import resolve_layout
        lay = resolve_layout(config, devices=args.devices, strategy=args.strategy,
                             max_memory=args.max_memory, device_speed=args.device_speed,
                             boundaries=args.boundaries, dtype=dtype, max_batch=batch,
                             max_seq_len=max_seq)
        return [(lay.layer_ranges, lay.devices)]
    return [(uniform_ranges(config.num_layers, k), [str(dev)] * k)
            for k in int_list(args.stages or "1")]


def _ceilings(dev: torch.device) -> dict:
    big = dev.type == "cuda"
    return dict(copy_Bps=copy_bandwidth(dev, 4 * GiB if big else 256 << 20),
                matmul_flops=matmul_peak(dev, 8192 if big else 1024))


def _fits(config: ModelConfig, dev: torch.device, elem: int) -> bool:
    if dev.type != "cuda":
        return True
    params = config.num_layers * (layer_matmul_params(config) + 2 * config.hidden_size)
    params += config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return params * elem < 0.8 * torch.cuda.mem_get_info(dev)[0]


def bench_shape_cmd(args: argparse.Namespace) -> int:
    config = named_shape(args.shape)
    first = (args.devices or "").split(",")[0].strip()
    dev = torch.device(first or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype_name = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    dtype = parse_dtype(dtype_name)
    elem = torch.empty(0, dtype=dtype).element_size()
    plen, glen = args.prompt_len, args.gen_len
    max_seq = args.max_seq_len or (plen + glen + 127) // 128 * 128
    modes = (args.graph_modes.split(",") if args.graph_modes else
             ["off"] if args.no_cuda_graphs else ["eager" if args.no_compile else "compiled"])
    res = dict(shape=args.shape, device=torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else "cpu", torch=torch.__version__, dtype=dtype_name, prompt_len=plen,
               gen_len=glen, max_seq_len=max_seq, rows=[], errors=[])

    def emit() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))

    res["ceilings"] = ceil = _ceilings(dev)
    print(f"# {res['device']}: copy {ceil['copy_Bps'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceil['matmul_flops'] / 1e12:.0f} TFLOP/s", file=sys.stderr)
    emit()
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, config.vocab_size, (b, plen), generator=gen)
               for b in int_list(args.batch)}
    full = random_model(config, dev, dtype) if _fits(config, dev, elem) else None
    if args.load_compare and full is not None:
        _attempt(res, "load", lambda: load_compare(full, config, str(dev), dtype,
                                                   args.load_repeats, args.checkpoint_dir))
        emit()
    if args.compare == "hf" and full is not None:
        _bench_hf(res, full, config, dev, prompts, args, ceil, elem)
        emit()
    if full is not None:
        if args.compare == "hf":
            _attempt(res, "fused_vs_unfused", lambda: fused_check(full, prompts, max_seq))
        else:
            fuse_projections(full)
    for b, p in prompts.items():
        for ranges, devices in _layouts(args, config, dev, b, max_seq, dtype_name):
            # The first mode runs on every layout, the others (for comparison) unsplit only.
            for mode in modes if len(ranges) == 1 else modes[:1]:
                _bench_ours(res, config, full, ranges, devices, dtype, b, max_seq, p, mode, args,
                            ceil, elem)
                emit()
    _compare_hf(res)
    emit()
    print(format_rows(res), file=sys.stdout)
    for r in res["rows"]:  # where the time goes, per stage (--stage-stats, CPU offload)
        for st in r.get("stage_stats", []):
            n = max(1, st["calls"])
            print(f"  B={r['batch']} stage {st['stage']} layers {st['layers'][0]}:"
                  f"{st['layers'][1]} on {st['device']}: compute {1e3 * st['compute_s'] / n:.2f} "
                  f"ms/call, transfer {1e3 * st['transfer_s'] / n:.3f} ms/call, "
                  f"{st['bytes_in'] / n:.0f} bytes in/call ({st['calls']} calls)")
    return 0


def _attempt(res: dict, what: str, fn):
    try:
        res[what] = fn()
        return res[what]
    except Exception as e:  # keep measuring the rest; report what broke
        log.exception("%s failed", what)
        res["errors"].append(f"{what}: {type(e).__name__}: {e}")
        return None
    finally:
        gc.collect()  # engines and their decode graphs reference each other
        sync_all()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def last_logits(full: Llama, ids: torch.Tensor, max_seq: int) -> torch.Tensor:
    """(B, V) float32 logits of the last prompt position through ``full`` directly."""
    from llamadist.runtime.kv_cache import KVCache
    dev = next(full.parameters()).device
    dtype = next(full.parameters()).dtype
    b, t = ids.shape
    full.setup_rope(max_seq, dev)
    cache = KVCache(full.config, full.layer_range, b, max(t, 1), dev, dtype)
    with torch.inference_mode():
        pos = torch.arange(t, device=dev).expand(b, t)
        return full(ids.to(dev), pos, cache, 0)[:, -1].float()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def fp32_logits(full: Llama, ids: torch.Tensor) -> torch.Tensor:
    """(B, V) last-position logits with every layer upcast to float32, one at a time:
    the reference that says how far bf16 results may differ from each other."""
    import copy
    import torch.nn.functional as F
    from llamadist.runtime.kv_cache import LayerCache
    dev = next(full.parameters()).device
    b, t = ids.shape
    with torch.inference_mode():
        h = full.model.embed_tokens(ids.to(dev)).float()
        cos, sin = full.rope.lookup(torch.arange(t, device=dev).expand(b, t), torch.float32)
        for layer in full.model.layers.values():
            l32 = copy.deepcopy(layer).float()
            kv = torch.zeros(b, full.config.num_kv_heads, t, full.config.head_dim, device=dev)
            h = l32(h, cos, sin, LayerCache(kv, kv.clone()), 0, None)
        norm = copy.deepcopy(full.model.norm).float()
        return F.linear(norm(h[:, -1]), full.lm_head.weight.float())


def fused_check(full: Llama, prompts: dict, max_seq: int) -> dict:
    """Fuse ``full`` in place; relative logits differences of the bf16 model unfused
    and fused against each other and against a float32 reference."""
    ids = next(iter(prompts.values()))[:1, :128]
    before = last_logits(full, ids, max_seq)
    ref = fp32_logits(full, ids)
    fuse_projections(full)
    after = last_logits(full, ids, max_seq)
    return dict(rel_diff=_rel(after, before), same_argmax=bool(
        (after.argmax(-1) == before.argmax(-1)).all()), unfused_vs_fp32=_rel(before, ref),
        fused_vs_fp32=_rel(after, ref), fp32_argmax_equals_fused=bool(
            (after.argmax(-1) == ref.argmax(-1)).all()))


def _bench_hf(res, full, config, dev, prompts, args, ceil, elem) -> None:
    hf = _attempt(res, "hf_model", lambda: hf_model(full, config, dev))
    if hf is None:
        return
    res.pop("hf_model", None)

    def logits_check() -> dict:
        ids = next(iter(prompts.values()))[:1, :128]
        ours = last_logits(full, ids, args.max_seq_len or 256)
        with torch.inference_mode():
            ref = hf(ids.to(dev)).logits[:, -1].float()
        return dict(rel_diff=_rel(ours, ref), same_argmax=bool(
            (ours.argmax(-1) == ref.argmax(-1)).all()), dtype=str(ours.dtype))

    _attempt(res, "logits_vs_hf", logits_check)
    hlen = min(args.gen_len, args.hf_gen_len)
    for i, (b, p) in enumerate(prompts.items()):
        variants = [("hf-eager", "dynamic-cache", {})]
        if i == 0:
            variants.append(("hf-eager", "static-cache",
                             dict(cache_implementation="static", disable_compile=True)))
        for impl, mode, kw in variants:
            r = _attempt(res, f"hf {mode} batch {b}", lambda: run_hf(hf, p, hlen, **kw))
            res.pop(f"hf {mode} batch {b}", None)
            if r is not None:
                res["rows"].append(_row(impl, mode, 1, b, r, config, args.prompt_len, hlen,
                                        ceil, elem))
    del hf


def _bench_ours(res, config, full, ranges, devices, dtype, b, max_seq, prompts, mode, args,
                ceil, elem) -> None:
    def run() -> dict:
        runtime = RuntimeConfig(cuda_graphs=mode != "off", compile=mode == "compiled")
        engine = make_engine(config, full, ranges, devices, dtype, b, max_seq, runtime)
        offload = len(set(devices)) > 1
        try:
            return run_ours(engine, prompts, args.gen_len, args.prefill_reps,
                            timed_stats=offload or args.stage_stats)
        finally:
            del engine

    key = f"ours {mode} stages {len(ranges)} batch {b}"
    r = _attempt(res, key, run)
    res.pop(key, None)
    if r is not None:
        row = _row("llamadist", mode, len(ranges), b, r, config, args.prompt_len, args.gen_len,
                   ceil, elem)
        row["layout"] = [f"{d}:{rg.start}-{rg.stop}" for rg, d in zip(ranges, devices)]
        res["rows"].append(row)
        print(format_rows(dict(rows=[row])).splitlines()[-1], file=sys.stderr)


def _compare_hf(res: dict) -> None:
    """Speed-up over transformers' eager decode at the same batch, and how many greedy
    tokens of sequence 0 agree (bf16 with random weights: near-ties diverge early)."""
    hf = {r["batch"]: r for r in res["rows"] if r["impl"] == "hf-eager"
          and r["mode"] == "dynamic-cache"}
    for r in res["rows"]:
        ref = hf.get(r["batch"])
        if r["impl"] == "llamadist" and ref is not None:
            r["speedup_vs_hf"] = ref["decode_ms"] / r["decode_ms"]
            a, b = r.get("tokens", []), ref.get("tokens", [])
            r["tokens_agree_with_hf"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                             min(len(a), len(b)))


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
