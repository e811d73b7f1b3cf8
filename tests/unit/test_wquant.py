"""The GPU weight formats' CPU-side math (llamadist.kernels.wquant): quantize and
dequantize of int8 / int4 / fp8 within their stated bounds, GGUF blocks converted (exact
for Q8_0, Q4_0, Q4_1 and Q4_K; within half an int8 step for Q5_K and Q6_K), the fusion's
cat, and F.linear's dequantizing fallback off CUDA. The Triton kernels: tests/gpu."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamadist.kernels import wquant as W
from llamadist.kernels.quant import RowStack
from llamadist.kernels.quant_ref import TYPE_IDS, dequantize
from tests.quant_blocks import random_blocks

SHAPES = [(5, 300), (16, 256), (3, 129), (1, 7)]  # tails: K not a multiple of 128 / odd


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_per_channel_and_grouped_within_half_a_step(n, k):
    w = torch.randn(n, k, dtype=torch.float64) * torch.logspace(-3, 1, n).view(-1, 1)
    for group in (None, 32):
        p = W.quantize_int8(w, group)
        assert p.q.dtype == torch.int8 and p.scale.shape == (n, -(-k // (group or k)))
        idx = torch.arange(k) // p.group
        err = (p.dequantize(torch.float64) - w).abs()
        assert (err <= p.scale.double()[:, idx] / 2 * (1 + 1e-6)).all()
        # per channel: the largest |w| of each row is exactly +-127 steps
        if group is None:
            assert (p.q.abs().amax(1) == 127).all()


@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_group_128_packed_two_per_byte(n, k):
    w = torch.randn(n, k) * 0.05 + 0.01
    p = W.quantize_int4(w)
    assert p.q.dtype == torch.uint8 and p.q.shape == (n, (k + 1) // 2)
    assert p.group == 128 and p.scale.shape == p.offset.shape == (n, -(-k // 128))
    codes = W.unpack_int4(p.q, k)
    assert int(codes.max()) <= 15
    assert torch.equal(W.unpack_int4(W.pack_int4(codes), k), codes)
    assert int(p.q[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4 if k > 1 else True
    idx = torch.arange(k) // 128
    err = (p.dequantize(torch.float64) - w.double()).abs()
    assert (err <= p.scale.double()[:, idx] / 2 + 1e-7).all()
    # bytes: half a byte per weight plus two float32 per 128 weights
    assert p.nbytes == n * ((k + 1) // 2) + 8 * n * -(-k // 128)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_chosen_group_within_half_a_step(group):
    """--quantize int4-gN: the group it names (K = 576: a short last group for 128 and
    256), every weight within half its group's step, the bytes the planner counts."""
    from llamadist.planning.profile import quantized_matrix_bytes
    n, k = 24, 576
    w = torch.randn(n, k) * torch.logspace(-2, 0, n).view(-1, 1) + 0.01
    p = W.quantize(w, f"int4-g{group}")
    g = -(-k // group)
    assert (p.kind, p.group) == ("int4", group)
    assert p.scale.shape == p.offset.shape == (n, g) and p.q.shape == (n, k // 2)
    idx = torch.arange(k) // group
    err = (p.dequantize(torch.float64) - w.double()).abs()
    assert (err <= p.scale.double()[:, idx] / 2 + 1e-7).all()
    assert p.nbytes == quantized_matrix_bytes(n, k, f"int4-g{group}", "cuda")
    if group == 128:  # the bare int4 is this group
        assert torch.equal(W.quantize(w, "int4").q, p.q)


def test_short_last_group_spans_its_own_inputs():
    """A short last group (K = 576 in groups of 128 or 256) takes its min and max from its
    own inputs: padding it with zeros would stretch the range of inputs that share a sign
    (here all near 10: the step would be ~150x too coarse)."""
    w = torch.rand(4, 576) * 0.1 + 10
    for group in (128, 256):
        p = W.quantize(w, f"int4-g{group}")
        last = w[:, (576 // group) * group:]
        assert torch.allclose(p.offset[:, -1].float(), last.amin(-1))
        assert torch.allclose(p.scale[:, -1].float(), (last.amax(-1) - last.amin(-1)) / 15)
    p = W.quantize_int8(w, 128)
    assert torch.allclose(p.scale[:, -1].float(), w[:, 512:].abs().amax(-1) / 127)


def test_int4_g32_keeps_a_q4_1_grid_exactly():
    """Values on an asymmetric 4-bit grid of 32 (GGUF Q4_1's: m + c d, codes 0 and 15 in
    every block) come back exactly from int4-g32; int4 (128) moves them by up to half its
    coarser step (SmolLM2's Q4_1 file: g32's perplexity is the float model's, g128's 1.65x
    it, benchmarks/RESULTS.md)."""
    gen = torch.Generator().manual_seed(3)
    n, k = 8, 256
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-8 * d - torch.rand(n, k // 32, 1, generator=gen) * 1e-3).half().float()
    w = (m + codes * d).view(n, k)
    assert torch.equal(W.quantize(w, "int4-g32").dequantize(), w)
    coarse = W.quantize(w, "int4").dequantize()
    assert (coarse - w).norm() / w.norm() > 0.01


def test_fp8_every_code_and_bound():
    w = torch.randn(64, 200) * torch.logspace(-4, 2, 64).view(-1, 1)
    p = W.quantize_fp8(w)
    assert p.q.dtype == torch.uint8 and p.scale.shape == (64, 1)
    deq = p.dequantize(torch.float64)
    bound = w.double().abs() / 16 + p.scale.double() * 2.0 ** -10
    assert ((deq - w.double()).abs() <= bound).all()
    # the max of each row maps to 448 exactly
    assert torch.allclose(deq.abs().amax(1), w.double().abs().amax(1), rtol=1e-6)


def test_zero_rows_and_bad_input():
    z = torch.zeros(3, 64)
    for kind in W.KINDS:
        assert torch.equal(W.quantize(z, kind).dequantize(), z)
    for bad in ("int3", "int4-g48", "int8-g32"):
        with pytest.raises(ValueError, match=f"--quantize '{bad}'"):
            W.quantize(z, bad)
    with pytest.raises(ValueError, match="expected torch.int8 codes"):
        W.PackedWeight("int8", torch.zeros(3, 64, dtype=torch.uint8), torch.ones(3, 1), None,
                       64, (3, 64))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_blocks_convert(name):
    qtype, rng = TYPE_IDS[name], np.random.default_rng(1)
    rows, cols = 7, 512
    blocks = torch.from_numpy(random_blocks(qtype, rows, cols, rng))
    ref = torch.from_numpy(dequantize(blocks.numpy(), qtype, cols))
    p = W.from_gguf(blocks, qtype, (rows, cols))
    got = p.dequantize(torch.float64)
    if name in ("Q5_K", "Q6_K"):  # requantized to int8 per 32 from the exact values
        assert (p.kind, p.group) == ("int8", 32)
        idx = torch.arange(cols) // 32
        # half a step, plus the float32 rounding of the value the step is taken from
        assert ((got - ref).abs() <= p.scale.double()[:, idx] / 2 + ref.abs() * 1.2e-7).all()
    else:  # the same numbers, as codes + scale (+ offset)
        assert p.kind == ("int8" if name == "Q8_0" else "int4") and p.group == 32
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7), (got - ref).abs().max()
        # Q8_0 keeps its 34 bytes per 32; int4 adds an offset (Q4_0: 20 B per 32 against
        # 18) or float32 scales (Q4_K: 192 B per 256 against 144)
        assert p.nbytes <= blocks.nbytes * {"Q8_0": 1, "Q4_0": 1.12, "Q4_1": 1}.get(name, 1.34)


def test_linear_fallback_cat_and_refusals():
    torch.manual_seed(0)
    a, b = W.quantize_int4(torch.randn(6, 96)), W.quantize_int4(torch.randn(10, 96))
    fused = torch.cat([a, b])
    assert isinstance(fused, W.PackedWeight) and fused.shape == (16, 96)
    x = torch.randn(2, 3, 96)
    want = x.double() @ torch.cat([a.dequantize(torch.float64), b.dequantize(torch.float64)]).t()
    assert torch.allclose(F.linear(x, fused).double(), want, atol=1e-4)
    mixed = torch.cat([a, W.quantize_int8(torch.randn(4, 96))])  # a Q4_K_M-like q|k|v
    assert isinstance(mixed, RowStack) and mixed.shape == (10, 96)
    assert F.linear(x, mixed).shape == (2, 3, 10)
    with pytest.raises(TypeError, match="does not take a PackedWeight"):
        torch.add(a, 1)
