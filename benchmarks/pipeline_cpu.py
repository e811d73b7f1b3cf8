"""Pipeline over processes: a batch of prompts through 2 processes (the engine keeps one
step per stage in flight), against one process, in the same run on the same machine.

    python benchmarks/pipeline_cpu.py [--model smollm2-135m] [--batch 8] [--gen-len 32]
                                      [--max-batch 4,8] [--device cpu|cuda]
    python benchmarks/pipeline_cpu.py --random 512:8     # a random model, hidden 512, 8 layers

One process runs the in-process Engine with every core; each of the 2 pipeline processes
gets half of the cores (OMP_NUM_THREADS), so the comparison spends the same hardware.
Every run goes through `llamadist bench --json` (one warm-up, then the timed run); the
pipeline runs report each stage's busy time; the bubble is the idle share of the stages'
time over the whole run (prefill, decode, fill and drain).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama checkpoint (safetensors + the tiny test tokenizer), no transformers."""
    from safetensors.torch import save_file
    from tests.tiny import make_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    heads, kv, ffn = max(1, hidden // 64), max(1, hidden // 256), hidden * 8 // 3 // 64 * 64
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    d, hd = hidden, hidden // heads
    t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": torch.ones(d),
         "lm_head.weight": w(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(heads * hd, d), p + "self_attn.k_proj.weight":
              w(kv * hd, d), p + "self_attn.v_proj.weight": w(kv * hd, d),
              p + "self_attn.o_proj.weight": w(d, heads * hd), p + "mlp.gate_proj.weight":
              w(ffn, d), p + "mlp.up_proj.weight": w(ffn, d), p + "mlp.down_proj.weight": w(d, ffn),
              p + "input_layernorm.weight": torch.ones(d),
              p + "post_attention_layernorm.weight": torch.ones(d)}
    save_file(t, str(folder / "model.safetensors"))
    return folder


def bench(model: str, args: argparse.Namespace, nproc: int, max_batch: int) -> dict:
    """`llamadist bench --json` (a warm-up, then the timed run, through the engine) in one
    process with every core, or over 2 processes with half of the cores each."""
    threads = args.threads if nproc == 1 else max(1, args.threads // 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "llamadist", "bench", model, "--batch", str(args.batch),
           "--max-batch", str(max_batch), "--prompt-len", str(args.prompt_len),
           "--gen-len", str(args.gen_len), "--devices", args.device, "--json"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--strategy", args.strategy]
    out = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    busy = [s["busy"] for s in rep["stages"]] if nproc > 1 else [1.0]
    return {"run": f"{nproc} process{'es' if nproc > 1 else ''}, at most {max_batch} at once",
            "wall_s": rep["wall_s"], "tokens_per_s": rep["tokens_per_s"],
            "prefill_s": rep["prefill_s"], "decode_tokens_per_s": rep["decode_tokens_per_s"],
            "busy": busy, "bubble": 1 - sum(busy) / len(busy)}


def table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"]
    lines = ["| run | wall s | tokens/s | vs 1 process | prefill ms | decode tokens/s | "
             "busy per stage | bubble |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        busy = " / ".join(f"{100 * b:.0f}%" for b in r["busy"])
        lines.append(f"| {r['run']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {1e3 * r['prefill_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {busy} | {100 * r['bubble']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random", help="HIDDEN:LAYERS: benchmark a random model of that size")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--max-batch", default="4,8", help="sequences at once (the scheduler "
                    "keeps one step per stage in flight, each with a share of them)")
    ap.add_argument("--strategy", default="compute", help="how the planner cuts the layers "
                    "(compute balances the head's cost against the layers')")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="cores in all: the one process gets all, each of the two half")
    args = ap.parse_args()
    model = args.model
    if args.random:
        hidden, layers = (int(x) for x in args.random.split(":"))
        model = str(random_model(Path(tempfile.mkdtemp()) / "random", hidden, layers))
    torch.set_num_threads(args.threads)
    rows = [bench(model, args, 1, args.batch)]
    rows += [bench(model, args, 2, int(m)) for m in args.max_batch.split(",")]
    name = args.random and f"random hidden {args.random.replace(':', ', layers ')}" or args.model
    print(f"# pipeline over processes: {name}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.gen_len} new tokens each, {args.device}, strategy {args.strategy}")
    print(f"command: python benchmarks/pipeline_cpu.py {' '.join(sys.argv[1:])}")
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"({args.threads} used){gpu}, torch {torch.__version__}; "
          f"{datetime.date.today().isoformat()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
