"""cuda_int4.int4_rows (CUDA C++ compiled by NVRTC, on tinygemm's int4 words) against the
float64 product of the weight it encodes, in every form (warps, n-tiles a block, stages,
rows 9-16, codes - 8 first), on shapes whose n-tiles do not fill the last block and whose
k-tiles are fewer than the warps; inside a CUDA graph; through PackedLinear; and against
tinygemm's own error on the same words.

Tolerance, per output, with S = |x| @ |W|^T: |y - ref64| <= 2^-8 |ref64| + 2^-16 S (y is
rounded to bf16 once, 2^-9; the float32 sums of (128 + code) x lose ~2^-24 of 136 S)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from llamadist.kernels import cuda_int4 as C
from llamadist.kernels import wquant as W
from llamadist.kernels import wquant_torch as WT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = torch.device("cuda", 0)


def _case(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n).view(-1, 1)
    pw = W.quantize_int4(w, group)
    tiles = WT._inner_k_tiles(k)
    packed = WT.tinygemm_pack(pw.q.to(DEV), k)
    sz = WT.tinygemm_scales_zeros(pw.scale, pw.offset).to(DEV)
    # the weight the words and the bf16 table encode: (code - 8) s + z
    s = sz.double().cpu()[..., 0].t().repeat_interleave(group, 1)
    z = sz.double().cpu()[..., 1].t().repeat_interleave(group, 1)
    codes = W.unpack_int4(pw.q, k).double()
    return packed, sz, (codes - 8) * s + z, tiles


def _check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> float:
    x64 = x.double().cpu()
    ref = x64 @ w64.t()
    bound = 2**-8 * ref.abs() + 2**-16 * (x64.abs() @ w64.abs().t())
    err = (y.double().cpu() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst ratio " \
        f"{(err / bound).max():.3g}"
    return err.max().item()


def _replayed(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) captured in a CUDA graph (after a warm-up on a side stream, as torch asks) on
    a zeroed copy of x, then replayed on x."""
    static = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(static)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static)
    static.copy_(x)
    g.replay()
    return out


SHAPES = [(48, 96, 32),     # tiles 2, 3 k-tiles (< warps)
          (80, 192, 64),    # tiles 4, 10 n-tiles
          (272, 640, 128),  # tiles 8, 34 n-tiles
          (128, 768, 256),  # a group over two k-tiles
          (4096, 4096, 128)]


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 16])
def test_rows_against_float64(n, k, group, m):
    packed, sz, w64, tiles = _case(n, k, group)
    x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
    _check(C.launch(x, packed, sz, n, group, tiles), x, w64)


@pytest.mark.parametrize("warps,nb,stages", [(4, 1, 4), (4, 2, 2), (8, 2, 3), (4, 4, 3),
                                             (16, 1, 2), (2, 3, 5)])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("w_as_a", [True, False])
def test_every_form(warps, nb, stages, exact, w_as_a, monkeypatch):
    """Each form, codes - 8 first or not, W as the A operand (up to 8 rows, even n-tiles)
    or x."""
    monkeypatch.setattr(C, "CODES_EXACT", exact)
    for n, k, group in SHAPES[:4]:
        packed, sz, w64, tiles = _case(n, k, group, seed=n)
        for m in (1, 5, 12):
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            cfg = C.RowsConfig(warps, nb, C.row_capacity(m), stages, w_as_a)
            _check(C.launch(x, packed, sz, n, group, tiles, cfg), x, w64)


@pytest.mark.parametrize("warps,nb,stages,kind", [(8, 4, 2, 1), (8, 1, 3, 1), (16, 2, 2, 1),
                                                  (4, 3, 4, 1), (8, 4, 3, 2), (16, 1, 4, 2),
                                                  (8, 2, 2, 2)])
@pytest.mark.parametrize("pdl", [False, True])
def test_k_pair_forms(warps, nb, stages, kind, pdl, monkeypatch):
    """KP (a warp's step two consecutive k-tiles of one n-tile, through the ring or
    straight into registers; tests/unit/test_int4_rows_emulated.py runs the same source on
    the CPU) at 1-4 rows, plain and as a dependent launch, codes - 8 first or not; through
    the KPAIR switch inside a CUDA graph."""
    if pdl and torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("programmatic dependent launches need sm_90")
    monkeypatch.setattr(C, "PDL", pdl)
    for exact in (False, True):
        monkeypatch.setattr(C, "CODES_EXACT", exact)
        for n, k, group in SHAPES + [(64, 256, 32)]:
            packed, sz, w64, tiles = _case(n, k, group, seed=n + 1)
            for m in (1, 2, 3, 4):
                x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
                cfg = C.RowsConfig(warps, nb, C.row_capacity(m), stages, kpair=kind)
                _check(C.launch(x, packed, sz, n, group, tiles, cfg), x, w64)
    monkeypatch.setattr(C, "KPAIR", lambda rows, n, k: (warps, nb, stages, kind))
    _check(_replayed(lambda x: C.launch(x, packed, sz, n, group, tiles), x), x, w64)


@pytest.mark.parametrize("cfg", [None, C.RowsConfig(8, 4, 1, 4), C.RowsConfig(8, 4, 4, 2, kpair=1),
                                 C.RowsConfig(8, 2, 2, 3, kpair=2)],
                         ids=lambda c: c.label() if c else "rule")
@pytest.mark.parametrize("pdl", [False, True])
def test_rope_in_the_epilogue_against_the_product_then_rope(cfg, pdl, monkeypatch):
    """ROPE: q and k leave int4_rows rotated, the bits of eager_fused.rope on the product's
    q and k (the rule's form with the ROPE kernel's own spill check, or the same explicit
    form for both), v as the product writes it, at 1-4 rows (past 8 too for the rule:
    x as the A operand); inside a CUDA graph."""
    from llamadist.kernels import eager_fused
    if pdl and torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("programmatic dependent launches need sm_90")
    monkeypatch.setattr(C, "PDL", pdl)
    d, hq, hkv, k, group = 128, 8, 2, 512, 128
    n, rot = (hq + 2 * hkv) * d, (hq + hkv) * d
    packed, sz, w64, tiles = _case(n, k, group, seed=3)
    # an explicit form takes up to its own rows; the rule's, past 8 rows too
    for m in (1, 3, 4, 12) if cfg is None else range(1, min(cfg.rows, 4) + 1):
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
        cos, sin = (torch.randn(m, d, device=DEV).to(torch.bfloat16) for _ in range(2))
        form = cfg if cfg is not None else C._rule_form(0, C.row_capacity(m), n, k, tiles,
                                                         group, C.pdl_launch(0), C._switches(),
                                                         rope=d)
        y = C.launch(x, packed, sz, n, group, tiles, form)
        q, kk = eager_fused.rope(y[:, :hq * d].view(m, hq, d),
                                 y[:, hq * d:rot].view(m, hkv, d), cos, sin)
        want = torch.cat([q.view(m, -1), kk.view(m, -1), y[:, rot:]], dim=1)
        got = C.launch(x, packed, sz, n, group, tiles, cfg, rope=(cos, sin, rot))
        assert torch.equal(got, want), (m, form)
    assert torch.equal(_replayed(
        lambda x: C.launch(x, packed, sz, n, group, tiles, cfg, rope=(cos, sin, rot)), x), want)


@pytest.mark.parametrize("m", [1, 8, 16])
def test_shifts_as_multiplies_give_the_same_bits(m, monkeypatch):
    """HI_SHIFT (the decode's shifts as IMAD.HI) changes which pipe runs them, not one bit
    of the result."""
    packed, sz, w64, tiles = _case(272, 640, 128, seed=3)
    x = torch.randn(m, 640, device=DEV).to(torch.bfloat16)
    cfg = C.RowsConfig(8, 4, C.row_capacity(m), 3)
    y = C.launch(x, packed, sz, 272, 128, tiles, cfg)
    monkeypatch.setattr(C, "HI_SHIFT", True)
    assert torch.equal(C.launch(x, packed, sz, 272, 128, tiles, cfg), y)
    _check(y, x, w64)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("kpair", [None, (8, 4, 2, 1), (8, 2, 3, 2)])
def test_norm_in_the_kernel_against_the_norm_then_the_product(m, glu, with_residual, pdl,
                                                               kpair, monkeypatch):
    """launch_norm: h = x + residual exactly as eager_fused's add + RMSNorm kernel stores
    it (every element written, by block 0), and the product of RMSNorm(h) within a bf16
    step of that kernel's norm, then the product (the norm's sums in another order); the
    plain product also against float64. In the rule's form and in k-pair forms (KPAIR:
    their own buffer of x, in k-tiles)."""
    monkeypatch.setattr(C, "KPAIR", None if kpair is None else lambda r, n, k: kpair)
    from llamadist.kernels import eager_fused
    monkeypatch.setattr(C, "PDL", pdl)
    n, k, group = 272, 640, 128
    packed, sz, w64, tiles = _case(n, k, group, seed=11)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    res = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16) if with_residual else None
    gamma = (1 + torch.randn(k, generator=gen) / 4).to(DEV, torch.bfloat16)
    h, y = C.launch_norm(x, res, gamma, 1e-5, packed, sz, n, group, tiles, glu=glu)
    s, normed = eager_fused.add_rms_norm(x, res, gamma, 1e-5)
    assert torch.equal(h, s)
    ref = C.launch(normed, packed, sz, n, group, tiles, glu=glu).float()
    assert (y.float() - ref).abs().max() <= 2**-6 * ref.abs().max(), (m, glu, with_residual)
    if not glu:
        _check(y, normed, w64)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_min_blocks_give_the_same_bits(m, glu, monkeypatch):
    """MIN_BLOCKS (registers for three blocks an SM, spilling where ptxas must) changes
    where values live, not one bit of the result, plain or as gate | up."""
    packed, sz, w64, tiles = _case(272, 640, 128, seed=5)
    x = torch.randn(m, 640, device=DEV).to(torch.bfloat16)
    cfg = C.RowsConfig(8, 4, C.row_capacity(m), 2)
    y = C.launch(x, packed, sz, 272, 128, tiles, cfg, glu=glu)
    monkeypatch.setattr(C, "MIN_BLOCKS", 3)
    assert torch.equal(C.launch(x, packed, sz, 272, 128, tiles, cfg, glu=glu), y)
    if not glu:
        _check(y, x, w64)


@pytest.mark.skipif(torch.cuda.get_device_capability(0)[0] < 9 if torch.cuda.is_available()
                    else True, reason="bulk copies need sm_90")
@pytest.mark.parametrize("warps,nb,stages", [(8, 4, 4), (4, 2, 3), (4, 3, 2), (2, 1, 5)])
def test_bulk_copies_give_the_same_bits(warps, nb, stages, monkeypatch):
    """BULK (the ring filled by TMA bulk copies on an mbarrier a slot) moves the same bytes
    to the same places as cp.async: the same bits out, on every shape and row count."""
    for n, k, group in SHAPES:
        packed, sz, w64, tiles = _case(n, k, group, seed=k)
        for m in (1, 3, 8, 16):
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            cfg = C.RowsConfig(warps, nb, C.row_capacity(m), stages)
            monkeypatch.setattr(C, "BULK", False)
            y = C.launch(x, packed, sz, n, group, tiles, cfg)
            monkeypatch.setattr(C, "BULK", True)
            assert torch.equal(C.launch(x, packed, sz, n, group, tiles, cfg), y), \
                (n, k, group, m, cfg)
        _check(y, x, w64)


@pytest.mark.parametrize("warps,nb,stages", [(8, 4, 4), (4, 3, 3)])
def test_staggered_k_order(warps, nb, stages, monkeypatch):
    """STAGGER (each block's warps start on a rotated k-tile) sums the same products in
    another order: within the bound of float64, on every shape and row count."""
    monkeypatch.setattr(C, "STAGGER", True)
    for n, k, group in SHAPES:
        packed, sz, w64, tiles = _case(n, k, group, seed=k + 1)
        for m in (1, 5, 16):
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            cfg = C.RowsConfig(warps, nb, C.row_capacity(m), stages)
            _check(C.launch(x, packed, sz, n, group, tiles, cfg), x, w64)


@pytest.mark.parametrize("warps,nb,stages", [(8, 4, 4), (4, 2, 3), (4, 3, 2), (8, 1, 4)])
@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_persistent_blocks_give_the_same_bits(warps, nb, stages, blocks, monkeypatch):
    """A persist form (a grid of one wave, or of 1 or 3 blocks, each looping over its
    tiles with the ring running on between them) sums each tile as its own block would:
    the same bits, on every shape (n-tiles short of the last tile) and row count."""
    monkeypatch.setattr(C, "PERSIST_BLOCKS", blocks)
    for n, k, group in SHAPES:
        packed, sz, w64, tiles = _case(n, k, group, seed=k + 3)
        for m in (1, 3, 8, 16):
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            cfg = C.RowsConfig(warps, nb, C.row_capacity(m), stages)
            y = C.launch(x, packed, sz, n, group, tiles, cfg)
            persist = C.launch(x, packed, sz, n, group, tiles, replace(cfg, persist=True))
            assert torch.equal(persist, y), (n, k, group, m, cfg, blocks)
        _check(y, x, w64)
    assert C.resident_blocks(0, 8, 128, C.RowsConfig(8, 4, 1, 4, persist=True)) >= \
        torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.skipif(torch.cuda.get_device_capability(0)[0] < 9 if torch.cuda.is_available()
                    else True, reason="programmatic dependent launches need sm_90")
@pytest.mark.parametrize("warps,nb,stages,persist,stagger,prefetch",
                         [(8, 4, 4, False, False, 0), (4, 2, 3, False, False, 0),
                          (4, 3, 2, False, True, 0), (8, 4, 4, True, False, 0),
                          (8, 4, 2, False, False, 1 << 30), (16, 4, 2, False, False, 1 << 16)])
def test_dependent_launch_waits_for_x(warps, nb, stages, persist, stagger, prefetch,
                                      monkeypatch):
    """PDL (launched while the kernel before it may run: the words issued first, x only
    after griddepcontrol.wait): the same bits as a plain launch, eagerly and in a CUDA
    graph where x is the output of the GEMM just before it; with the L2 prefetch of every
    block's words, or of the first blocks' (L2_PREFETCH), too."""
    monkeypatch.setattr(C, "STAGGER", stagger)
    monkeypatch.setattr(C, "L2_PREFETCH", prefetch)
    for n, k, group in SHAPES:
        packed, sz, w64, tiles = _case(n, k, group, seed=k + 5)
        for m in (1, 3, 8, 16):
            cfg = C.RowsConfig(warps, nb, C.row_capacity(m), stages, persist=persist)
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            monkeypatch.setattr(C, "PDL", False)
            y = C.launch(x, packed, sz, n, group, tiles, cfg)
            monkeypatch.setattr(C, "PDL", True)
            assert C.pdl_launch(0)
            assert torch.equal(C.launch(x, packed, sz, n, group, tiles, cfg), y), \
                (n, k, group, m, cfg)
        # a graph of x = a @ b (cuBLAS) and the dependent launch on x, replayed on three
        # a's: a read of x before the GEMM ends would see the last replay's x
        a = torch.zeros(m, 8192, device=DEV, dtype=torch.bfloat16)
        b = torch.randn(8192, k, device=DEV).to(torch.bfloat16) / 64
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            C.launch(a @ b, packed, sz, n, group, tiles, cfg)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            x = a @ b
            y = C.launch(x, packed, sz, n, group, tiles, cfg)
        for seed in range(3):
            a.copy_(torch.randn(m, 8192, device=DEV))
            g.replay()
            monkeypatch.setattr(C, "PDL", False)
            assert torch.equal(y, C.launch(x, packed, sz, n, group, tiles, cfg)), (n, k, seed)
            monkeypatch.setattr(C, "PDL", True)
        _check(y, x, w64)


def test_a_ring_just_under_48_kib_launches():
    """45 KiB of ring and 4 KiB of static sums: past the default limit together (the
    attribute must be raised whatever the ring's own size)."""
    packed, sz, w64, tiles = _case(256, 1024, 32)
    cfg = C.RowsConfig(4, 4, 1, 4)
    assert 40 * 1024 < cfg.ring_bytes(tiles, 32) < 48 * 1024
    x = torch.randn(1, 1024, device=DEV).to(torch.bfloat16)
    _check(C.launch(x, packed, sz, 256, 32, tiles, cfg), x, w64)


def test_a_form_too_large_for_the_device_is_refused():
    packed, sz, _, tiles = _case(256, 1024, 128)
    x = torch.randn(16, 1024, device=DEV).to(torch.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        C.launch(x, packed, sz, 256, 128, tiles, C.RowsConfig(16, 4, 16, 8))


def test_no_worse_than_tinygemm():
    """On the same words and table, the largest error against float64 is within 1.5x of
    tinygemm's (which rounds each weight to bf16 before its mma)."""
    packed, sz, w64, tiles = _case(4096, 4096, 128, seed=3)
    x = torch.randn(4, 4096, device=DEV).to(torch.bfloat16)
    ref = x.double().cpu() @ w64.t()
    ours = (C.launch(x, packed, sz, 4096, 128, tiles).double().cpu() - ref).abs().max()
    tg = torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
    theirs = (tg.double().cpu() - ref).abs().max()
    assert ours <= 1.5 * theirs, (ours.item(), theirs.item())


def test_in_a_cuda_graph_and_through_packed_linear():
    n, k, group = 512, 1024, 128
    pw = W.quantize_int4(torch.randn(n, k) * 0.05, group)
    lin = nn.Linear(k, n, bias=True, device="meta")
    del lin.weight
    lin.weight = pw.to(DEV)
    lin.bias = nn.Parameter(torch.randn(n, device=DEV).to(torch.bfloat16))
    lin = W.as_packed_linear(lin, "torch", torch.bfloat16)
    assert lin.path == "tinygemm" and lin.tg_rows, "int4_rows should serve the decode rows"
    w64 = pw.dequantize(torch.float64)
    x = torch.randn(2, k, device=DEV).to(torch.bfloat16)
    assert WT.int4_product(2, n, k, lin.tg_rows) == "rows"
    eager = lin(x)
    torch.testing.assert_close(_replayed(lin, x), eager, rtol=0, atol=0)
    ref = x.double().cpu() @ w64.t() + lin.bias.double().cpu()
    # the quantized table (bf16 scale and zero) differs from pw's float32 by 2^-9 relative
    torch.testing.assert_close(eager.double().cpu(), ref, rtol=2**-6, atol=2**-6)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    from llamadist.kernels import eager_fused
    return eager_fused.silu_mul(gu)


@pytest.mark.parametrize("cfg", [None, C.RowsConfig(8, 4, 1, 2), C.RowsConfig(16, 4, 4, 2),
                                 C.RowsConfig(4, 2, 16, 4), C.RowsConfig(8, 4, 8, 4,
                                                                         persist=True),
                                 C.RowsConfig(8, 4, 4, 2, kpair=True),
                                 C.RowsConfig(8, 4, 4, 3, kpair=2)])
@pytest.mark.parametrize("pdl", [False, True])
def test_glu_same_bits_as_product_then_silu(cfg, pdl, monkeypatch):
    """GLU (a block's first n-tiles gate's, the same of up's after them; silu(gate) * up
    in its sums' epilogue): the bits of the product followed by eager_fused.silu_mul, in
    the rule's form and others (16 rows with x as the A operand, persistent blocks over
    short last tiles), plain and as a dependent launch, and in a CUDA graph."""
    if pdl and torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("programmatic dependent launches need sm_90")
    monkeypatch.setattr(C, "PDL", pdl)
    monkeypatch.setattr(C, "PERSIST_BLOCKS", 3 if cfg is not None and cfg.persist else 0)
    for n, k, group in SHAPES:  # N / 16: 3, 5, 17, 8, 256 gate n-tiles
        packed, sz, w64, tiles = _case(n, k, group, seed=n + k)
        for m in (1, 3, 8, 16):
            form = cfg if cfg is None or m <= cfg.rows else None
            x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
            want = _silu_mul(C.launch(x, packed, sz, n, group, tiles, form))
            got = C.launch(x, packed, sz, n, group, tiles, form, glu=True)
            assert got.shape == (m, n // 2) and torch.equal(got, want), (n, k, group, m, form)
    assert torch.equal(_replayed(
        lambda x: C.launch(x, packed, sz, n, group, tiles, form, glu=True), x), want)


def test_glu_through_the_mlp(monkeypatch):
    """A fused MLP's tinygemm gate_up_proj writes silu(gate) * up itself at the decode
    rows (past them: None, and the MLP runs the product, then silu * up); the MLP's
    output is the same either way."""
    from llamadist.kernels import eager_fused
    from llamadist.model.llama import MLP
    n, k, group = 2 * 272, 640, 128
    pw = W.quantize_int4(torch.randn(n, k) * 0.05, group)
    lin = nn.Linear(k, n, bias=False, device="meta")
    del lin.weight
    lin.weight = pw.to(DEV)
    lin = W.as_packed_linear(lin, "torch", torch.bfloat16)
    assert lin.path == "tinygemm" and lin.tg_rows
    for m in (1, 8, 9, WT.ROWS_MAX_M + 1):
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
        glu = lin.silu_mul(x)
        assert (glu is None) == (m > WT.ROWS_MAX_M), m
        if glu is not None:
            assert torch.equal(glu, eager_fused.silu_mul(lin(x)))
    cfg = type("Cfg", (), dict(hidden_size=k, intermediate_size=n // 2, mlp_bias=False))
    mlp = MLP(cfg).to(DEV, torch.bfloat16)
    mlp.gate_up_proj = lin
    mlp.down_proj = nn.Linear(n // 2, k, bias=False, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(1, 2, k, device=DEV).to(torch.bfloat16)
    unfused = mlp.down_proj(eager_fused.silu_mul(lin(x)))
    mlp.silu_mul = eager_fused.silu_mul
    calls, real = [], C.int4_rows_glu
    monkeypatch.setattr(C, "int4_rows_glu", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(mlp(x), unfused) and calls == [1]


def _int4_attention(d: int = 64, hq: int = 4, hkv: int = 2, hidden: int = 256,
                    group: int = 64):
    """A fused Attention on CUDA whose q | k | v is an int4 PackedLinear on tinygemm's words,
    with eager_fused's RoPE kernel, and a flat batch's ``attend`` that checks q / k / v's
    shapes (each token over itself, q + k + v of its heads: q, k and v all count)."""
    from llamadist.kernels import eager_fused
    from llamadist.model.llama import Attention
    cfg = type("Cfg", (), dict(hidden_size=hidden, attention_bias=False, head_dim=d,
                               q_size=hq * d, kv_size=hkv * d))
    attn = Attention(cfg).to(DEV, torch.bfloat16)
    n = (hq + 2 * hkv) * d
    lin = nn.Linear(hidden, n, bias=False, device="meta")
    del lin.weight
    lin.weight = W.quantize_int4(torch.randn(n, hidden) * 0.05, group).to(DEV)
    attn.qkv_proj = W.as_packed_linear(lin, "torch", torch.bfloat16)
    attn.qkv_split = (hq * d, hkv * d, hkv * d)
    assert attn.qkv_proj.path == "tinygemm" and attn.qkv_proj.tg_rows
    attn.rotary_qk = eager_fused.rope

    class Flat:
        @staticmethod
        def attend(q, k, v):
            assert q.shape[1:] == (hq, d) and k.shape[1:] == v.shape[1:] == (hkv, d)
            return q + (k + v).repeat_interleave(hq // hkv, dim=1)

    return attn, Flat()


def _angles(m: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, 1, m, d) bf16 of random angles on the device (RotaryTable's shape)."""
    ang = torch.rand(1, 1, m, d // 2, device=DEV) * 100
    ang = torch.cat((ang, ang), -1)
    return ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)


def test_rope_through_the_attention(monkeypatch):
    """With wquant_torch.ROPE_EPILOGUE, a fused Attention's tinygemm q | k | v projection
    rotates q and k itself at the decode rows (past them, or with the switch off: None,
    and the attention runs the product, then eager_fused.rope); the attention's output is
    the same bits either way, and inside a CUDA graph."""
    attn, flat = _int4_attention()
    calls, real = [], C.int4_rows_rope
    monkeypatch.setattr(C, "int4_rows_rope", lambda *a: calls.append(1) or real(*a))
    for m in (1, 4, 9, WT.ROWS_MAX_M + 1):
        x = torch.randn(1, m, 256, device=DEV).to(torch.bfloat16)
        cos, sin = _angles(m, 64)
        monkeypatch.setattr(WT, "ROPE_EPILOGUE", False)
        apart = attn(x, cos, sin, flat, 0, None)
        assert calls == []
        monkeypatch.setattr(WT, "ROPE_EPILOGUE", True)
        fused = attn(x, cos, sin, flat, 0, None)
        assert calls == ([1] if m <= WT.ROWS_MAX_M else []), m
        assert torch.equal(fused, apart), m
        calls.clear()
    x = x[:, :1]
    cos, sin = cos[..., :1, :], sin[..., :1, :]
    want = attn(x, cos, sin, flat, 0, None)
    assert torch.equal(_replayed(lambda x: attn(x, cos, sin, flat, 0, None), x), want)


@pytest.mark.parametrize("rope", [False, True])
def test_norm_through_the_attention(rope, monkeypatch):
    """With wquant_torch.NORM_PROLOGUE (and ROPE_EPILOGUE), Attention.forward_normed takes
    add + RMSNorm in q | k | v's kernel (and RoPE with it) at up to NORM_MAX_ROWS rows:
    the residual stream the same bits as eager_fused's norm kernel gives, the output
    within a bf16 step of the norm's kernel, then the attention (the norm's sums in
    another order); past those rows the norm's kernel runs."""
    from llamadist.kernels import eager_fused
    from llamadist.model.llama import RMSNorm
    attn, flat = _int4_attention()
    norm = RMSNorm(256, 1e-5).to(DEV, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(256) / 4)
    norm.add_norm = eager_fused.add_rms_norm
    monkeypatch.setattr(WT, "ROPE_EPILOGUE", rope)
    monkeypatch.setattr(WT, "KV_EPILOGUE", False)
    monkeypatch.setattr(WT, "NORM_ROWS", C.NORM_MAX_ROWS)
    # the variant's device check launches it too: made before the launches are counted
    assert WT.variant_ok(torch.device(DEV), norm=True, rope=rope)
    calls, real = [], C.launch_norm
    monkeypatch.setattr(C, "launch_norm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for m in (1, 4, 5):
        x, res = (torch.randn(1, m, 256, device=DEV).to(torch.bfloat16) for _ in range(2))
        cos, sin = _angles(m, 64)
        monkeypatch.setattr(WT, "NORM_PROLOGUE", False)
        s0, out0 = attn.forward_normed(norm, x, res, cos, sin, flat, 0, None)
        monkeypatch.setattr(WT, "NORM_PROLOGUE", True)
        s1, out1 = attn.forward_normed(norm, x, res, cos, sin, flat, 0, None)
        taken = m <= C.NORM_MAX_ROWS
        assert len(calls) == taken and (not taken or (calls[0]["rope"] is not None) == rope)
        assert torch.equal(s1, s0)
        err = (out1.float() - out0.float()).abs().max().item()
        assert err <= 2**-6 * out0.float().abs().max().item(), (m, err)
        calls.clear()


@pytest.mark.parametrize("pdl", [False, True])
def test_k_and_v_into_the_paged_cache_as_the_write_kernel(pdl, monkeypatch):
    """KVW: q | k | v's kernel with RoPE stores k's and v's heads in the paged cache at the
    rows' slots (int32, as the graphs' buffers hold them), the same bits as eager_fused.rope
    then the paged write kernel store, y as RoPE alone writes it; inside a CUDA graph."""
    from llamadist.kernels import eager_fused
    from llamadist.kernels.gpu import paged_attention as PK
    if pdl and torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("programmatic dependent launches need sm_90")
    monkeypatch.setattr(C, "PDL", pdl)
    d, hq, hkv, k, group, bs = 128, 8, 2, 512, 128, 16
    n, qcols, rot = (hq + 2 * hkv) * d, hq * d, (hq + hkv) * d
    packed, sz, _, tiles = _case(n, k, group, seed=4)
    for m in (1, 3, 4):
        x = torch.randn(m, k, device=DEV).to(torch.bfloat16)
        cos, sin = (torch.randn(m, d, device=DEV).to(torch.bfloat16) for _ in range(2))
        slots = torch.randperm(6 * bs, device=DEV)[:m].to(torch.int32)
        want_cache = torch.randn(2, 6, hkv, bs, d, device=DEV).to(torch.bfloat16)
        cache = want_cache.clone()
        y = C.launch(x, packed, sz, n, group, tiles)
        q, kk = eager_fused.rope(y[:, :qcols].view(m, hq, d), y[:, qcols:rot].view(m, hkv, d),
                                 cos, sin)
        PK.write_kv(kk, y[:, rot:].view(m, hkv, d), want_cache, slots)
        got = C.launch(x, packed, sz, n, group, tiles, rope=(cos, sin, rot),
                       kv=(cache, slots, qcols))
        assert torch.equal(got, C.launch(x, packed, sz, n, group, tiles, rope=(cos, sin, rot)))
        assert torch.equal(cache, want_cache), m
    cache.zero_()
    _replayed(lambda x: C.launch(x, packed, sz, n, group, tiles, rope=(cos, sin, rot),
                                 kv=(cache, slots, qcols)), x)
    expect = torch.zeros_like(cache)
    blocks, offsets = slots.long() // bs, slots.long() % bs
    expect[:, blocks, :, offsets] = want_cache[:, blocks, :, offsets]
    assert torch.equal(cache, expect)
