"""The perplexity cost of each GPU ``--quantize`` format, measured on a CPU (issue 16).

A CPU stage's ``--quantize`` makes GGUF Q8_0 / Q4_1 blocks, not the GPU formats, so this
script runs the GPU formats' *numbers* on a CPU: it wraps the checkpoint so each decoder
linear (loader.LAYER_LINEAR) reads back as ``wquant.quantize(w, fmt).dequantize()`` of
its float value (a GGUF's dequantized blocks), then runs ``llamadist perplexity`` itself
(same windows, same stage code) on ``--devices cpu --weights float32``. A GPU stage
computes the same weights' product in bf16 (tinygemm / Triton), which moves the result
by rounding only. Formats: ``float`` (no quantization: the baseline) and any --quantize
format (int8, fp8, int4 = int4-g128, int4-g32, int4-g64, int4-g256).

Per format it also prints the round trip's error over every decoder linear, per
projection: the largest |w - w'| in units of the group's scale (int8 and int4 stay within
0.5; not printed for fp8, whose step is relative), the relative Frobenius error
||w - w'|| / ||w||, and what a rounding error uniform over +-scale/2 would give,
sqrt(sum scale^2 / 12) / ||w|| (int8 and int4's expected error from their grid alone).

    PYTHONPATH=$PWD python benchmarks/quant_ppl_cpu.py \\
        --model SmolLM2-135M-Instruct.Q4_1.gguf --formats float,int8,fp8,int4-g32,int4-g64,int4

One JSON line per format (``"bench": "ppl_cpu"``) and per format and projection
(``"bench": "roundtrip"``) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def roundtrip(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, float, float]:
    """(w' float32, max |w - w'| / scale of its group, sum of scale^2 / 12 over W) of
    ``fmt`` (a --quantize format), W (N, K)."""
    from llamadist.kernels import wquant
    w = w.float()
    p = wquant.quantize(w, fmt)
    back = p.dequantize(torch.float32)
    step = p.scale.double()[:, torch.arange(w.shape[1]) // p.group]     # (N, K)
    return back, float(((w - back).abs() / step).max()), float((step ** 2).sum() / 12)


class Rounded:
    """A checkpoint whose decoder linears read back through ``roundtrip``; the rest as is."""

    def __init__(self, ckpt, fmt: str, stats: dict) -> None:
        self._ckpt, self._fmt, self._stats = ckpt, fmt, stats

    def __getattr__(self, name: str):
        return getattr(self._ckpt, name)

    def get(self, name: str, shard=None) -> torch.Tensor:
        from llamadist.weights.loader import LAYER_LINEAR
        w = self._ckpt.get(name, shard)
        if self._fmt == "float" or not LAYER_LINEAR.search(name):
            return w
        back, steps, uniform2 = roundtrip(w, self._fmt)
        proj = name.split(".")[-2]
        s = self._stats[proj]
        s["max_err_in_steps"] = max(s.get("max_err_in_steps", 0.0), steps)
        s["uniform2"] = s.get("uniform2", 0.0) + uniform2
        s["max_abs_err"] = max(s.get("max_abs_err", 0.0), float((w.float() - back).abs().max()))
        s["err2"] = s.get("err2", 0.0) + float(((w.float() - back) ** 2).sum())
        s["w2"] = s.get("w2", 0.0) + float((w.float() ** 2).sum())
        return back.to(w.dtype)


def ppl(args: argparse.Namespace, fmt: str) -> tuple[dict, dict]:
    """``llamadist perplexity`` of the model with its decoder linears rounded to ``fmt``."""
    from llamadist.cli import main as cli_main
    from llamadist.weights import checkpoint
    stats: dict = defaultdict(dict)
    opened = checkpoint.open_checkpoint
    checkpoint.open_checkpoint = lambda *a, **k: Rounded(opened(*a, **k), fmt, stats)
    argv = ["perplexity", args.model, "--text", args.text, "--ctx", str(args.ctx),
            "--chunks", str(args.chunks), "--batch", str(args.batch), "--devices", "cpu",
            "--weights", "float32", "--json"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli_main(argv)
    finally:
        checkpoint.open_checkpoint = opened
    if rc != 0:
        raise RuntimeError(f"llamadist {' '.join(argv)} exited {rc}")
    return json.loads(out.getvalue().strip().splitlines()[-1]), stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="GGUF file or HF folder")
    p.add_argument("--text", default=str(ROOT / "README.md"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--formats", default="float,int8,fp8,int4-g32,int4-g64,int4,int4-g256",
                   type=lambda s: s.split(","))
    args = p.parse_args()
    base = None
    digest = hashlib.sha256(Path(args.text).read_bytes()).hexdigest()[:12]  # as quant_gpu's
    for fmt in args.formats:
        r, stats = ppl(args, fmt)
        base = r["ppl"] if fmt == "float" else base
        print(json.dumps({"bench": "ppl_cpu", "model": Path(args.model).name, "format": fmt,
                          "ctx": args.ctx, "text": Path(args.text).name,
                          "text_sha256": digest, "ppl": r["ppl"],
                          "ppl_err": r["ppl_err"],
                          "ratio_to_float": r["ppl"] / base if base else None,
                          "tokens_scored": r["tokens_scored"], "eval_s": r["eval_s"]}),
              flush=True)
        for proj, s in sorted(stats.items()):
            grid = fmt != "fp8"
            print(json.dumps({"bench": "roundtrip", "format": fmt, "proj": proj,
                              "max_err_in_steps": s["max_err_in_steps"] if grid else None,
                              "max_abs_err": s["max_abs_err"],
                              "rel_fro_err": (s["err2"] / s["w2"]) ** 0.5,
                              "uniform_rel_err": (s["uniform2"] / s["w2"]) ** 0.5 if grid
                              else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
