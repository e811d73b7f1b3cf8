"""Mixtral-8x7B-shaped bf16 random weights on one GPU, through the path users run: a
checkpoint folder on disk and `llamadist bench FOLDER --devices cuda:0`, then
transformers' MixtralForCausalLM on the same folder in the same run. One JSON line per
measurement on stdout (progress on stderr); the whole run aims at under ~8 minutes.

    PYTHONPATH=. python benchmarks/moe_gpu.py [--layers 16] [--dir /tmp/moe-bench]
        [--tokenizer-from .whl/smollm2-tok] [--copy-bw 4.2e12] [--peak-flops 790e12]
        [--skip-hf] [--budget-s 480]

Measurements:
  checkpoint   the folder written (bytes, seconds)
  copy_bw      device-to-device copy bandwidth measured here (read + write bytes / s)
  decode_b1    batch-1 decode ms/step through the engine (CUDA graphs) and its bandwidth
               use: bytes a step must read (attention + the 2 routed experts per layer +
               router + head + KV, planning.profile's decode_step_bytes) / step time /
               --copy-bw (the issue asks >= 70%)
  decode_b32   batch-32 decode tokens/s (and the same bandwidth use, experts touched by
               32 tokens counted by their expectation)
               Each decode line's expert_path says which experts' kernel its steps ran, by
               the rule the kernel pass installs (llamadist.kernels.moe_grouped.expert_path;
               the bench's one decode bucket has --batch rows): "routed" (the Triton GEMV
               over the routed experts' rows: batch 1-3 of 8 experts top-2), "grouped"
               (torch._grouped_mm over every expert) or "loop" (no grouped experts here)
  prefill_2048 one 2048-token prompt: seconds and MFU against --peak-flops (its experts:
               the grouped GEMM)
  routing      tokens routed per expert per layer seen in these runs: each layer's
               busiest expert over the mean, and the range of an expert's share
  hf_*         transformers (bf16, sdpa) on the same weights: decode ms/step at batch 1
               and 32, prefill 2048; ratio_* = ours / theirs in speed

Why --layers (default 16 of Mixtral's 32): the whole model is ~93 GB, more than a lent
machine's 64 GiB disk holds as a checkpoint folder; every ratio above (bandwidth use, MFU,
speed against transformers) is per layer and so the same at 32 layers, and ms/step or
tokens/s scale by 32 / layers (the head's share aside). Give --layers 32 where the disk
holds 94 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llamadist.config import ModelConfig, named_shape  # noqa: E402
from llamadist.planning.profile import decode_step_bytes, prefill_flops, profile  # noqa: E402

START = time.perf_counter()


def emit(measure: str, **fields) -> None:
    print(json.dumps({"measure": measure, **fields}), flush=True)


def log(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {text}", file=sys.stderr, flush=True)


def config_for(layers: int) -> ModelConfig:
    return replace(named_shape("mixtral-8x7b"), num_layers=layers, vocab_size=49152,
                   eos_token_ids=(2,), torch_dtype="bfloat16")


def write_folder(cfg: ModelConfig, folder: Path, tokenizer_from: Path) -> None:
    from load_compare import write_checkpoint

    from llamadist.cli.bench_shape import random_model
    if (folder / "config.json").is_file():
        log(f"reusing {folder}")
        return
    t0 = time.perf_counter()
    model = random_model(cfg, torch.device("cuda:0"), torch.bfloat16)
    total = write_checkpoint(model, cfg, folder)
    del model
    torch.cuda.empty_cache()
    for f in tokenizer_from.glob("*.json"):
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    emit("checkpoint", layers=cfg.num_layers, bytes=total,
         seconds=round(time.perf_counter() - t0, 1))


def copy_bandwidth() -> float:
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    emit("copy_bw", bytes_per_s=bw)
    return bw


def expert_path(cfg: ModelConfig, rows: int) -> str:
    """The experts' kernel of a step of ``rows`` tokens on cuda:0, by the rule
    kernel_passes.use_grouped_experts installs: moe_grouped.expert_path where the grouped
    experts serve (bf16 on a Hopper-or-newer GPU), else "loop"."""
    from llamadist.kernels import moe_grouped, moe_routed
    dev = torch.device("cuda:0")
    if not moe_grouped.available(dev, torch.bfloat16):
        return "loop"
    return moe_grouped.expert_path(rows, cfg.num_experts_per_tok, cfg.num_experts,
                                   moe_routed.usable(dev))


def bench(folder: Path, batch: int, prompt_len: int, gen_len: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "llamadist", "-v", "bench", str(folder), "--devices",
           "cuda:0", "--batch", str(batch), "--prompt-len", str(prompt_len), "--gen-len",
           str(gen_len), "--json"]
    log(" ".join(cmd[2:]))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"bench failed ({r.returncode}): {r.stderr[-3000:]}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    report["cuda_graphs"] = "without CUDA graphs" not in r.stderr
    return report


def routing(reports: list[dict]) -> dict:
    loads: dict[str, list[int]] = {}
    for rep in reports:
        for layer, counts in rep["stages"][0].get("expert_load", {}).items():
            loads[layer] = [a + b for a, b in zip(loads.get(layer, [0] * len(counts)), counts)]
    shares = [c / sum(v) for v in loads.values() for c in v if sum(v)]
    worst = {k: round(max(v) * len(v) / sum(v), 3) for k, v in loads.items() if sum(v)}
    return {"layers": len(loads), "share_min": min(shares), "share_max": max(shares),
            "uniform": 1 / len(next(iter(loads.values()))),
            "busiest_over_mean": max(worst.values()), "per_layer_busiest_over_mean": worst}


def hf_runs(folder: Path, prompt_len: int, gen_len: int) -> dict:
    """transformers on the same folder: decode ms/step (timed as the difference between
    gen_len and 1 new tokens, greedy) at batch 1 and 32, and one 2048-token prefill."""
    from transformers import MixtralForCausalLM
    t0 = time.perf_counter()
    try:  # straight onto the GPU (needs accelerate), else through host memory
        model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                   device_map="cuda:0")
    except (ImportError, ValueError):
        model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda:0")
    model.eval()
    log(f"transformers loaded in {time.perf_counter() - t0:.0f} s")
    gen = torch.Generator().manual_seed(0)
    out = {}

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t
    with torch.no_grad():
        for batch in (1, 32):
            ids = torch.randint(3, 49152, (batch, prompt_len), generator=gen).cuda()
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            short = timed(lambda: model.generate(ids, max_new_tokens=1, **kw))
            full = timed(lambda: model.generate(ids, max_new_tokens=gen_len, **kw))
            out[batch] = 1e3 * (full - short) / (gen_len - 1)
        ids = torch.randint(3, 49152, (1, 2048), generator=gen).cuda()
        out["prefill_s"] = timed(lambda: model(ids, logits_to_keep=1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dir", default="/tmp/llamadist-moe-bench")
    p.add_argument("--tokenizer-from", default=str(ROOT / ".whl" / "smollm2-tok"))
    p.add_argument("--copy-bw", type=float, default=4.2e12)
    p.add_argument("--peak-flops", type=float, default=790e12)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--budget-s", type=float, default=480)
    args = p.parse_args()
    cfg = config_for(args.layers)
    folder = Path(args.dir) / f"mixtral-8x7b-{args.layers}L-bf16"
    write_folder(cfg, folder, Path(args.tokenizer_from))
    copy_bandwidth()
    prof = profile(cfg, dtype="bfloat16")
    left = lambda: max(60.0, args.budget_s - (time.perf_counter() - START))  # noqa: E731
    reports, ours = [], {}
    for batch in (1, 32):
        rep = bench(folder, batch, args.prompt_len, args.gen_len, left())
        reports.append(rep)
        ms = rep["decode_ms_per_step"]
        context = args.prompt_len + args.gen_len / 2  # mean cached length over the decode
        need = decode_step_bytes(prof, batch, context)
        ours[batch] = ms
        emit(f"decode_b{batch}", layers=args.layers, ms_per_step=ms,
             tokens_per_s=rep["decode_tokens_per_s"], bytes_per_step=need,
             bandwidth_use=need / (ms / 1e3) / args.copy_bw, cuda_graphs=rep["cuda_graphs"],
             expert_path=expert_path(cfg, batch), load_s=rep["load_s"])
    rep = bench(folder, 1, 2048, 2, left())
    reports.append(rep)
    flops = prefill_flops(prof, 1, 2048)
    emit("prefill_2048", layers=args.layers, seconds=rep["prefill_s"], flops=flops,
         mfu=flops / rep["prefill_s"] / args.peak_flops, expert_path=expert_path(cfg, 2048))
    emit("routing", **routing(reports))
    if args.skip_hf:
        return 0
    try:
        hf = hf_runs(folder, args.prompt_len, args.gen_len)
    except Exception as e:  # noqa: BLE001 - report it, keep our measurements
        emit("hf_error", error=f"{type(e).__name__}: {e}"[:500])
        return 1
    for batch in (1, 32):
        emit(f"hf_decode_b{batch}", ms_per_step=hf[batch],
             ratio_speed=hf[batch] / ours[batch])
    emit("hf_prefill_2048", seconds=hf["prefill_s"],
         ratio_speed=hf["prefill_s"] / rep["prefill_s"])
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
