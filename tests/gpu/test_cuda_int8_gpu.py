"""cuda_int8.int8_rows (CUDA C++ compiled by NVRTC, int8 W with one scale a row on the
tensor cores) against the float64 product, in every form, on shapes whose 16-row tiles do
not fill the last block and whose 64-input chunks are fewer than the warps; as a
dependent launch (the same bits); inside a CUDA graph; and through the Triton op's
launch with ``wquant_triton.INT8_ROWS``.

Tolerance, per output, with S = |x| @ |q|^T scale: |y - ref64| <= 2^-8 |ref64| + 2^-20 S
(the products are exact, summed in float32; y is rounded to bf16 once, 2^-9)."""

from __future__ import annotations

import pytest
import torch

from llamadist.kernels import cuda_int4 as C
from llamadist.kernels import cuda_int8 as C8
from llamadist.kernels import wquant as W
from llamadist.kernels import wquant_triton as T
from tests.gpu.test_cuda_int4_gpu import _replayed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = torch.device("cuda", 0)
SHAPES = [(40, 64), (48, 192), (272, 640), (4096, 4096), (1000, 14336)]


def _case(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pw = W.quantize_int8(torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n)
                         .view(-1, 1))
    return pw.q.to(DEV), pw.scale.to(DEV), pw.dequantize(torch.float64)


def _check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> None:
    x64 = x.double().cpu()
    ref = x64 @ w64.t()
    bound = 2**-8 * ref.abs() + 2**-20 * (x64.abs() @ w64.abs().t())
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst ratio " \
        f"{(err / bound).max():.3g}"


def test_device_check_passes():
    assert C8.ok(DEV)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_rows_against_float64(n, k, m):
    q, s, w64 = _case(n, k)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    assert C8.supports(x, q, s, n)
    _check(C8.launch(x, q, s, n), x, w64)


@pytest.mark.parametrize("warps,nt,pf", [(8, 2, 2), (8, 1, 2), (4, 2, 3), (4, 1, 1),
                                         (2, 2, 1), (8, 2, 3)])
def test_every_form(warps, nt, pf):
    for n, k in SHAPES[:4]:
        q, s, w64 = _case(n, k, seed=n)
        for m in (1, 4, 7):
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            form = C8.Int8Form(warps, nt, pf, 1 << (m - 1).bit_length())
            _check(C8.launch(x, q, s, n, form), x, w64)


@pytest.mark.skipif(torch.cuda.get_device_capability(0)[0] < 9 if torch.cuda.is_available()
                    else True, reason="dependent launches need sm_90")
@pytest.mark.parametrize("m", [1, 3, 8])
def test_dependent_launch_same_bits_and_in_a_graph(m, monkeypatch):
    """As a dependent launch (W's first chunks before the wait): the same bits as plain,
    eagerly and in a graph right after the cuBLAS GEMM that writes its x."""
    q, s, w64 = _case(4096, 4096, seed=m)
    x = torch.randn(m, 4096, device=DEV).to(torch.bfloat16)
    monkeypatch.setattr(C, "PDL", False)
    y = C8.launch(x, q, s, 4096)
    monkeypatch.setattr(C, "PDL", True)
    assert torch.equal(C8.launch(x, q, s, 4096), y)
    a = torch.randn(m, 512, device=DEV).to(torch.bfloat16)
    b = torch.randn(512, 4096, device=DEV).to(torch.bfloat16) / 16
    for pdl in (True, False):
        monkeypatch.setattr(C, "PDL", pdl)
        out = _replayed(lambda a_: C8.launch(a_ @ b, q, s, 4096), a)
        assert torch.equal(out, C8.launch(a @ b, q, s, 4096))
    _check(y, x, w64)


def test_through_the_op_with_the_switch(monkeypatch):
    """wquant_triton's launch takes int8_rows for int8 with one scale a row and bf16 x of
    1-8 rows where INT8_ROWS is set; bias, float32 x and grouped int8 keep the GEMV."""
    q, s, w64 = _case(272, 640)
    x = torch.randn(6, 640, device=DEV).to(torch.bfloat16)
    monkeypatch.setattr(T, "INT8_ROWS", True)
    calls = []
    real = C8.launch
    monkeypatch.setattr(C8, "launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = T.launch(x, "int8", q, s, None, None, 640, 272, 640)
    assert calls and torch.equal(y, real(x, q, s, 272))
    _check(y, x, w64)
    calls.clear()
    T.launch(x.float(), "int8", q, s, None, None, 640, 272, 640)
    T.launch(x, "int8", q, s, None, torch.zeros(272, device=DEV, dtype=torch.bfloat16),
             640, 272, 640)
    assert not calls
