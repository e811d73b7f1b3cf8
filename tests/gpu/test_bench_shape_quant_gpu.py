"""`bench --shape ... --quantize` on CUDA: each decoder linear quantized as it is drawn gives
the same PackedWeights and logits as the bf16 model built whole and quantized afterwards
(same seed), and the build's peak memory is the quantized model plus a few copies of one matrix, far
below the bf16 model (what lets Llama-3-70B in int4 be built on one H200)."""

from __future__ import annotations

import pytest
import torch

from llamadist.cli.bench_shape import random_model
from llamadist.config import ModelConfig
from tests.shape_quant import SMALL, build_then_quantize, logits, weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_quantized_build_equals_build_then_quantize_on_cuda(fmt):
    dt = torch.bfloat16
    built = random_model(SMALL, "cuda", dt, seed=5, quantize=fmt)
    ref = build_then_quantize(SMALL, "cuda", dt, fmt, seed=5)
    got, want = weights(built), weights(ref)
    assert got.keys() == want.keys() and sum(k.endswith(".q") for k in got) == 7 * SMALL.num_layers
    for k in got:
        assert torch.equal(got[k], want[k]), k
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    a = logits(built, SMALL, "cuda", dt, fmt, tokens)
    b = logits(ref, SMALL, "cuda", dt, fmt, tokens)
    other = logits(random_model(SMALL, "cuda", dt, seed=6, quantize=fmt), SMALL, "cuda", dt,
                   fmt, tokens)
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-3 * scale          # the same weights: the same logits
    assert (a - other).abs().max() > 0.05 * scale       # another seed: other logits


def test_quantized_build_peak_is_the_quantized_model_plus_about_one_matrix():
    cfg = ModelConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_layers=16,
                      num_heads=8, num_kv_heads=2, head_dim=128, max_position_embeddings=256)
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    model = random_model(cfg, dev, torch.bfloat16, quantize="int4")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(dev) - before
    held = torch.cuda.memory_allocated(dev) - before           # the model as built
    d, f = cfg.hidden_size, cfg.intermediate_size
    bf16_linears = 2 * cfg.num_layers * (2 * d * d + 2 * d * cfg.kv_size + 3 * d * f)
    largest = 2 * d * f                                         # one (f, d) matrix in bf16
    assert held < 0.5 * bf16_linears
    # quantize_int4 works in float32 (a few copies of the matrix at twice its bf16 bytes)
    assert peak <= held + 12 * largest, (peak, held, largest)
    assert peak < 0.6 * bf16_linears
    del model
