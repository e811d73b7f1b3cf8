"""`bench --shape ... --quantize`: decoder linears quantized as they are drawn (the float
model never whole), the same weights and logits as the float build quantized afterwards
(same seed), bytes per step counted in the format. CPU: GGUF Q8_0 / Q4_1 blocks."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from llamadist.cli.bench_shape import bench_shape_cmd, random_model
from llamadist.config import ConfigError, named_shape
from llamadist.kernels.quant import QuantizedTensor
from llamadist.planning.profile import decode_step_bytes, profile, quantized_profile
from tests.shape_quant import SMALL, build_then_quantize, logits, weights


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_build_equals_build_then_quantize(fmt):
    built = random_model(SMALL, "cpu", torch.float32, seed=5, quantize=fmt)
    ref = build_then_quantize(SMALL, "cpu", torch.float32, fmt, seed=5)
    got, want = weights(built), weights(ref)
    assert got.keys() == want.keys()
    assert sum(k.endswith(".blocks") for k in got) == 7 * SMALL.num_layers
    assert isinstance(built.model.layers["0"].mlp.down_proj.weight, QuantizedTensor)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    a = logits(built, SMALL, "cpu", torch.float32, fmt, tokens)
    b = logits(ref, SMALL, "cpu", torch.float32, fmt, tokens)
    assert a.shape == (2, 9, SMALL.vocab_size) and torch.equal(a, b)
    # a different seed is a different model: the comparison can fail
    other = random_model(SMALL, "cpu", torch.float32, seed=6, quantize=fmt)
    assert not torch.equal(weights(other)["model.layers.0.mlp.down_proj.blocks"],
                           got["model.layers.0.mlp.down_proj.blocks"])


def test_bench_shape_quantize_on_cpu(tmp_path):
    out = tmp_path / "res.json"
    torch.set_num_threads(1)
    ns = argparse.Namespace(shape="smollm2-135m", devices="cpu", batch=[1], prompt_len=8,
                            gen_len=3, stages="1", prefill_reps=1, quantize="int8",
                            json_out=str(out))
    assert bench_shape_cmd(ns) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["quantize"] == "int8"
    row = res["rows"][0]
    base = profile(named_shape("smollm2-135m"), dtype="float32", seq_len=res["max_seq_len"])
    ctx = row["decode_context"]
    q = decode_step_bytes(quantized_profile(base, "int8", ["cpu"]), 1, ctx)
    assert row["decode_bytes_per_step"] == pytest.approx(q)
    assert q < 0.6 * decode_step_bytes(base, 1, ctx)   # Q8_0: ~1.06 of 4 bytes a weight
    assert len(row["tokens"]) == 3


def test_random_model_quantizes_a_tied_head_as_its_own_copy():
    """--quantize-head in a --shape build: the tied head Q8_0 blocks of the embedding's
    drawn rows, the embedding itself float."""
    tied = dataclasses.replace(SMALL, tie_word_embeddings=True)
    built = random_model(tied, "cpu", torch.float32, seed=5, quantize="int8",
                         quantize_head=True)
    plain = random_model(tied, "cpu", torch.float32, seed=5, quantize="int8")
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    head, embed = built.lm_head.weight, built.model.embed_tokens.weight
    assert isinstance(head, QuantizedTensor) and head.type_name == "Q8_0"
    assert torch.equal(embed, plain.model.embed_tokens.weight)
    assert (head.dequantize() - embed).abs().max() <= embed.abs().max() / 127 * 1.01


def test_bench_shape_refuses_fp8_on_the_cpu():
    ns = argparse.Namespace(shape="smollm2-135m", devices="cpu", batch=[1], quantize="fp8")
    with pytest.raises(ConfigError, match="fp8 on the CPU stage"):
        bench_shape_cmd(ns)
