"""GPU weight-only quantization, measured through the commands users run (issue 16):

1. batch-1 decode of a Llama-3-8B-shaped bf16 checkpoint folder (random weights, SmolLM2's
   vocabulary and tokenizer so `llamadist bench` can encode its prompt; the unquantized
   head is then 0.4 GB of the 14.5 GB bf16 step) with bf16 and each ``--quantize`` under
   each ``--wquant`` backend (``--backends torch,triton``: torch's tinygemm / scaled
   matmul, llamadist's Triton kernels): ms per decode step, prefill seconds and the
   step's ratio to bf16 (targets: int8 <= 0.6x, int4 <= 0.4x, fp8 like int8);
2. SmolLM2 perplexity on a fixed text (this repository's README.md by default) with bf16
   and each ``--quantize`` of ``--ppl-formats`` (``--smollm2 PATH``: an HF folder or the
   GGUF; a GGUF's blocks are dequantized to bf16 first, ``--weights bfloat16``, so every
   run starts from the same float weights): int8, int4 (groups of 128), int4-g32, fp8,
   and for a GGUF ``native`` (``--weights native``: its Q4_1 blocks become int4 groups of
   32 without loss, so its perplexity is bf16's up to rounding). On SmolLM2's Q4_1 file
   int4 (128) costs 1.65x bf16's perplexity and int4-g32 nothing: the file's values lie on
   a g32 grid (benchmarks/quant_ppl_cpu.py measures the same numbers on a CPU).

A format named with "+head" (``--formats int8+head``, ``--ppl-formats fp8+head``) adds
``--quantize-head``: the output head in that format too (SmolLM2's tied head as its own
quantized copy).

One JSON line per result on stdout. Each run loads 16 GB (~1-1.5 minutes): bf16 plus
three formats under two backends is 7 runs, so under a 10-minute limit split it by
backend, keeping the checkpoint (each part measures its own bf16 baseline):

    python benchmarks/quant_gpu.py --device cuda:0 --tokenizer-from .whl/smollm2-tok \\
        --checkpoint-dir /tmp/qckpt --backends torch
    python benchmarks/quant_gpu.py --device cuda:0 --tokenizer-from .whl/smollm2-tok \\
        --checkpoint-dir /tmp/qckpt --backends triton \\
        --smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

The perplexity rows alone (11 runs of a few seconds each):

    python benchmarks/quant_gpu.py --device cuda:0 --skip-decode \\
        --smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Part 1 measures whole decode steps. The kernels alone (each Llama-3-8B linear, M = 1, 2, 4;
bf16, the torch products and every Triton GEMV configuration near the rule's, with GB/s
against a measured copy rate) are ``benchmarks/wquant_sweep.py``, ~3 minutes:

    python benchmarks/wquant_sweep.py > sweep.jsonl 2> sweep.txt

Its summary (the best configuration per kind, shape and M) is what to put into
``wquant_triton.gemv_config`` before rerunning this script's ``--backends triton``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["bf16", "int8", "int4", "fp8"]
PPL_FORMATS = ["bf16", "int8", "int4", "int4-g32", "fp8", "native"]


def build_checkpoint(args: argparse.Namespace) -> Path:
    """The shape's random bf16 weights as an HF folder (kept for reruns in --checkpoint-dir)."""
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from load_compare import write_checkpoint

    from llamadist.cli.bench_shape import random_model
    from llamadist.config import named_shape
    root = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="llamadist-quant-"))
    folder = root / f"{args.shape}-bfloat16"
    if not (folder / "config.json").is_file():
        config = replace(named_shape(args.shape), vocab_size=49152, eos_token_ids=(2,),
                         torch_dtype="bfloat16")
        model = random_model(config, torch.device(args.device), torch.bfloat16)
        write_checkpoint(model, config, folder)
        del model
        torch.cuda.empty_cache()
    for f in Path(args.tokenizer_from).glob("*.json"):
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    return folder


def run_json(cmd: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "llamadist", *cmd], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else
                f"exit {res.returncode}", "wall_s": time.perf_counter() - t0}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def quant_flags(fmt: str, backend: str | None = None) -> list[str]:
    """A format's flags: "int8", ..., or "int8+head" (--quantize-head too)."""
    if fmt == "bf16":
        return []
    head = ["--quantize-head"] if fmt.endswith("+head") else []
    return (["--quantize", fmt.removesuffix("+head")] + head
            + (["--wquant", backend] if backend else []))


def runs(args: argparse.Namespace,
         formats: list[str] | None = None) -> list[tuple[str, str | None]]:
    """(format, backend) in order (``formats``, else --formats), bf16 (no backend) first."""
    return [(f, b) for f in formats or args.formats
            for b in ([None] if f == "bf16" else args.backends)]


def decode_speed(args: argparse.Namespace, folder: Path) -> None:
    base = None
    for fmt, backend in runs(args):
        r = run_json(["bench", str(folder), "--devices", args.device, "--batch", "1",
                      "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                      "--json", *quant_flags(fmt, backend)], timeout=600)
        row = {"bench": "decode", "shape": args.shape, "format": fmt, "backend": backend,
               "batch": 1}
        if "error" in r:
            print(json.dumps(row | r), flush=True)
            continue
        ms = r["decode_ms_per_step"]
        base = ms if fmt == "bf16" else base
        weights = sum(s.get("weight_bytes", 0) for s in r["stages"])
        print(json.dumps(row | {"ms_per_step": ms, "ratio_to_bf16": ms / base if base else None,
                                "weight_bytes": weights, "load_s": r["load_s"],
                                "prefill_s": r["prefill_s"], "wall_s": r["wall_s"]}),
              flush=True)


def perplexity(args: argparse.Namespace) -> None:
    base = None
    model = str(args.smollm2)
    text = str(Path(args.text).resolve()) if args.text else str(ROOT / "README.md")
    # the text's digest in every row: README.md changes between sessions, and perplexities
    # are comparable only over the same text
    digest = hashlib.sha256(Path(text).read_bytes()).hexdigest()[:12]
    gguf = model.endswith(".gguf")
    for fmt, backend in runs(args, args.ppl_formats):
        if fmt == "native" and not gguf:
            continue  # a float checkpoint has no blocks of its own
        cmd = ["perplexity", model, "--text", text, "--ctx", str(args.ctx), "--chunks",
               str(args.chunks), "--batch", "4", "--devices", args.device, "--json"]
        if fmt == "native":  # the GGUF's blocks as a GPU stage converts them (from_gguf)
            cmd += ["--weights", "native", "--dtype", "bfloat16", "--wquant", backend]
        else:
            cmd += ["--weights", "bfloat16"] if gguf else ["--dtype", "bfloat16"]
            cmd += quant_flags(fmt, backend)
        r = run_json(cmd, timeout=300)
        row = {"bench": "perplexity", "model": Path(model).name, "format": fmt,
               "backend": backend,
               "ctx": args.ctx, "text": Path(text).name, "text_sha256": digest}
        if "error" in r:
            print(json.dumps(row | r), flush=True)
            continue
        base = r["ppl"] if fmt == "bf16" else base
        print(json.dumps(row | {"ppl": r["ppl"], "ppl_err": r["ppl_err"],
                                "ratio_to_bf16": r["ppl"] / base if base else None,
                                "tokens_scored": r["tokens_scored"],
                                "eval_s": r["eval_s"]}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--formats", default=",".join(FORMATS), type=lambda s: s.split(","),
                   help="decode runs: bf16 and --quantize formats")
    p.add_argument("--ppl-formats", default=",".join(PPL_FORMATS),
                   type=lambda s: s.split(","), help="perplexity runs: bf16, --quantize "
                   "formats, native (a GGUF's own blocks)")
    p.add_argument("--backends", default="torch,triton", type=lambda s: s.split(","),
                   help="--wquant backends each --quantize format runs under")
    p.add_argument("--checkpoint-dir", help="where the random checkpoint is written/reused")
    p.add_argument("--tokenizer-from", default=str(ROOT / ".whl" / "smollm2-tok"),
                   help="a folder with SmolLM2's tokenizer files")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--smollm2", help="SmolLM2 HF folder or GGUF for the perplexity runs "
                   "(skipped without it)")
    p.add_argument("--text", help="text file to score (default README.md)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args()
    if not args.skip_decode:
        decode_speed(args, build_checkpoint(args))
    if args.smollm2:
        perplexity(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
