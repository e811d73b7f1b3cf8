"""Context parallelism on the CPU: one long prompt through a small random Llama, one
process against `--nproc 2 --cp 2` (each rank holding half of the KV cache in stripes,
ring-attention prefill, sharded decode merged across the ranks).

    python benchmarks/context_cpu.py [--lengths 4096,8192,16384,32768] [--gen-len 16]
                                     [--threads 1] [--repeats 1] [--model DIR]

Prints one JSON line per (length, layout): prefill seconds and decode ms per token, the
medians over --repeats runs (each run a fresh process world). Layouts: one process with
--threads threads, --cp ranks with --threads each, and one process with cp x --threads
threads (the same cores as the CP world). The model (4 layers, hidden 256, 8 heads,
2 KV heads, 64k context, llama3 RoPE) is written once under --model (default a temp
dir). Each rank uses --threads threads (1: on a 2-core machine the two CP ranks then
use what one process with 2 threads would).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from statistics import median
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_model(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=65536, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def bench(model: Path, length: int, gen: int, threads: int, cp: int) -> dict:
    args = [sys.executable, "-m", "llamadist", "bench", str(model), "--batch", "1",
            "--prompt-len", str(length), "--gen-len", str(gen), "--json",
            "--max-batch-tokens", "4096", "--max-seq-len", str(length + gen + 1)]
    if cp > 1:
        args += ["--nproc", str(cp), "--cp", str(cp)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run(args, cwd=ROOT, env=env, text=True, capture_output=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"bench failed ({' '.join(args)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--model", type=Path)
    a = p.parse_args()
    model = make_model(a.model or Path(tempfile.gettempdir()) / "llamadist_cp_bench_model")
    layouts = [(1, a.threads), (a.cp, a.threads), (1, a.cp * a.threads)]
    for length in (int(x) for x in a.lengths.split(",")):
        for cp, threads in layouts:
            runs = [bench(model, length, a.gen_len, threads, cp) for _ in range(a.repeats)]
            print(json.dumps({"prompt_len": length, "cp": cp, "threads_per_rank": threads,
                              "repeats": a.repeats,
                              "prefill_s": round(median(r["prefill_s"] for r in runs), 3),
                              "decode_ms_per_token": round(
                                  median(r["decode_ms_per_step"] for r in runs), 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
