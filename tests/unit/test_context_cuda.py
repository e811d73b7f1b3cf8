"""The CUDA path of context parallelism's partial attention, without CUDA: which fused
kernel fits which inputs, the aligned bias, and ``sdpa_lse``'s handling of what the
kernels return (the memory-efficient kernel pads lse to 32 rows) with the aten ops
replaced by the float64 reference; the dispatch and the empty cases of
``partial_attention``; staging through host memory. tests/gpu/test_cp_gpu.py runs the
real kernels."""

from __future__ import annotations

import math

import pytest
import torch

from llamadist.parallel import context
from llamadist.parallel.context import (fusable, merge_partials, partial_attention,
                                        reference_partial, via_host)
from llamadist.parallel.context_cuda import BIAS_ALIGN, aligned_bias, cuda_kernel, sdpa_lse


@pytest.mark.parametrize("dtype,d,biased,want", [
    (torch.bfloat16, 128, False, "flash"), (torch.float16, 64, False, "flash"),
    (torch.bfloat16, 128, True, "efficient"), (torch.float32, 64, False, "efficient"),
    (torch.float32, 8, True, "efficient"), (torch.float64, 64, False, None),
    (torch.bfloat16, 12, False, None), (torch.float32, 512, False, None)])
def test_kernel_choice(dtype, d, biased, want):
    assert cuda_kernel(dtype, d, biased) == want


def test_aligned_bias_rows_start_aligned_and_heads_broadcast():
    bias = torch.randn(3, 5, 37)
    ab = aligned_bias(bias, 4, torch.bfloat16)
    assert ab.shape == (3, 4, 5, 37) and ab.dtype == torch.bfloat16
    assert ab.stride(-2) % BIAS_ALIGN == 0 and ab.stride(1) == 0
    assert torch.equal(ab[:, 2], bias.to(torch.bfloat16))


def _fake_ops(monkeypatch, calls):
    """Stand-ins for the aten ops (float64 reference math, same return layout; the
    efficient one pads lse to 32 rows with garbage, as the kernel does)."""
    def math_(q, k, v, scale, causal, bias):
        s = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B, H, T, S)
        if causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
        if bias is not None:
            s = s + bias.double()
        return (torch.softmax(s, -1) @ v.double()).to(q.dtype), torch.logsumexp(s, -1).float()

    def flash(q, k, v, dropout, causal, debug, *, scale):
        calls.append(("flash", q.dtype, causal))
        return math_(q, k, v, scale, causal, None) + (None,) * 7

    def efficient(q, k, v, bias, lse_wanted, dropout, causal, *, scale):
        assert lse_wanted and (bias is None or (bias.dtype == q.dtype
                                                and bias.stride(-2) % BIAS_ALIGN == 0))
        calls.append(("efficient", q.dtype, causal))
        out, lse = math_(q, k, v, scale, causal, bias)
        pad = -(-lse.shape[-1] // 32) * 32 - lse.shape[-1]
        return out, torch.cat([lse, torch.full((*lse.shape[:-1], pad), 7.0)], -1), None, None

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", flash,
                        raising=False)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention",
                        efficient, raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "bias"])
def test_sdpa_lse_through_the_cuda_layout(monkeypatch, dtype, kind):
    """partial_attention's CUDA route (GQA folded into rows or repeated, the bias repeated
    per folded head, lse trimmed, fp32 results) with the kernels replaced."""
    calls = []
    _fake_ops(monkeypatch, calls)
    monkeypatch.setattr(context, "_kernel", sdpa_lse)  # what a CUDA tensor gets
    g = torch.Generator().manual_seed(0)
    t = 9
    s = t if kind == "causal" else 13
    q = torch.randn(2, t, 8, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, s, 2, 16, generator=g).to(dtype) for _ in range(2))
    mask = None
    if kind == "bias":
        mask = torch.rand(2, t, s, generator=g) > 0.3
        mask[0, 4] = False  # an empty row
    got = context.fused_partial(q, k, v, mask, None, kind == "causal")
    want = reference_partial(q.double(), k.double(), v.double(), mask, None,
                             causal=kind == "causal")
    assert got[0].dtype == got[1].dtype == torch.float32 and got[1].shape == (2, t, 8)
    assert calls and all(c[1] == torch.float32 for c in calls)  # the CPU path upcasts
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got[0].double() - want[0]).abs().max() < tol
    fin = torch.isfinite(want[1])
    assert torch.equal(fin, torch.isfinite(got[1]))
    assert (got[1].double()[fin] - want[1][fin]).abs().max() < 1e-4


def test_sdpa_lse_refuses_what_no_kernel_takes():
    q = torch.zeros(1, 2, 3, 12)
    with pytest.raises(ValueError, match="no fused CUDA attention"):
        sdpa_lse(q, q, q, 1.0)
    with pytest.raises(ValueError, match="T == S"):
        sdpa_lse(q, q[:, :, :2], q[:, :, :2], 1.0, causal=True)


def test_dispatch_and_empty_inputs():
    assert fusable(torch.zeros(1, 1, 8))
    assert not fusable(torch.zeros(1, 1, 8, device="meta"))  # no fused kernel there
    q, k = torch.randn(0, 4, 8), torch.randn(5, 2, 8)
    out, lse = partial_attention(q, k, k)  # no query rows
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
    out, lse = partial_attention(torch.randn(3, 4, 8), k[:0], k[:0])  # an empty shard
    assert not out.any() and torch.isneginf(lse).all()
    merged, _ = merge_partials([(out, lse), partial_attention(torch.randn(3, 4, 8), k, k)])
    assert torch.isfinite(merged).all()
    with pytest.raises(ValueError, match="H_kv divide H"):
        partial_attention(torch.randn(3, 4, 8), torch.randn(5, 3, 8), torch.randn(5, 3, 8))
    with pytest.raises(ValueError, match="D must match"):
        partial_attention(torch.randn(3, 4, 8), torch.randn(5, 2, 4), torch.randn(5, 2, 4))


def test_via_host_only_for_device_tensors_over_gloo(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert not via_host(torch.zeros(2), None)
        assert via_host(torch.zeros(2, device="meta"), None)
        got = context.all_gather(torch.arange(3.0), None)
        assert len(got) == 1 and torch.equal(got[0], torch.arange(3.0))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_lse_half_inputs_take_flash(monkeypatch, causal):
    calls = []
    _fake_ops(monkeypatch, calls)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 7, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    out, lse = sdpa_lse(q, k, v, 0.25, causal)
    assert calls == [("flash", torch.bfloat16, causal)]
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (1, 4, 7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril() if causal else None
    want = reference_partial(q.double().transpose(1, 2), k.double().transpose(1, 2),
                             v.double().transpose(1, 2), mask, 0.25)
    assert torch.allclose(lse.double(), want[1].transpose(1, 2), atol=1e-4)


def test_kv_splits():
    from llamadist.parallel.context_cuda import kv_splits
    assert kv_splits(8 * 8, 4, 32768) == 4  # a decode batch: 64 blocks -> 4 chunks
    assert kv_splits(8 * 8, 4, 1500) == 1  # few keys
    assert kv_splits(32 * 8, 1, 32768) == 1  # the GPU is full already
    assert kv_splits(64, 4, 4099) == 4  # no divisor near 4: remainder keys apart
    assert kv_splits(64, 4, 3 * 1031) == 3  # a divisor near 4


@pytest.mark.parametrize("s,n", [(40, 4), (43, 4), (43, 1)])
def test_split_kv_equals_one_call(s, n):
    """Key chunks merged by lse equal attention over all keys, with length masks that
    leave whole chunks (and one whole row) without a visible key."""
    from llamadist.parallel.context_cuda import split_kv

    def cpu_call(q, k, v, scale, causal, bias):
        return context._kernel(q, k, v, scale, causal, bias)
    g = torch.Generator().manual_seed(2)
    b, h, t, d = 3, 2, 4, 8
    q, k, v = (torch.randn(b, h, n_, d, generator=g) for n_ in (t, s, s))
    lens = torch.tensor([s, 7, 0])  # sequence 2 sees nothing at all
    mask = torch.arange(s).view(1, 1, -1) < lens.view(-1, 1, 1)  # (B, 1, S)
    mask = mask.expand(b, t, s)
    bias = torch.zeros(b, t, s).masked_fill(~mask, float("-inf"))
    out, lse = split_kv(q, k, v, 0.3, bias, n, cpu_call)
    want = reference_partial(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                             v.transpose(1, 2).double(), mask, 0.3)
    assert out.shape == (b, h, t, d) and lse.shape == (b, h, t)
    assert torch.allclose(out.transpose(1, 2).double(), want[0], atol=1e-5)
    assert torch.isneginf(lse[2]).all() and not out[2].any()
    assert torch.allclose(lse[:2].transpose(1, 2).double(), want[1][:2], atol=1e-5)
