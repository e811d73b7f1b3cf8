"""SmolLM2-135M Q4_1 on the CPU: native quantized weights against the dequantized float32
model, in one run on one machine (issue 16).

    python benchmarks/quant_cpu.py [--gen 64] [--repeats 5] [--prompt-tokens 128]
                                   [--threads N] [--models F.gguf ...] [--llama-bench PATH]
                                   [--per-layer] [--configs NAME ...] [--only-models]
                                   [--engine]

Three engines from the same GGUF: ``--weights native`` with float32 activations (the
default: blocks dequantized in registers), native with ``--quant-activations int8``
(llama.cpp's scheme) and ``--weights float32`` (today's dequantize-at-load). Repeats are
interleaved (A B C A B C ...) so a noisy neighbour hurts all three alike; the table shows
the median and the best decode tokens/s (batch 1, greedy), prefill tokens/s of a
``--prompt-tokens`` prompt, the weight bytes a decode step reads and the rate it reads
them at. ``--models``: more GGUF files of the same model (other types, made with
llama.cpp's llama-quantize) in the same run. ``--llama-bench``: llama.cpp's llama-bench on
the same files, thread count, prompt and generation lengths, one repetition inside each
round of the interleaved repeats (not part of llamadist; build it yourself, see
RESULTS.md); its rows come last in the table (decode and prefill tokens/s).
``--per-layer``: each row once more with the decode step run as one C call per decoder
layer and the head on its own (the path before ``llamadist.kernels.cpu_step``), for a
before/after comparison in the same interleaved rounds. ``--configs``: only these of
the three ways (default all). ``--only-models``: leave the default Q4_1 file out. After the
table: every round's decode tokens/s and load average, and per file ours against llama.cpp
(the ratio of the medians and the median of the rounds' ratios). ``--engine``: ours
through the LLM API (``llamadist generate``'s path: the engine's scheduler, the paged KV
cache, a sampler per step, the text streamed to a callback) instead of the static
``generate()`` loop; decode tokens/s is then the tokens after the first over the time
since it (``engine.run_stats``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from llamadist.api import LLM, build_engine
from llamadist.config import RuntimeConfig
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.kernels.quant import QuantizedTensor
from llamadist.planning.layout import resolve_layout
from llamadist.weights.checkpoint import open_checkpoint, resolve_model_path

CONFIGS = {"native (float32 x)": dict(weights="native"),
           "native (int8 x)": dict(weights="native", quant_activations="int8"),
           "float32 (dequantized)": dict(weights="float32")}
TEXT = ("The history of distributed computing begins with time-sharing systems, in which many "
        "users shared one large machine, and continues through networks of workstations, ")


def weight_bytes(engine) -> int:
    """Bytes of distinct weights a decode step reads (a tied head counted once)."""
    seen: dict[int, int] = {}
    for stage in getattr(engine, "engine", engine).stages:  # an LLM: its stages
        for m in stage.model.modules():
            w = m.__dict__.get("weight", m._parameters.get("weight"))
            if isinstance(w, (torch.Tensor, QuantizedTensor)):
                seen[id(w)] = w.nbytes
    return sum(seen.values())


def load(ckpt, max_seq: int, api: bool = False, **runtime) -> tuple[object, float]:
    """(the stages, or with ``api`` an LLM over them, load seconds)."""
    t0 = time.perf_counter()
    layout = resolve_layout(ckpt.config, devices="cpu", dtype="float32", max_batch=1,
                            max_seq_len=max_seq)
    rt = RuntimeConfig(max_seq_len=max_seq, max_batch=1, dtype="float32", **runtime)
    eng = LLM(ckpt, layout=layout, runtime=rt) if api else build_engine(ckpt, layout, rt)
    return eng, time.perf_counter() - t0


def run_once(engine, ids: list[int], gen: int) -> tuple[float, float, list[int]]:
    """(decode tokens/s, prefill tokens/s, tokens) of one greedy generation."""
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    if isinstance(engine, LLM):  # as `llamadist generate` runs one prompt: text streamed
        reqs, s = engine.run([ids], params, lambda i, out: None)
        return s["decode_tokens_per_s"], s["prompt_tokens"] / s["prefill_s"], reqs[0].output_ids
    res = generate(engine, None, [ids], params)[0]
    s = res.stats
    return s["decode_tokens_per_s"], s["prompt_tokens"] / s["prefill_s"], res.token_ids


def llama_bench(path: str, model: str, threads: int, gen: int, prompt: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one llama-bench repetition on ``model``."""
    cmd = [path, "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1",
           "-o", "jsonl"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    tg = next(r["avg_ts"] for r in rows if r["n_gen"])
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"])
    return tg, pp


def engines_for(paths: list[str], max_seq: int, configs: list[str],
                per_layer: bool = False, api: bool = False) -> dict[str, tuple[object, float]]:
    """{row label: (engine, load seconds)}: the ``configs`` (keys of CONFIGS) for a file
    with block tensors, the file as stored (F16/F32: float32) otherwise; ``per_layer``:
    each also without the whole-step C call (``Stage.step_fn`` None)."""
    out = {}
    for path in paths:
        ckpt = open_checkpoint(path)
        quant_type = getattr(ckpt, "quant_type", lambda name: None)
        blocks = any(quant_type(n) is not None for n in ckpt.names())
        for name, rt in CONFIGS.items():
            if (blocks and name in configs) or (not blocks and name.startswith("float32")):
                label = f"{os.path.basename(path)}: {name if blocks else 'float32'}"
                out[label] = load(ckpt, max_seq, api, **rt)
                if per_layer:
                    eng, secs = load(ckpt, max_seq, api, **rt)
                    for stage in getattr(eng, "engine", eng).stages:
                        stage.step_fn = None
                    out[label + ", per-layer C calls"] = (eng, secs)
    return out


def report(results: dict, engines: dict, llama: dict, args: argparse.Namespace,
           n_prompt: int) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()}"
          f" threads), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{os.getloadavg()[0]:.1f}; batch 1, greedy, {args.gen} new tokens after a "
          f"{n_prompt}-token prompt, {args.repeats} interleaved repeats\n")
    print("| weights | decode tok/s median | best | prefill tok/s median | weight MB "
          "| GB/s at median | load s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    # ratios against the dequantized float32 model where it ran, else the first row
    base_label = next((k for k in results if k.endswith("float32 (dequantized)")),
                      next(iter(results)))
    base = statistics.median(r[0] for r in results[base_label])
    for name, runs in results.items():
        eng, load_s = engines[name]
        dec = statistics.median(r[0] for r in runs)
        mb = weight_bytes(eng) / 1e6
        print(f"| {name} | {dec:.1f} ({dec / base:.2f}x) | {max(r[0] for r in runs):.1f} | "
              f"{statistics.median(r[1] for r in runs):.0f} | {mb:.0f} | {mb * dec / 1e3:.1f} "
              f"| {load_s:.2f} |")
    for path, runs in llama.items():
        dec = statistics.median(r[0] for r in runs)
        print(f"| llama.cpp, {os.path.basename(path)} | {dec:.1f} ({dec / base:.2f}x) | "
              f"{max(r[0] for r in runs):.1f} | {statistics.median(r[1] for r in runs):.0f} | "
              f"| | |")
    ref = results[base_label][0][2]
    for name, runs in results.items():
        same = sum(a == b for a, b in zip(runs[0][2], ref))
        print(f"- {name}: {same}/{len(ref)} greedy tokens equal to {base_label}'s")
    print("\nEvery round's decode tokens/s (load average at the round's start):")
    for name, runs in results.items():
        print(f"- {name}: " + ", ".join(f"{r[0]:.1f}" for r in runs))
    for path, runs in llama.items():
        print(f"- llama.cpp, {os.path.basename(path)}: " + ", ".join(f"{r[0]:.1f}" for r in runs))
    print("- load average: " + ", ".join(f"{x:.1f}" for x in args.loads))
    for path, runs in llama.items():  # ours against llama.cpp on the same file
        ll = [r[0] for r in runs]
        for name, ours in results.items():
            if not name.startswith(os.path.basename(path) + ":"):
                continue
            mine = [r[0] for r in ours]
            per_round = [a / b for a, b in zip(mine, ll)]
            print(f"- {name} / llama.cpp: median {statistics.median(mine) / statistics.median(ll):.2f}x"
                  f" (median of the rounds' ratios {statistics.median(per_round):.2f}x; rounds "
                  + ", ".join(f"{x:.2f}" for x in per_round) + ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="*", help="GGUF files of SmolLM2 in other types (e.g. "
                   "Q8_0, F16 from llama-quantize); default: the Q4_1 file alone")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary")
    p.add_argument("--per-layer", action="store_true", help="each row also with one C call "
                   "per decoder layer (the path before the whole-step call)")
    p.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS),
                   help="which ways to run a quantized file (default all)")
    p.add_argument("--only-models", action="store_true", help="run the --models files only "
                   "(not the default Q4_1 file)")
    p.add_argument("--engine", action="store_true", help="ours through the LLM API's engine "
                   "(the path `llamadist generate` runs), not the static generate() loop")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [str(resolve_model_path("smollm2-135m"))] + (args.models or [])
    tok = open_checkpoint(paths[0]).tokenizer()
    ids = (tok.encode(TEXT * 20))[:args.prompt_tokens]
    if args.only_models and args.models:
        paths = paths[1:]
    engines = engines_for(paths, args.prompt_tokens + args.gen + 8, args.configs,
                          args.per_layer, args.engine)
    results: dict[str, list[tuple[float, float, list[int]]]] = {n: [] for n in engines}
    for name, (eng, _) in engines.items():  # warm-up: kernels built, caches touched
        run_once(eng, ids, 4)
    llama: dict[str, list[tuple[float, float]]] = {p: [] for p in paths} if args.llama_bench else {}
    args.loads = []
    for _ in range(args.repeats):  # interleaved, llama.cpp included: one noise for all
        args.loads.append(os.getloadavg()[0])
        for path in paths:  # each file's rows, then llama.cpp on that file
            for name, (eng, _) in engines.items():
                if name.startswith(os.path.basename(path) + ":"):
                    results[name].append(run_once(eng, ids, args.gen))
            if path in llama:
                llama[path].append(llama_bench(args.llama_bench, path, torch.get_num_threads(),
                                               args.gen, args.prompt_tokens))
    report(results, engines, llama, args, len(ids))


if __name__ == "__main__":
    main()
