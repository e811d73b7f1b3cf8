"""llamadist against transformers' LlamaForCausalLM on the same random weights of a named shape
(the tensors are shared, not copied): logits agreement, fused vs unfused projections against a
float32 reference, and decode speed side by side (the ``bench --shape`` rows plus transformers'
eager decode with a dynamic and a static cache). A benchmark job for a GPU; it runs on the CPU
too, slowly.

    PYTHONPATH=. python3 benchmarks/hf_compare.py --shape llama3-8b --batch 1,8,32 \
        --prompt-len 512 --gen-len 128 --stages 1,2,4 --graph-modes compiled,eager,off

The measuring pieces are llamadist/cli/bench_shape.py's; this script adds transformers.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from llamadist.cli.bench_shape import (ShapeRun, attempt, bench_all, format_rows,  # noqa: E402
                                       make_row, measure_ceilings, prepare, random_model,
                                       sync_all)
from llamadist.config import ModelConfig  # noqa: E402
from llamadist.model.fuse import fuse_projections  # noqa: E402
from llamadist.model.llama import Llama  # noqa: E402


def hf_model(full: Llama, config: ModelConfig, device: torch.device):
    """transformers' LlamaForCausalLM sharing ``full``'s (unfused) tensors."""
    import transformers
    d = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "torch_dtype")}
    cfg = transformers.LlamaConfig(**d)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(dict(full.state_dict()), strict=False, assign=True)
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
    """Seconds for one new token (prefill) and ms per further token of hf.generate."""
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
    cuda = hf.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(hf.device)
    _, t1 = gen(1)
    out, tn = gen(gen_len)
    return dict(prefill_s=t1, decode_ms=1e3 * (tn - t1) / max(1, gen_len - 1),
                peak_bytes=torch.cuda.max_memory_allocated(hf.device) if cuda else 0,
                tokens=out[0, ids.shape[1]:].tolist())


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


def fused_check(full: Llama, ids: torch.Tensor, max_seq: int) -> dict:
    """Fuse ``full`` in place; relative logits differences of the model unfused and fused
    against each other and against a float32 reference."""
    before = last_logits(full, ids, max_seq)
    ref = fp32_logits(full, ids)
    fuse_projections(full)
    after = last_logits(full, ids, max_seq)
    return dict(rel_diff=_rel(after, before), same_argmax=bool(
        (after.argmax(-1) == before.argmax(-1)).all()), unfused_vs_fp32=_rel(before, ref),
        fused_vs_fp32=_rel(after, ref), fp32_argmax_equals_fused=bool(
            (after.argmax(-1) == ref.argmax(-1)).all()))


def bench_hf(run: ShapeRun, full: Llama, hf_gen_len: int) -> None:
    """Logits of ours vs transformers, then transformers' decode speed per batch."""
    hf = attempt(run.res, "hf_model", lambda: hf_model(full, run.config, run.device))
    if hf is None:
        return
    ids = next(iter(run.prompts.values()))[:1, :128]

    def logits_check() -> dict:
        ours = last_logits(full, ids, run.max_seq)
        with torch.inference_mode():
            ref = hf(ids.to(run.device)).logits[:, -1].float()
        return dict(rel_diff=_rel(ours, ref), same_argmax=bool(
            (ours.argmax(-1) == ref.argmax(-1)).all()), dtype=str(ours.dtype))

    run.res["logits_vs_hf"] = attempt(run.res, "logits_vs_hf", logits_check)
    hlen = min(run.opts.gen_len, hf_gen_len)
    for i, (b, p) in enumerate(run.prompts.items()):
        variants = [("dynamic-cache", {})]
        if i == 0:
            variants.append(("static-cache", dict(cache_implementation="static",
                                                  disable_compile=True)))
        for mode, kw in variants:
            r = attempt(run.res, f"hf {mode} batch {b}", lambda: run_hf(hf, p, hlen, **kw))
            if r is not None:
                run.res["rows"].append(make_row("hf-eager", mode, 1, b, r, run.prof,
                                                run.opts.prompt_len, hlen, run.ceil))


def compare_hf(res: dict) -> None:
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--devices", help="one device (default cuda:0, or cpu without CUDA)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--hf-gen-len", type=int, default=32, help="tokens per transformers run")
    ap.add_argument("--stages", default="1")
    ap.add_argument("--graph-modes", help="compiled,eager,auto,off (default: auto on CUDA, "
                    "compiled where it pays)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    if args.devices and "," in args.devices:
        ap.error("--devices: one device (both models run on it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = prepare(args)
    measure_ceilings(run)
    full = random_model(run.config, run.device, run.dtype)  # unfused: transformers' layout
    bench_hf(run, full, args.hf_gen_len)
    run.emit()
    ids = next(iter(run.prompts.values()))[:1, :128]
    run.res["fused_vs_unfused"] = attempt(run.res, "fused_vs_unfused",
                                          lambda: fused_check(full, ids, run.max_seq))
    fuse_projections(full)  # a no-op when the check fused it already
    bench_all(run, full)
    compare_hf(run.res)
    run.emit()
    for k in ("logits_vs_hf", "fused_vs_unfused"):
        print(f"{k}: {run.res.get(k)}")
    print(format_rows(run.res))
    for e in run.res["errors"]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if run.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
