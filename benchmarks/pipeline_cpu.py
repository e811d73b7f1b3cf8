"""Pipeline over processes: a batch of prompts through 2 processes with and without
micro-batching, against one process, in the same run on the same machine.

    python benchmarks/pipeline_cpu.py [--model smollm2-135m] [--batch 8] [--gen-len 32]
                                      [--micro-batches 1,2,4] [--device cpu|cuda]
    python benchmarks/pipeline_cpu.py --random 512:8     # a random model, hidden 512, 8 layers

One process runs the in-process Engine with every core; each of the 2 pipeline processes
gets half of the cores (OMP_NUM_THREADS), so the comparison spends the same hardware.
Pipeline runs go through `llamadist bench --nproc 2 --json` (one warm-up request, then the
timed one) and report each stage's busy time; the bubble is the idle share of the stages'
time over the whole request (prefill, decode, fill and drain).
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
import time
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


def prompts_for(model: str, batch: int, prompt_len: int) -> list[list[int]]:
    # The same prompts `llamadist bench` builds, so every run sees identical work.
    from llamadist.weights.checkpoint import open_checkpoint
    tok = open_checkpoint(model).tokenizer()
    base = tok.encode("The history of distributed computing begins with " * 64)
    return [base[i:i + prompt_len] for i in range(batch)]


def one_process(model: str, args: argparse.Namespace, device: str) -> dict:
    """The in-process Engine, one stage, all cores: warm-up, then one timed request."""
    from llamadist.config import default_dtype
    from llamadist.generation.generate import Generator
    from llamadist.generation.sampling import SamplingParams
    from llamadist.runtime.engine import Engine
    from llamadist.runtime.stage import sync
    enc = prompts_for(model, args.batch, args.prompt_len)
    max_seq = (args.prompt_len + args.gen_len + 255) // 256 * 256
    engine = Engine.load(model, devices=[device], dtype=default_dtype([device]),
                         max_batch=args.batch, max_seq_len=max_seq)
    engine.timed = True
    for gen_len in (2, args.gen_len):  # warm-up, then timed
        gen = Generator(engine, None, SamplingParams(max_new_tokens=gen_len, ignore_eos=True))
        t0 = time.perf_counter()
        for _ in gen.stream(enc):
            pass
        sync(engine.device)
        wall = time.perf_counter() - t0
    st = gen.stats
    return {"run": "1 process", "processes": 1, "micro_batches": 1, "wall_s": wall,
            "tokens_per_s": args.batch * args.gen_len / wall, "prefill_s": st.prefill_s,
            "decode_tokens_per_s": st.decode_tokens_per_s, "busy": [1.0], "bubble": 0.0}


def pipeline(model: str, args: argparse.Namespace, micro: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // 2)))
    cmd = [sys.executable, "-m", "llamadist", "bench", model, "--nproc", "2", "--micro-batches",
           str(micro), "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
           "--gen-len", str(args.gen_len), "--devices", args.device, "--strategy",
           args.strategy, "--json"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    return {"run": f"2 processes, {micro} micro-batch{'es' if micro > 1 else ''}",
            "processes": 2, "micro_batches": rep["micro_batches"], "wall_s": rep["wall_s"],
            "tokens_per_s": rep["tokens_per_s"], "prefill_s": rep["prefill_s"],
            "decode_tokens_per_s": rep["decode_tokens_per_s"],
            "busy": [r["busy"] for r in rep["ranks"]], "bubble": rep["bubble"]}


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
    ap.add_argument("--micro-batches", default="1,2,4")
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
    dev = "cuda:0" if args.device == "cuda" else "cpu"
    rows = [one_process(model, args, dev)]
    rows += [pipeline(model, args, int(m)) for m in args.micro_batches.split(",")]
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
