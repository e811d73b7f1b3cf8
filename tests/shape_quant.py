"""Helpers for the quantized `bench --shape` build (CPU and GPU tests): a small Llama
shape, the layer-by-layer quantized build, the build-then-quantize reference, logits."""

from __future__ import annotations

import torch

from llamadist.cli.bench_shape import make_engine, random_model
from llamadist.config import ModelConfig, RuntimeConfig
from llamadist.kernels import wquant
from llamadist.weights.loader import LAYER_LINEAR, _set_param

# every linear's inputs a multiple of 32 (GGUF blocks) and of 128 (int4 groups)
SMALL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256)


def build_then_quantize(config: ModelConfig, device: str, dtype: torch.dtype, fmt: str,
                        seed: int) -> torch.nn.Module:
    """The float model whole, then each decoder linear quantized (the reference)."""
    model = random_model(config, device, dtype, seed=seed)
    for name, p in list(model.named_parameters()):
        if LAYER_LINEAR.search(name):
            w = p.detach()
            q = (wquant.to_gguf_blocks(w, fmt, dtype, name) if w.device.type == "cpu"
                 else wquant.quantize(w, fmt))
            _set_param(model, name, q)
    return model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight's stored tensors by name (blocks, codes and scales for quantized)."""
    out = {}
    for name, m in model.named_modules():
        w = m.__dict__.get("weight", None)
        if w is None:
            continue
        if hasattr(w, "blocks"):
            out[name + ".blocks"] = w.blocks
        elif hasattr(w, "q"):
            out[name + ".q"], out[name + ".scale"] = w.q, w.scale
            if w.offset is not None:
                out[name + ".offset"] = w.offset
    for name, p in model.named_parameters():
        out[name] = p.detach()
    return out


def logits(model, config: ModelConfig, device: str, dtype: torch.dtype, fmt: str,
           tokens: torch.Tensor) -> torch.Tensor:
    """Prefill logits of ``tokens`` (B, T) through an engine over ``model`` (eager)."""
    from llamadist.model.fuse import fuse_projections
    runtime = RuntimeConfig(cuda_graphs=False, compile=False, quantize=fmt)
    b, t = tokens.shape
    engine = make_engine(config, fuse_projections(model), [range(config.num_layers)],
                         [device], dtype, b, 64, runtime)
    tok = tokens.to(device)
    pos = torch.arange(t, device=device).expand(b, t)
    return engine.forward(tok, pos, 0, None, logits="all").float().cpu()
