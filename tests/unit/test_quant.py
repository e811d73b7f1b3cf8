"""GGUF block formats (and F16/BF16 tensors, blocks of one): the numpy reference against
gguf's own dequantize, and every C
kernel (plain C, AVX2, AVX-512 where the CPU has it) against float64
dequantize-then-matmul on random blocks, odd sizes and tails included.

Tolerances, relative to max |reference| of the output:
* float32 x (the default; K types always): 2e-6, float32 rounding of a dot product.
* int8 x (Q4_0 / Q4_1 / Q8_0, ``int8_x``) against x's own int8 quantization
  (quant_ref.quantize_q8): 2e-6: the integer dot products are exact, only the per-block
  float terms round;
* the same against the unquantized x: 3e-2, x's rounding (|dx| / 2 per input) through
  k random weights; measured ~5e-3 at k = 160. The int8 error itself is bounded per
  input in test_activation_quantization_error.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamadist.kernels import cpu_quant
from llamadist.kernels.quant import QuantizedTensor, RowStack
from llamadist.kernels.quant_ref import FORMATS, TYPE_IDS, dequantize, quantize_q8
from tests.quant_blocks import random_blocks

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler")
TYPES = list(FORMATS)


def levels() -> list[int]:
    best = cpu_quant.set_isa(-1)
    return list(range(best + 1))


@pytest.mark.parametrize("qtype", TYPES, ids=[FORMATS[t][0] for t in TYPES])
def test_reference_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(qtype)
    block = FORMATS[qtype][1]
    raw = random_blocks(qtype, 7, 3 * block, rng)
    ours = dequantize(raw, qtype, 3 * block)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))
    assert ours.dtype == np.float64
    np.testing.assert_array_equal(ours, theirs.astype(np.float64))


@pytest.mark.parametrize("qtype", TYPES, ids=[FORMATS[t][0] for t in TYPES])
def test_c_dequantize_equals_reference(qtype):
    """Every dispatch level (the 32-blocks and halves have AVX2 conversions)."""
    rng = np.random.default_rng(10 + qtype)
    cols = 3 * FORMATS[qtype][1] if FORMATS[qtype][1] > 1 else 43  # halves: odd, with tails
    raw = random_blocks(qtype, 5, cols, rng)
    ref = dequantize(raw, qtype, cols)
    try:
        for level in levels():
            cpu_quant.set_isa(level)
            got = QuantizedTensor(torch.from_numpy(raw), qtype, (5, cols)).dequantize().numpy()
            assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), level
    finally:
        cpu_quant.set_isa(-1)


def test_activation_quantization_error():
    """x -> int8 per 32: the C code equals the reference bit for bit, and |x - d q| <= d/2."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 96)) * rng.uniform(0.01, 10, (3, 96))).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block: d = 0, q = 0
    q, d, s = quantize_q8(x)
    cq, cd, cs = (t.numpy() for t in cpu_quant.quantize_q8(torch.from_numpy(x)))
    np.testing.assert_array_equal(cq, q)
    np.testing.assert_array_equal(cd, d)
    np.testing.assert_array_equal(cs, s)
    back = q.reshape(3, 3, 32).astype(np.float64) * d[..., None]
    err = np.abs(back - x.reshape(3, 3, 32))
    assert (err <= d[..., None] / 2 * (1 + 1e-6)).all()
    assert np.abs(q).max() <= 127 and (d[1, 0] == 0 and (q[1, :32] == 0).all())


@pytest.mark.parametrize("int8_x", [False, True], ids=["float-x", "int8-x"])
@pytest.mark.parametrize("qtype", TYPES, ids=[FORMATS[t][0] for t in TYPES])
@pytest.mark.parametrize("rows,nblocks,m", [(1, 1, 1), (37, 5, 1), (13, 3, 4), (64, 2, 33),
                                            (9, 77, 1), (11, 3, 9)])
def test_linear_against_float64(qtype, rows, nblocks, m, int8_x):
    """Every dispatch level; m = 33 rows is the prefill (tiled dequantize + GEMM) path;
    odd block counts exercise the AVX-512 path's single-block tail; m = 9 the GEMV's
    passes over several rows of x (8, 4 or 2 a pass) and their tail."""
    rng = np.random.default_rng(rows * 100 + nblocks + qtype)
    cols = nblocks * FORMATS[qtype][1]
    raw = random_blocks(qtype, rows, cols, rng)
    w = dequantize(raw, qtype, cols)
    x = rng.standard_normal((m, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    qt = QuantizedTensor(torch.from_numpy(raw), qtype, (rows, cols))
    qt.int8_x = int8_x
    exact = x.astype(np.float64) @ w.T + bias
    # only the GEMV (m <= 32) of the 32-blocks quantizes x; K types and tiles never do
    int8 = int8_x and FORMATS[qtype][1] == 32 and m <= 32
    want = exact
    if int8:
        q, d, _ = quantize_q8(x)
        xq = (q.reshape(m, -1, 32).astype(np.float64) * d[..., None]).reshape(m, cols)
        want = xq @ w.T + bias
    try:
        for level in levels():
            cpu_quant.set_isa(level)
            with torch.no_grad():
                y = F.linear(torch.from_numpy(x), qt, torch.from_numpy(bias)).numpy()
            scale = np.abs(exact).max()
            assert np.abs(y - want).max() <= 2e-6 * scale, level
            assert np.abs(y - exact).max() <= (3e-2 if int8 else 2e-6) * scale, level
    finally:
        cpu_quant.set_isa(-1)


ROWS_CASES = [(t, False) for t in TYPES] + [(t, True) for t in TYPES
                                             if FORMATS[t][1] == 32]


@pytest.mark.parametrize("qtype,int8_x", ROWS_CASES,
                         ids=[FORMATS[t][0] + ("-int8x" if i else "") for t, i in ROWS_CASES])
def test_gemv_rows_equal_one_row_at_a_time(qtype, int8_x):
    """Batch invariance of the GEMV (up to 32 rows of x): the kernels that meet several
    rows of x with each weight block decoded once (8, 4 or 2 rows a pass for the
    32-blocks, float32 or int8 x, 4 for the K types, 4 for 16-bit weights at AVX-512; 15
    rows take each width once) give every row the bits it gets alone, at every dispatch
    level (VNNI's own for int8 x), tails of rows and of inputs included."""
    rng = np.random.default_rng(200 + qtype)
    block = FORMATS[qtype][1]
    for n, cols in ((37, 3 * block), (5, 5 * block if block > 1 else 77)):
        raw = torch.from_numpy(random_blocks(qtype, n, cols, rng))
        bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        try:
            for level in levels():
                cpu_quant.set_isa(level)
                for m in (2, 5, 9, 15):
                    x = torch.from_numpy(rng.standard_normal((m, cols)).astype(np.float32))
                    y = cpu_quant.qlinear(x, raw, qtype, n, bias, int8_x)
                    alone = torch.cat([cpu_quant.qlinear(x[r:r + 1], raw, qtype, n, bias,
                                                         int8_x) for r in range(m)])
                    assert torch.equal(y, alone), (level, n, cols, m)
        finally:
            cpu_quant.set_isa(-1)


def test_embedding_and_cat_and_slices():
    rng = np.random.default_rng(5)
    q8 = TYPE_IDS["Q8_0"]
    raw = random_blocks(q8, 10, 64, rng)
    w = dequantize(raw, q8, 64)
    qt = QuantizedTensor(torch.from_numpy(raw), q8, (10, 64))
    ids = torch.tensor([[3, 3, 9], [0, 1, 2]])
    got = F.embedding(ids, qt).numpy()
    np.testing.assert_allclose(got, w[ids.numpy()], rtol=0, atol=1e-6)
    both = torch.cat([qt.rows(0, 4), qt.rows(4, 10)], dim=0)
    assert isinstance(both, QuantizedTensor) and torch.equal(both.blocks, qt.blocks)
    np.testing.assert_allclose(qt.cols(32, 64).dequantize().numpy(), w[:, 32:], atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 32"):
        qt.cols(16, 64)
    with pytest.raises(TypeError, match="does not take a QuantizedTensor"):
        torch.add(qt, 1)
    q40 = QuantizedTensor(torch.from_numpy(random_blocks(2, 3, 64, rng)), 2, (3, 64))
    f32 = torch.randn(2, 64)
    mixed = torch.cat([qt, q40, f32])  # parts of three formats: a RowStack
    assert isinstance(mixed, RowStack) and mixed.shape == (15, 64)
    x = torch.randn(3, 64)
    want = x.double() @ torch.cat([qt.dequantize(), q40.dequantize(), f32]).double().t()
    assert (F.linear(x, mixed).double() - want).abs().max() <= 2e-6 * want.abs().max()
