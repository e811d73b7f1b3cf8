"""--quantize at load: the per-device spec, float checkpoints quantized on CPU stages to
GGUF Q8_0 / Q4_1 blocks (the CPU kernels' formats) giving the dequantized model's logits,
and the command line. GPU stages (PackedWeight + Triton): tests/gpu/test_wquant_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from llamadist.cli.main import main
from llamadist.config import (ConfigError, RuntimeConfig, parse_quantize, quantize_for,
                              quantize_group)
from llamadist.kernels.quant import QuantizedTensor
from llamadist.kernels.wquant import to_gguf_blocks
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint


def test_spec_per_device():
    assert parse_quantize(None) == {}
    assert quantize_for("int4", "cuda:1") == "int4" == quantize_for("int4", "cpu")
    spec = "cuda:0=int4,cuda=fp8,cpu=native"
    assert [quantize_for(spec, d) for d in ("cuda:0", "cuda:3", "cpu")] == ["int4", "fp8", None]
    assert quantize_for("cuda:0=int8", "cpu") is None
    with pytest.raises(ConfigError, match="unknown format 'int3'"):
        RuntimeConfig(quantize="cuda:0=int3")
    with pytest.raises(ConfigError, match="given twice"):
        parse_quantize("cpu=int8,cpu=int4")
    with pytest.raises(ConfigError, match="fp8 on the CPU stage"):
        quantize_for("fp8", "cpu")


def test_spec_int4_groups():
    """int4-gN names int4's group; a CPU stage (GGUF Q4_1, groups of 32) takes int4-g32
    only, and the refusal names the fix."""
    assert parse_quantize("int4-g32") == {"*": "int4-g32"}
    spec = "cuda:0=int4-g64,cuda=int4-g256,cpu=int4-g32"
    assert [quantize_for(spec, d) for d in ("cuda:0", "cuda:1", "cpu")] == [
        "int4-g64", "int4-g256", "int4-g32"]
    assert [quantize_group(f) for f in ("int4", "int4-g32", "int8", "fp8")] == [
        ("int4", None), ("int4", 32), ("int8", None), ("fp8", None)]
    for bad in ("int4-g48", "int4-g", "int4g32", "int8-g32", "int4-g032"):
        with pytest.raises(ConfigError, match=f"unknown format '{bad}'"):
            RuntimeConfig(quantize=f"cuda={bad}")
    with pytest.raises(ConfigError, match=r"int4-g128 on the CPU stage .*\(--quantize int4\)"):
        quantize_for("int4-g128", "cpu")


@pytest.mark.parametrize("kind,qtype", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_float_to_gguf_blocks_within_half_a_step(kind, qtype):
    from llamadist.kernels.quant_ref import dequantize
    w = torch.randn(6, 96) * 0.1 + 0.02
    q = to_gguf_blocks(w, kind)
    assert q.type_name == qtype and q.shape == (6, 96)
    deq = torch.from_numpy(dequantize(q.blocks.numpy(), q.qtype, 96))
    b = q.blocks.numpy().reshape(6, 3, -1)
    d = torch.from_numpy(b[..., 0:2].copy().view(np.float16).astype(np.float64))  # (6, 3, 1)
    step = d.repeat_interleave(32, dim=1).view(6, 96)
    # half a step of the f16 grid, plus f16's rounding of the minimum (Q4_1's m)
    slack = 0 if kind == "int8" else w.abs().double() * 2 ** -11
    assert ((deq - w.double()).abs() <= step / 2 * 1.001 + slack + 1e-7).all()
    with pytest.raises(ValueError, match="not a multiple"):
        to_gguf_blocks(torch.randn(2, 40), kind)


def _dequantized_copy(stage) -> None:
    """Every QuantizedTensor weight of ``stage`` replaced by its float values (in place)."""
    for m in stage.model.modules():
        w = m.__dict__.get("weight")
        if isinstance(w, QuantizedTensor):
            del m.weight
            m.weight = nn.Parameter(w.dequantize(), requires_grad=False)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cpu_stage_quantized_equals_its_dequantized_model(tiny_model, kind):
    ids = torch.tensor([[5, 9, 33, 100, 7, 8, 250, 3]])
    pos = torch.arange(8).view(1, -1)

    def build():
        return build_stage(open_checkpoint(tiny_model), range(5), "cpu", torch.float32, 1, 32,
                           runtime=RuntimeConfig(quantize=kind))
    st = build()
    layer = st.model.model.layers["1"]
    assert isinstance(layer.mlp.gate_up_proj.weight, QuantizedTensor)
    assert isinstance(layer.self_attn.o_proj.weight, QuantizedTensor)
    assert isinstance(st.model.model.embed_tokens.weight, nn.Parameter)  # not quantized
    ref = build()
    _dequantized_copy(ref)
    got = st.forward(ids, pos, 0, None, logits="all")
    want = ref.forward(ids, pos, 0, None, logits="all")
    assert (got - want).abs().max().item() <= 1e-4
    # one decode step through the C decoder layer on the blocks
    nxt = torch.tensor([[int(got[0, -1].argmax())]])
    a = st.forward(nxt, torch.tensor([[8]]), 8, None)
    b = ref.forward(nxt, torch.tensor([[8]]), 8, None)
    assert (a - b).abs().max().item() <= 1e-4


def test_generate_with_quantize_and_refusals(tiny_model, capsys):
    args = ["generate", str(tiny_model), "--prompt", "hello", "--max-new-tokens", "4",
            "--json"]
    assert main(args + ["--quantize", "int4"]) == 0
    assert main(args + ["--quantize", "fp8"]) == 2
    assert "fp8 on the CPU stage" in capsys.readouterr().err
    assert main(args + ["--quantize", "cpu=int5"]) == 2
    assert "unknown format 'int5'" in capsys.readouterr().err
    assert main(args + ["--quantize", "int4-g32"]) == 0   # Q4_1 blocks on the CPU
    capsys.readouterr()
    assert main(args + ["--quantize", "int4-g64"]) == 2
    assert "int4-g64 on the CPU stage" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["gqa_tied", "mha"])
def test_quantize_head_tied_and_untied(tiny_models, kind):
    """--quantize-head: the head in the stage's format too (Q8_0 blocks on the CPU), a
    tied one as its own copy while the embedding keeps its float rows; the logits are the
    dequantized model's, through the C step's quantized-head path as well."""
    ids = torch.tensor([[5, 9, 33, 100, 7, 8, 250, 3]])
    pos = torch.arange(8).view(1, -1)
    ckpt = open_checkpoint(tiny_models[kind])
    layers = range(ckpt.config.num_layers)

    def build(head):
        return build_stage(ckpt, layers, "cpu", torch.float32, 1, 32,
                           runtime=RuntimeConfig(quantize="int8", quantize_head=head))
    st = build(True)
    head, embed = st.model.lm_head.weight, st.model.model.embed_tokens.weight
    assert isinstance(head, QuantizedTensor) and head.type_name == "Q8_0"
    assert isinstance(embed, nn.Parameter) and embed.dtype == torch.float32
    plain = build(False)
    assert isinstance(plain.model.lm_head.weight, nn.Parameter)
    assert (plain.model.lm_head.weight is plain.model.model.embed_tokens.weight) == (
        kind == "gqa_tied")
    assert torch.equal(embed, plain.model.model.embed_tokens.weight)  # lookups unchanged
    ref = build(True)
    _dequantized_copy(ref)
    got = st.forward(ids, pos, 0, None, logits="all")
    assert (got - ref.forward(ids, pos, 0, None, logits="all")).abs().max().item() <= 1e-4
    # the head's quantization changes the logits (by its Q8_0 error, not more)
    diff = (got - plain.forward(ids, pos, 0, None, logits="all")).abs().max().item()
    assert 0 < diff <= 0.05 * got.abs().max().item()
    nxt = torch.tensor([[int(got[0, -1].argmax())]])
    a = st.forward(nxt, torch.tensor([[8]]), 8, None)
    assert (a - ref.forward(nxt, torch.tensor([[8]]), 8, None)).abs().max().item() <= 1e-4


def test_quantize_head_needs_a_format(tiny_model, capsys):
    args = ["generate", str(tiny_model), "--prompt", "hello", "--max-new-tokens", "3",
            "--json", "--quantize-head"]
    assert main(args) == 2
    assert "--quantize-head quantizes the head in the --quantize format" in (
        capsys.readouterr().err)
    assert main(args + ["--quantize", "int8"]) == 0


def test_quantized_profile_counts_a_quantized_head():
    """The head's matrix in the format (a tied one no longer shared with the embedding)."""
    from llamadist.config import named_shape
    from llamadist.planning.profile import profile, quantized_profile
    p = profile(named_shape("llama3-8b"), dtype="bfloat16", seq_len=1024)
    v, d = 128256, 4096
    assert quantized_profile(p, "int8").head == p.head
    q = quantized_profile(p, "int8", head=True)
    assert q.head.weight_bytes == v * d + 4 * v + 2 * d
    assert q.layers == quantized_profile(p, "int8").layers
    s = profile(named_shape("smollm2-135m"), dtype="float32", seq_len=1024)
    assert s.tied_bytes > 0
    c = quantized_profile(s, "int8", ["cpu"], head=True)
    assert c.tied_bytes == 0 and not c.head.tied
    assert c.head.weight_bytes == 49152 * 576 // 32 * 34 + 4 * 576


def test_cpu_blocks_refused_before_any_start(tiny_model, capsys):
    """A CPU stage's --quantize keeps GGUF blocks of 32 inputs: a --tp that slices the
    tiny model's intermediate 160 into 80 per rank is refused by the front, before any
    worker starts (a worker would fail while loading), naming the linear and the fixes."""
    args = ["generate", str(tiny_model), "--prompt", "hello", "--max-new-tokens", "2",
            "--nproc", "2", "--tp", "2", "--quantize", "int8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "down_proj would take 80 inputs (intermediate_size / --tp 2)" in err
    assert "cpu=none" in err and "Traceback" not in err


def test_quantize_head_of_a_native_gguf_tied_embedding(tmp_path):
    """A tied GGUF under --weights native on a CPU stage: the embedding stays the file's
    blocks, the head becomes its own --quantize copy (Q8_0) of their dequantized values."""
    from tests.unit.test_gguf import LAYERS, write_tiny_gguf
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tied=True)
    st = build_stage(open_checkpoint(path), range(LAYERS), "cpu", torch.float32, 1, 32,
                     runtime=RuntimeConfig(quantize="int8", quantize_head=True))
    embed, head = st.model.model.embed_tokens.weight, st.model.lm_head.weight
    assert isinstance(embed, QuantizedTensor) and isinstance(head, QuantizedTensor)
    assert head is not embed and head.type_name == "Q8_0" != embed.type_name
    scale = embed.dequantize().abs().amax(dim=1, keepdim=True)
    assert ((head.dequantize() - embed.dequantize()).abs() <= scale / 127 * 1.01).all()


def test_quantize_head_refusals(tiny_model):
    """Without any format to quantize the head in: bench --shape, plan --auto and the
    Python API refuse, naming the fix."""
    import argparse

    from llamadist.api import LLM
    from llamadist.cli.bench_shape import bench_shape_cmd
    ns = argparse.Namespace(shape="smollm2-135m", devices="cpu", batch=[1],
                            quantize_head=True)
    with pytest.raises(ConfigError, match="--quantize-head quantizes the head"):
        bench_shape_cmd(ns)
    with pytest.raises(ConfigError, match="--quantize-head quantizes the head"):
        LLM(tiny_model, devices="cpu", runtime=RuntimeConfig(quantize_head=True),
            warmup=False)
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "1", "--quantize-head"]) == 2
