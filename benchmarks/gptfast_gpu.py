"""gpt-fast, the GPU peer the mission names, against llamadist on one checkpoint folder
(issue 16): batch-1 decode, ms per step, bf16 and weight-only int8 / int4.

gpt-fast (github.com/pytorch-labs/gpt-fast) is a few hundred lines of PyTorch whose decode
step is one ``torch.compile(mode="reduce-overhead")`` graph; its int8 is per-channel
(``F.linear`` of the int8 weight cast to bf16, times the scales) and its int4 is torch's
tinygemm (``_weight_int4pack_mm``, groups of 128). Bring its source (it is not on PyPI;
never vendored here): ``fetch github:pytorch-labs/gpt-fast`` and ``git archive`` its
``model.py generate.py quantize.py`` into a git-ignored folder such as ``.whl/gpt-fast``.

The checkpoint is loaded into gpt-fast's ``Transformer`` as its own
``scripts/convert_hf_checkpoint.py`` does (q and k rows permuted from Hugging Face's
half-split rotary layout into its interleaved one; q, k, v concatenated into ``wqkv``) and
quantized in memory by its ``WeightOnlyInt8QuantHandler`` / ``WeightOnlyInt4QuantHandler``,
head included (so llamadist runs with ``--quantize-head``). One change for torch >= 2.5:
``_convert_weight_to_int4pack`` now takes the 4-bit codes two to a uint8 (even input in the
high nibble) rather than as int32. gpt-fast's step is timed through its own
``decode_n_tokens`` loop and sampler (its CLI's defaults, temperature 0.8 and top-k 200);
llamadist's through ``llamadist bench`` (greedy) in a subprocess, as users run it. Each run
is its own process. Every gpt-fast row carries the largest relative error of its quantized
linears (the head and layer 0's) against their bf16 weights on random rows, so a wrong
packing cannot pass as fast.

    python benchmarks/gptfast_gpu.py CHECKPOINT --gpt-fast .whl/gpt-fast --device cuda:0 \\
        [--formats bf16,int8,int4] [--prompt-len 128] [--gen-len 64]
    python benchmarks/gptfast_gpu.py --check --gpt-fast .whl/gpt-fast [--device cpu]

``--check`` writes a tiny random Llama folder (grouped-query attention, Llama-3 rope
scaling) and compares gpt-fast's logits on it with transformers' (float32 on the CPU,
bf16 on a GPU): the loader's name mapping and permutation, checked before any timing.
One JSON line per result on stdout: each side's ms per step, GB/s of gpt-fast's weight
bytes a step (the embedding table left out) and that as a fraction of a measured
device-to-device copy's rate (read + write bytes per second, as wquant_sweep.py), and
llamadist's ms over gpt-fast's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quant_gpu import quant_flags, run_json  # noqa: E402
from wquant_sweep import copy_rate  # noqa: E402

GPT_FAST_FORMATS = ("bf16", "int8", "int4")


def import_gpt_fast(path: str):
    if not (Path(path) / "model.py").is_file():
        sys.exit(f"error: no gpt-fast source at {path} (model.py missing); fetch "
                 "github:pytorch-labs/gpt-fast and unpack model.py, generate.py and "
                 "quantize.py there")
    sys.path.insert(0, str(Path(path).resolve()))
    if "tokenizer" not in sys.modules:  # its tokenizers need tiktoken and sentencepiece;
        import types                    # the benchmark feeds token ids
        sys.modules["tokenizer"] = types.SimpleNamespace(get_tokenizer=None)
    import generate
    import model
    import quantize
    if not hasattr(torch.backends.cuda, "sdp_kernel"):  # removed from newer torch
        from contextlib import contextmanager

        from torch.nn.attention import SDPBackend, sdpa_kernel

        @contextmanager
        def sdp_kernel(enable_flash=True, enable_mem_efficient=True, enable_math=True):
            on = [b for b, e in ((SDPBackend.FLASH_ATTENTION, enable_flash),
                                 (SDPBackend.EFFICIENT_ATTENTION, enable_mem_efficient),
                                 (SDPBackend.MATH, enable_math)) if e]
            with sdpa_kernel(on):
                yield
        torch.backends.cuda.sdp_kernel = sdp_kernel
    quantize.prepare_int4_weight_and_scales_and_zeros = _int4_pack_uint8(quantize)
    return model, generate, quantize


def _int4_pack_uint8(quantize):
    def prepare(weight_bf16, groupsize, inner_k_tiles):
        codes, scales_and_zeros = quantize.group_quantize_tensor(weight_bf16, n_bit=4,
                                                                 groupsize=groupsize)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles), \
            scales_and_zeros
    return prepare


def load_gpt_fast(gf_model, folder: Path, device: str, dtype: torch.dtype):
    """The HF folder's weights in gpt-fast's Transformer, on ``device`` in ``dtype``."""
    from safetensors.torch import load_file
    from llamadist.config import ModelConfig
    cfg = ModelConfig.from_json_file(folder / "config.json")
    n_head, n_kv, dim, head_dim = (cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size,
                                   cfg.head_dim)
    if head_dim * n_head != dim or cfg.is_moe:
        sys.exit(f"error: gpt-fast's Llama needs head_dim = hidden_size / heads and no "
                 f"experts; the folder has head_dim {head_dim}, {cfg.architecture}")
    scaling = cfg.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        sys.exit(f"error: gpt-fast knows only Llama-3 rope scaling, not {scaling}")
    args = gf_model.ModelArgs(
        block_size=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
        n_layer=cfg.num_layers, n_head=n_head, n_local_heads=n_kv, dim=dim,
        intermediate_size=cfg.intermediate_size, rope_base=cfg.rope_theta,
        norm_eps=cfg.rms_norm_eps, rope_scaling=scaling)
    hf = {}
    for f in sorted(folder.glob("*.safetensors")):
        hf.update(load_file(str(f), device=device))

    def permute(w, heads):  # HF's rotate-half rows -> interleaved pairs
        return w.view(heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(heads * head_dim,
                                                                           dim)
    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"],
          "norm.weight": hf["model.norm.weight"],
          "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(args.n_layer):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[q + "attention.wqkv.weight"] = torch.cat([
            permute(hf[p + "self_attn.q_proj.weight"], n_head),
            permute(hf[p + "self_attn.k_proj.weight"], n_kv), hf[p + "self_attn.v_proj.weight"]])
        for ours, theirs in (("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj",
                             "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                             ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm",
                             "attention_norm"), ("post_attention_layernorm", "ffn_norm")):
            sd[f"{q}{theirs}.weight"] = hf.pop(p + ours + ".weight")
    del hf
    with torch.device("meta"):
        model = gf_model.Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return model.eval()


def quantized(gf_quantize, model, fmt: str, device: str):
    """gpt-fast's own in-memory quantization of every linear, the head included."""
    if fmt == "bf16":
        return model
    handler = (gf_quantize.WeightOnlyInt8QuantHandler(model) if fmt == "int8" else
               gf_quantize.WeightOnlyInt4QuantHandler(model, groupsize=128))
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # a line per linear
        sd = handler.create_quantized_state_dict()
    handler.convert_for_runtime()
    model.load_state_dict(sd, assign=True)
    return model.to(device)  # its int4 handler hands the packed weights back on the CPU


def linear_error(model, floats: dict, device: str) -> float:
    """The largest relative error (Frobenius) of a quantized linear's product on random
    rows against its float weight's, over ``floats`` (name -> weight): about 2^-8 for
    int8, 0.1 for int4 in groups of 128 on Gaussian weights, 1.4 for a wrong layout."""
    gen = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    for name, w in floats.items():
        x = torch.randn(4, w.shape[1], device=device, generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            got = model.get_submodule(name)(x).float()
        want = x.float() @ w.float().T
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    return worst


def weight_bytes(model) -> int:
    """The bytes a step reads for weights: everything but the embedding table."""
    return sum(t.numel() * t.element_size() for name, t in
               list(model.named_parameters()) + list(model.named_buffers())
               if not name.startswith("tok_embeddings") and "kv_cache" not in name)


def worker(args: argparse.Namespace) -> dict:
    """One gpt-fast format: load, quantize, compile its step, time ``decode_n_tokens``."""
    gf_model, gf_generate, gf_quantize = import_gpt_fast(args.gpt_fast)
    dev = args.device
    t0 = time.perf_counter()
    model = load_gpt_fast(gf_model, Path(args.checkpoint), dev, torch.bfloat16)
    names = ["output"] + [f"layers.0.{n}" for n in ("attention.wqkv", "attention.wo",
                                                     "feed_forward.w1", "feed_forward.w2",
                                                     "feed_forward.w3")]
    floats = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    model = quantized(gf_quantize, model, args.worker, dev)
    err = linear_error(model, floats, dev)
    load_s = time.perf_counter() - t0
    size = weight_bytes(model)
    P, G = args.prompt_len, args.gen_len
    with torch.device(dev):
        model.setup_caches(max_batch_size=1, max_seq_length=P + G)
    gf_generate.decode_one_token = torch.compile(gf_generate.decode_one_token,
                                                 mode="reduce-overhead", fullgraph=True)
    sampling = {"temperature": 0.8, "top_k": 200}
    prompt = torch.randint(0, 1024, (1, P), generator=torch.Generator().manual_seed(1)).to(dev)
    times, compile_s = [], None
    for rep in range(args.repeats + 1):
        with torch.no_grad():
            tok = gf_generate.prefill(model, prompt, torch.arange(P, device=dev), **sampling)
            pos = torch.tensor([P], device=dev, dtype=torch.int)
            torch.cuda.synchronize(dev) if dev.startswith("cuda") else None
            t = time.perf_counter()
            gf_generate.decode_n_tokens(model, tok.view(1, -1), pos, G - 1, **sampling)
            torch.cuda.synchronize(dev) if dev.startswith("cuda") else None
        dt = time.perf_counter() - t
        if rep == 0:
            compile_s = dt  # the first pass compiles and records the graphs
        else:
            times.append(dt / (G - 1))
    ms = 1e3 * min(times)
    return {"peer": "gpt-fast", "format": args.worker, "ms_per_step": ms,
            "ms_per_step_median": 1e3 * sorted(times)[len(times) // 2],
            "weight_bytes": size, "linear_rel_err": err, "load_s": load_s,
            "compile_s": compile_s}


def run_worker(args: argparse.Namespace, fmt: str) -> dict:
    cmd = [sys.executable, __file__, args.checkpoint, "--worker", fmt, "--gpt-fast",
           args.gpt_fast, "--device", args.device, "--prompt-len", str(args.prompt_len),
           "--gen-len", str(args.gen_len), "--repeats", str(args.repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
        return {"peer": "gpt-fast", "format": fmt, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def compare(args: argparse.Namespace) -> None:
    copy = copy_rate(torch, args.device, 4.0) if args.device.startswith("cuda") else None
    print(json.dumps({"copy_GBps": copy and copy / 1e9}), flush=True)
    for fmt in args.formats:
        peer = run_worker(args, fmt)
        ours = run_json(["bench", args.checkpoint, "--devices", args.device, "--batch", "1",
                         "--prompt-len", str(args.prompt_len), "--gen-len",
                         str(args.gen_len), "--json",
                         *quant_flags(fmt if fmt == "bf16" else fmt + "+head")],
                        timeout=args.timeout)
        row = {"format": fmt, "gpt_fast": peer}
        if "error" not in ours:
            row["llamadist"] = {"ms_per_step": ours["decode_ms_per_step"],
                                "weight_bytes": sum(s.get("weight_bytes", 0)
                                                    for s in ours["stages"])}
        else:
            row["llamadist"] = ours
        # both against the bytes gpt-fast's step reads (its weights less the embedding
        # table; llamadist's weight_bytes count what it loaded, the table included)
        for side in (row["gpt_fast"], row["llamadist"]):
            if "ms_per_step" in side and "weight_bytes" in peer and copy:
                side["GBps"] = peer["weight_bytes"] / side["ms_per_step"] * 1e3 / 1e9
                side["of_copy"] = side["GBps"] * 1e9 / copy  # copy: read + write B/s
        if "ms_per_step" in peer and "ms_per_step" in row["llamadist"]:
            row["ratio_llamadist_to_gpt_fast"] = (row["llamadist"]["ms_per_step"]
                                                  / peer["ms_per_step"])
        print(json.dumps(row), flush=True)


def check(args: argparse.Namespace) -> int:
    """gpt-fast's logits against transformers' on a tiny random folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    gf_model, _, _ = import_gpt_fast(args.gpt_fast)
    dev = args.device
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    hf = LlamaForCausalLM(config).to(dtype).eval()
    tokens = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        want = hf(tokens).logits[0].float()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_gpt_fast(gf_model, Path(d), dev, dtype)
    with torch.device(dev):
        model.setup_caches(max_batch_size=1, max_seq_length=tokens.shape[1])
    with torch.no_grad():
        got = model(tokens.to(dev), torch.arange(tokens.shape[1], device=dev))[0].float().cpu()
    err = ((got - want).abs().max() / want.abs().max()).item()
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    ok = err <= bound
    print(json.dumps({"check": "gpt-fast loader vs transformers", "dtype": str(dtype),
                      "max_rel_err": err, "bound": bound, "ok": ok}), flush=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="a Llama HF folder (safetensors)")
    ap.add_argument("--gpt-fast", default=".whl/gpt-fast", help="gpt-fast's source folder")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--formats", default="bf16,int8,int4",
                    type=lambda s: [f for f in s.split(",") if f])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--check", action="store_true", help=check.__doc__)
    ap.add_argument("--worker", choices=GPT_FAST_FORMATS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check:
        return check(args)
    if not args.checkpoint:
        ap.error("give a checkpoint folder (or --check)")
    bad = [f for f in args.formats if f not in GPT_FAST_FORMATS]
    if bad:
        ap.error(f"--formats: {bad} not among {', '.join(GPT_FAST_FORMATS)}")
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
