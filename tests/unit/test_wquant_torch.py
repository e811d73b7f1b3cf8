"""The torch-native weight-only products (llamadist.kernels.wquant_torch) on the CPU,
against float64 dequantize-then-matmul of the same PackedWeight: tinygemm's CPU variant
(the same scale/zero table and convention as CUDA's; CUDA's byte layout is checked
against gpt-fast's formula) and the int8 / fp8 scaled product, through PackedLinear as
the kernel pass builds it (also under torch.compile, fullgraph).

Tolerance, with S = |x| @ |W|^T per output: float32 x 2e-5 S; bfloat16 / float16 x
2^-7 (S + |ref|) (tinygemm's bf16 table rounds scale and zero by 2^-9; x, the cast codes'
products and y round to x's dtype)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from llamadist.config import ConfigError, RuntimeConfig
from llamadist.kernels import wquant as W
from llamadist.kernels import wquant_torch as WT
from llamadist.kernels.quant_ref import TYPE_IDS
from tests.quant_blocks import random_blocks


def _linear(pw: W.PackedWeight, act_dtype: torch.dtype, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(pw.shape[1], pw.shape[0], bias=bias)
    del lin.weight
    lin.weight = pw
    if bias:
        lin.bias = nn.Parameter(torch.randn(pw.shape[0]).to(act_dtype), requires_grad=False)
    return W.as_packed_linear(lin, "torch", act_dtype)


def _check(lin: nn.Linear, m: int, dtype: torch.dtype) -> None:
    n, k = lin.weight.shape
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + n)).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (m, n)
    wd = lin.weight.dequantize(torch.float64)
    ref = x.double() @ wd.t() + (0 if lin.bias is None else lin.bias.double())
    s = x.double().abs() @ wd.abs().t()
    tol = 2e-5 * s if dtype == torch.float32 else 2.0 ** -7 * (s + ref.abs())
    err = (y.double() - ref).abs()
    assert (err <= tol + 1e-6).all(), f"max error {err.max():.3g}, at most {tol.max():.3g}"


def _q8_0(n: int, k: int) -> W.PackedWeight:
    b = random_blocks(TYPE_IDS["Q8_0"], n, k, np.random.default_rng(n + k))
    return W.from_gguf(torch.from_numpy(b), TYPE_IDS["Q8_0"], (n, k))


def _q4_0(n: int, k: int) -> W.PackedWeight:
    b = random_blocks(TYPE_IDS["Q4_0"], n, k, np.random.default_rng(n + k))
    return W.from_gguf(torch.from_numpy(b), TYPE_IDS["Q4_0"], (n, k))


def _w(n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * k)
    return torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n).view(-1, 1)


@pytest.mark.parametrize("make", [lambda: W.quantize_int4(_w(48, 256)),
                                  lambda: W.quantize_int4(_w(32, 384), 32),
                                  lambda: W.quantize(_w(16, 576), "int4-g64"),
                                  lambda: W.quantize(_w(16, 512), "int4-g256"),
                                  lambda: _q4_0(16, 512)],
                         ids=["g128", "g32", "g64", "g256", "Q4_0"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tinygemm_int4_against_float64(make, dtype):
    dtype = getattr(torch, dtype)
    lin = _linear(make(), dtype, bias=True)
    assert lin.path == "tinygemm" and lin.tg_scales_zeros.dtype == dtype
    for m in (1, 3, 17):
        _check(lin, m, dtype)


def test_tinygemm_table_and_cuda_bytes():
    """zero = offset + 8 scale (tinygemm's w = (c - 8) scale + zero), table (G, N, 2); the
    CUDA bytes put input 2j in the high nibble, as gpt-fast packs codes."""
    pw = W.quantize_int4(_w(8, 64), 32)
    t = WT.tinygemm_scales_zeros(pw.scale, pw.offset, torch.float32)
    assert t.shape == (2, 8, 2)
    codes = W.unpack_int4(pw.q, 64).to(torch.float64)
    idx = torch.arange(64) // 32
    w = (codes - 8) * t[idx, :, 0].t().double() + t[idx, :, 1].t().double()
    assert torch.allclose(w, pw.dequantize(torch.float64), atol=1e-6)
    c = W.unpack_int4(pw.q, 64)
    assert torch.equal(WT.tinygemm_bytes(pw.q), (c[:, ::2] << 4 | c[:, 1::2]).to(torch.uint8))


def test_int4_shapes_tinygemm_cannot_take_keep_triton_path():
    assert W.product_path(W.quantize_int4(_w(24, 256)), "torch") == "triton"   # N % 16
    assert W.product_path(W.quantize_int4(_w(16, 200), 40), "torch") == "triton"
    # SmolLM2's K = 576 is not a multiple of 128 or 256: those groups take the Triton
    # kernel (a dequantized matmul off CUDA); 32 and 64 tinygemm
    for group, path in ((32, "tinygemm"), (64, "tinygemm"), (128, "triton"), (256, "triton")):
        assert W.product_path(W.quantize(_w(16, 576), f"int4-g{group}"), "torch") == path
    assert W.product_path(W.quantize_int8(_w(16, 64)), "triton") == "triton"
    lin = _linear(W.quantize_int4(_w(12, 256)), torch.float32)
    _check(lin, 2, torch.float32)   # the dequantized fallback on CPU


@pytest.mark.parametrize("make", [lambda: W.quantize_int8(_w(40, 300)),
                                  lambda: W.quantize_int8(_w(24, 300), 32),  # short tail
                                  lambda: _q8_0(16, 256),
                                  lambda: W.quantize_fp8(_w(40, 300))],
                         ids=["int8", "int8_g32", "Q8_0", "fp8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_scaled_int8_fp8_against_float64(make, dtype):
    dtype = getattr(torch, dtype)
    lin = _linear(make(), dtype, bias=True)
    assert lin.path == "scaled"
    for m in (1, 5):
        _check(lin, m, dtype)


def test_torch_paths_compile_fullgraph():
    x = torch.randn(2, 3, 256)
    for pw in (W.quantize_int4(_w(32, 256)), W.quantize_int8(_w(32, 256)),
               W.quantize_fp8(_w(32, 256))):
        lin = _linear(pw, torch.float32, bias=True)
        eager = lin(x)
        assert eager.shape == (2, 3, 32)
        compiled = torch.compile(lin, fullgraph=True, backend="eager")(x)
        assert torch.equal(eager, compiled)


def test_runtime_config_wquant(monkeypatch):
    assert RuntimeConfig().wquant == "torch"
    monkeypatch.setenv("LLAMADIST_WQUANT", "triton")
    assert RuntimeConfig().wquant == "triton"
    assert RuntimeConfig(wquant="torch").wquant == "torch"
    with pytest.raises(ConfigError):
        RuntimeConfig(wquant="cublas")


def test_int4_product_by_rows():
    """CUDA int4 calls by rows (where Triton reads tinygemm's layout): tinygemm for decode's
    few rows (more of them on a wide up-projection, N >= 4 K), the tensor-core tiles for
    batched decode, W dequantized + cuBLAS beyond."""
    for n, k, tiny in ((8192, 8192, WT.TINYGEMM_MAX_M), (4096, 14336, WT.TINYGEMM_MAX_M),
                       (57344, 8192, WT.WIDE_TINYGEMM_MAX_M)):
        assert [WT.int4_product(m, n, k) for m in (1, tiny)] == ["tinygemm"] * 2
        assert [WT.int4_product(m, n, k) for m in (tiny + 1, WT.MMA_MAX_M)] == ["mma"] * 2
        assert WT.int4_product(WT.MMA_MAX_M + 1, n, k) == "dequant"
        assert WT.int4_product(4096, n, k) == "dequant"
    assert 1 <= WT.TINYGEMM_MAX_M < WT.WIDE_TINYGEMM_MAX_M < WT.MMA_MAX_M


@pytest.mark.parametrize("switch", [False, True, "qkv", "glu"])
def test_the_norm_switch_chooses_which_projections_take_the_norm(switch, monkeypatch):
    """int4_norm under wquant_torch.NORM_PROLOGUE: off, it leaves the norm to its own kernel
    (None); on, q | k | v and gate | up take it in their kernel (launch_norm); "qkv", only
    q | k | v does; "glu", only gate | up; never past NORM_ROWS rows. (The device's part
    stood in for: its kernels are tested in tests/unit/test_int4_rows_emulated.py and on a
    GPU.)"""
    from llamadist.kernels import cuda_int4 as C
    launched = []
    monkeypatch.setattr(WT, "NORM_PROLOGUE", switch)
    monkeypatch.setattr(WT, "NORM_ROWS", C.NORM_MAX_ROWS)
    monkeypatch.setattr(WT, "_rows_take", lambda x, n, cuda_rows: True)
    monkeypatch.setattr(WT, "variant_ok", lambda *a, **kw: True)
    monkeypatch.setitem(WT._GLU_CHECKED, 0, True)
    monkeypatch.setattr(C, "device_index", lambda device: 0)
    monkeypatch.setattr(C, "norm_fits", lambda *a: True)
    monkeypatch.setattr(C, "launch_norm", lambda x, r, w, eps, p, sz, n, g, t, glu=False, **kw:
                        launched.append(glu) or (x, x.new_zeros(x.shape[0], n // (1 + glu))))
    x = torch.zeros(1, 2, 256, dtype=torch.bfloat16)
    w = torch.ones(256, dtype=torch.bfloat16)
    for glu in (False, True):
        got = WT.int4_norm(x, None, w, 1e-5, None, None, 64, 512, True, glu)
        takes = switch is True or switch == ("glu" if glu else "qkv")
        assert (got is not None) == takes, glu
        if takes:
            assert got[1].shape == (1, 2, 256 if glu else 512)
    assert launched == [g for g in (False, True) if switch in (True, "glu" if g else "qkv")]
    monkeypatch.setattr(WT, "NORM_ROWS", 1)  # x's two rows: past the fold's rows
    assert all(WT.int4_norm(x, None, w, 1e-5, None, None, 64, 512, True, glu) is None
               for glu in (False, True))
