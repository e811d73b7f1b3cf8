"""CPU benchmark on SmolLM2-135M (fp32): llamadist against Hugging Face transformers, and the
split model against the unsplit one, in the same run on the same machine.

    python benchmarks/cpu_smollm2.py [--gen 64] [--repeats 3] [--threads N]

Reports decode tokens/s (batch 1, greedy), the ratio to transformers, memory-bandwidth
utilisation against the read bandwidth (a sum) measured in the same run, load time of 1/2/4 stages
and decode time of 2 and 4 stages on one device against the unsplit model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llamadist.api import build_engine
from llamadist.config import RuntimeConfig
from llamadist.planning.layout import resolve_layout
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.weights.checkpoint import open_checkpoint, resolve_model_path

PROMPT = "The history of distributed computing begins with"


def read_bandwidth() -> float:
    """Bytes/s of a sum over 256 MiB, the machine's practical ceiling for a decode step,
    which reads its weights and writes almost nothing (a copy's read + write rate is
    lower on this kind of machine, so it would overstate utilisation)."""
    x = torch.randn(64 * 2**20)  # 256 MiB of float32: far beyond the caches
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.nbytes / min(times)


def time_ours(engine, ids: list[int], gen: int, repeats: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    rates, tokens = [], []
    for _ in range(repeats):
        res = generate(engine, None, [ids], params)[0]
        rates.append(res.stats["decode_tokens_per_s"])
        tokens = res.token_ids
    return statistics.median(rates), tokens


def time_hf(model, ids: list[int], gen: int, repeats: int) -> tuple[float, list[int]]:
    """Decode tokens/s of transformers' own generate(), prefill excluded (timed separately)."""
    x = torch.tensor([ids])
    rates, tokens = [], []
    for _ in range(repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
            t1 = time.perf_counter()
            out = model.generate(x, max_new_tokens=gen, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            t2 = time.perf_counter()
        rates.append((gen - 1) / ((t2 - t1) - (t1 - t0)))
        tokens = out[0, len(ids):].tolist()
    return statistics.median(rates), tokens


def load_engine(ckpt, devices: str, max_seq: int):
    t0 = time.perf_counter()
    layout = resolve_layout(ckpt.config, devices=devices, dtype="float32", max_batch=1,
                            max_seq_len=max_seq)
    eng = build_engine(ckpt, layout, RuntimeConfig(max_seq_len=max_seq, max_batch=1,
                                                   dtype="float32"))
    return eng, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = resolve_model_path("smollm2-135m")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), fp32, batch 1")
    bw = read_bandwidth()
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s")

    # Load from a converted safetensors folder too, the format most users have.
    from llamadist.weights.gguf import convert_gguf_to_hf
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert_gguf_to_hf(gguf, Path(tmp) / "smollm2", progress=False)
        ckpt = open_checkpoint(folder)
        tok = ckpt.tokenizer()
        ids = tok.encode(PROMPT)
        max_seq = len(ids) + args.gen + 8
        loads, decode = {}, {}
        load_engine(open_checkpoint(folder), "cpu", max_seq)  # warm the page cache first
        for n in (1, 2, 4):
            devs = ",".join(["cpu"] * n)
            times = []
            for _ in range(args.repeats):
                eng, t = load_engine(open_checkpoint(folder), devs, max_seq)
                times.append(t)
            loads[n] = statistics.median(times)
            decode[n], toks = time_ours(eng, ids, args.gen, args.repeats)
            if n == 1:
                ours_tokens, weight_bytes = toks, sum(
                    p.nbytes for s in eng.stages for p in s.model.parameters())
            assert toks == ours_tokens, f"{n} stages changed the greedy tokens"

        from transformers import AutoModelForCausalLM
        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        hf_load = time.perf_counter() - t0
        hf_rate, hf_tokens = time_hf(hf, ids, args.gen, args.repeats)

    step_bytes = weight_bytes  # per decode step every weight is read once (KV is tiny here)
    print("\n| system | decode tok/s | ms/token | MBU | load s |")
    print("| --- | --- | --- | --- | --- |")
    for name, rate, load in (("transformers (eager)", hf_rate, hf_load),
                             ("llamadist, 1 stage", decode[1], loads[1]),
                             ("llamadist, 2 stages", decode[2], loads[2]),
                             ("llamadist, 4 stages", decode[4], loads[4])):
        print(f"| {name} | {rate:.1f} | {1e3 / rate:.2f} | {step_bytes * rate / bw:.1%} | "
              f"{load:.2f} |")
    print(f"\nllamadist / transformers decode speed: {decode[1] / hf_rate:.2f}x "
          f"(greedy tokens identical: {hf_tokens == ours_tokens})")
    print(f"decode time, 2 stages / unsplit: {decode[1] / decode[2]:.3f}x; "
          f"4 stages / unsplit: {decode[1] / decode[4]:.3f}x")
    print(f"load time, 2 stages / unsplit: {loads[2] / loads[1]:.3f}x; "
          f"4 stages / unsplit: {loads[4] / loads[1]:.3f}x")


if __name__ == "__main__":
    main()
