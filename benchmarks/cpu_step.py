"""A CPU decode step as one C call against one C call per layer, on random weights of a
model's shape (default SmolLM2-135M: 30 layers, 576 wide, vocabulary 49152, tied head),
in each weight format; no checkpoint needed, so it runs on any machine.

    python benchmarks/cpu_step.py [--types f32 f16 Q8_0 Q4_1] [--steps 64] [--rounds 5]
                                  [--threads 2] [--batch 1] [--layers 30]

Each round times ``--steps`` decode steps of a ``Stage`` (static cache, after a 64-token
prefill) with the whole-step call (``llamadist.kernels.cpu_step``) and then without it
(``Stage.step_fn`` None: one C call per decoder layer, the head on its own), interleaved,
and reports per type the median and best ms a step of each and their ratio. The logits
of the two paths are compared on every step (max abs difference reported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from llamadist.config import ModelConfig
from llamadist.kernels.quant import QuantizedTensor
from llamadist.kernels.wquant import to_gguf_blocks
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.runtime.kernel_passes import use_cpu_linear
from llamadist.runtime.stage import Stage

TYPES = {"f32": 0, "f16": 1, "bf16": 30, "Q8_0": 8, "Q4_1": 3, "Q4_K": 12}


def smollm2_config(layers: int) -> ModelConfig:
    return ModelConfig.from_hf_dict(dict(
        architectures=["LlamaForCausalLM"], vocab_size=49152, num_hidden_layers=layers,
        hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True))


def _blocks(qtype: int, w: torch.Tensor, rng: np.random.Generator) -> QuantizedTensor:
    """w (N, K) as a weight of ggml type ``qtype``: Q8_0 / Q4_1 quantized from w, the
    16-bit floats w rounded, Q4_K random blocks (tests/quant_blocks.py)."""
    n, k = w.shape
    if qtype in (8, 3):
        return to_gguf_blocks(w, "int8" if qtype == 8 else "int4")
    if qtype in (1, 30):
        half = w.to(torch.float16 if qtype == 1 else torch.bfloat16)
        return QuantizedTensor(half.view(torch.uint8).reshape(n, -1).contiguous(), qtype, (n, k))
    from tests.quant_blocks import random_blocks
    return QuantizedTensor(torch.from_numpy(random_blocks(qtype, n, k, rng)), qtype, (n, k))


def random_model(kind: str, layers: int) -> Llama:
    cfg = smollm2_config(layers)
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.02)
    model.setup_rope(256, "cpu")
    fuse_projections(model).eval()
    qtype, rng = TYPES[kind], np.random.default_rng(0)
    if qtype:
        for name, m in list(model.named_modules()):
            if name.endswith("_proj") or name == "lm_head":
                qt = _blocks(qtype, m.weight.detach(), rng)
                del m.weight
                m.weight = qt
    return use_cpu_linear(model)


def time_steps(stage: Stage, steps: int, batch: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds a step (mean over ``steps``) and the logits of each step."""
    ids = torch.arange(64).repeat(batch, 1) + 7
    out = []
    with torch.inference_mode():
        stage.forward(ids, torch.arange(64).expand(batch, 64), 0, None)
        t0 = time.perf_counter()
        for i in range(steps):
            tok = torch.full((batch, 1), (i * 31) % 1000)
            out.append(stage.forward(tok, torch.full((batch, 1), 64 + i), 64 + i, None))
        return (time.perf_counter() - t0) / steps, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", nargs="*", default=["f32", "f16", "Q8_0", "Q4_1"],
                   choices=list(TYPES))
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), torch "
          f"{torch.__version__}, {args.threads} threads, batch {args.batch}, load average "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| weights | whole step ms (median / best) | per-layer ms (median / best) "
          "| speed-up (median) | max logit diff |")
    print("| --- | --- | --- | --- | --- |")
    for kind in args.types:
        model = random_model(kind, args.layers)
        whole = Stage(model, torch.device("cpu"), torch.float32, args.batch, 256)
        per_layer = Stage(model, torch.device("cpu"), torch.float32, args.batch, 256)
        per_layer.step_fn = None
        times: dict[str, list[float]] = {"whole": [], "layer": []}
        diff = 0.0
        for _ in range(args.rounds + 1):  # the first round warms up
            a, la = time_steps(whole, args.steps, args.batch)
            b, lb = time_steps(per_layer, args.steps, args.batch)
            times["whole"].append(a)
            times["layer"].append(b)
            diff = max(diff, max((x - y).abs().max().item() for x, y in zip(la, lb)))
        w, lyr = times["whole"][1:], times["layer"][1:]
        print(f"| {kind} | {1e3 * statistics.median(w):.2f} / {1e3 * min(w):.2f} | "
              f"{1e3 * statistics.median(lyr):.2f} / {1e3 * min(lyr):.2f} | "
              f"{statistics.median(lyr) / statistics.median(w):.2f}x | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
