"""int4_rows.cu's own source run on the CPU (tests/cuda_emu.hpp: each CUDA thread a
coroutine, cp.async landing at its wait, the warp's collectives traded through barriers;
tests/cuda_emu.py builds and launches it): every kind of form against the float64 product
of the weight the words encode, at the GPU test's tolerance (tests/gpu/test_cuda_int4_gpu.py),
on shapes with an odd number of k-tiles, fewer k-tiles than warps, groups within and across
k-tiles, and n-tiles that do not fill the last block; gate | up against silu(gate) * up of
the product; and the emulator's own checks (a read past a buffer, a slot read before its
copies land); the add + RMSNorm prologue (NORM) against the norm then the product; RoPE in
the epilogue (ROPE) against the product then the formula, with the norm too; k and v into
the paged cache (KVW) at the rows' slots; the L2 prefetch (PREFETCH) changing no bit and
staying in bounds; and wquant_torch's device checks of those variants against the emulated
kernel and faults. The forms the GPU has timed check the
emulator; the k-pair forms (KP), NORM, ROPE and KVW are checked here before any GPU has
run them."""

from __future__ import annotations

import pytest
import torch

from llamadist.kernels import cuda_int4 as C
from llamadist.kernels import wquant as W
from llamadist.kernels import wquant_torch as WT
from tests import cuda_emu as E

pytestmark = pytest.mark.skipif(E.available() is not None, reason=str(E.available()))

# (n, k, group): k-tiles 3 (< warps, odd), 3 at 4 tiles, 5 at 8 (odd), a group over two
# k-tiles, four groups a k-tile; n-tiles 6, 10, 34, 16, 8
SHAPES = [(48, 96, 32), (80, 192, 64), (272, 640, 128), (128, 768, 256), (64, 256, 32)]


def _case(n: int, k: int, group: int, seed: int = 0):
    """tinygemm's words (CUDA's layout), the bf16 table and the float64 weight they encode."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n).view(-1, 1)
    pw = W.quantize_int4(w, group)
    tiles = WT._inner_k_tiles(k)
    codes = W.unpack_int4(pw.q, k)
    packed = WT.tinygemm_layout(codes.to(torch.int32), tiles)
    sz = WT.tinygemm_scales_zeros(pw.scale, pw.offset)
    s = sz.double()[..., 0].t().repeat_interleave(group, 1)
    z = sz.double()[..., 1].t().repeat_interleave(group, 1)
    return packed, sz, (codes.double() - 8) * s + z, tiles


def _check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> None:
    x64 = x.double()
    ref = x64 @ w64.t()
    bound = 2**-8 * ref.abs() + 2**-16 * (x64.abs() @ w64.abs().t())
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"worst error / bound {(err / bound).max():.3g}"


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


# (form, rows, dependent launch, codes - 8 first): the rule's one-row forms (8 and 16
# warps, W as the A operand), x as the A operand past 8 rows, a persist form, and k-pair
# forms of 1-4 rows, an odd number of n-tiles a block, 2-4 stages, through the ring (KP 1)
# and straight into registers (KP 2)
FORMS = [(C.RowsConfig(8, 4, 1, 2), 1, True, False),
         (C.RowsConfig(16, 4, 1, 2), 1, False, True),
         (C.RowsConfig(4, 2, 16, 4), 12, False, False),
         (C.RowsConfig(8, 4, 8, 4, persist=True), 5, False, False),
         (C.RowsConfig(8, 4, 1, 2, kpair=True), 1, True, False),
         (C.RowsConfig(8, 1, 1, 3, kpair=True), 1, False, False),
         (C.RowsConfig(4, 3, 4, 3, kpair=True), 3, False, False),
         (C.RowsConfig(16, 2, 2, 2, kpair=True), 2, True, False),
         (C.RowsConfig(2, 4, 4, 4, kpair=True), 4, False, True),
         (C.RowsConfig(8, 4, 1, 2, kpair=2), 1, True, False),
         (C.RowsConfig(4, 3, 4, 3, kpair=2), 3, False, True),
         (C.RowsConfig(16, 1, 2, 4, kpair=2), 2, True, False)]


@pytest.mark.parametrize("cfg,m,pdl,exact", FORMS,
                         ids=[f"{c.label()}m{m}{'d' if p else ''}{'x' if e else ''}"
                              for c, m, p, e in FORMS])
def test_the_kernel_against_float64(cfg, m, pdl, exact):
    for i, (n, k, group) in enumerate(SHAPES):
        packed, sz, w64, tiles = _case(n, k, group, seed=i)
        x = _x(m, k, seed=100 + i)
        _check(E.launch(x, packed, sz, n, group, tiles, cfg, pdl=pdl, exact=exact), x, w64)


def _silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """int4_rows.cu's silu_times on the product's bf16 outputs, in float32."""
    g = gate.float()
    act = (g / (1 + torch.exp(-g))).to(torch.bfloat16).float()
    return (act * up.float()).to(torch.bfloat16)


@pytest.mark.parametrize("cfg,m", [(C.RowsConfig(8, 4, 1, 2, kpair=True), 1),
                                   (C.RowsConfig(4, 2, 4, 3, kpair=True), 3),
                                   (C.RowsConfig(8, 2, 4, 3, kpair=2), 4),
                                   (C.RowsConfig(8, 4, 1, 2), 1)], ids=lambda v: str(v))
def test_gate_up_is_silu_of_the_product(cfg, m):
    """GLU (a block's first NB / 2 n-tiles gate's, the rest up's) against silu(gate) * up
    of the same form's product: the same sums, then the same roundings (the host's expf
    against torch's exp: a bf16 step at most)."""
    n, k, group = 160, 640, 128
    packed, sz, w64, tiles = _case(n, k, group, seed=7)
    x = _x(m, k, seed=8)
    y = E.launch(x, packed, sz, n, group, tiles, cfg).float()
    want = _silu_times(y[:, :n // 2], y[:, n // 2:]).float()
    got = E.launch(x, packed, sz, n, group, tiles, cfg, glu=True, pdl=True).float()
    assert got.shape == (m, n // 2)
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2**-100))) - 7)
    assert bool(((got - want).abs() <= step).all())
    assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("kind", [1, 2])
def test_a_read_past_the_words_is_caught(kind):
    """The emulator's bounds: words one n-tile short (the last n-tile's reads fall past
    them) is an error that names the read, not a wrong number (cp.async, ld.global)."""
    n, k, group = 48, 96, 32
    packed, sz, _, tiles = _case(n, k, group)
    with pytest.raises(RuntimeError, match="outside every buffer"):
        E.launch(_x(1, k, 0), packed[:-1].contiguous(), sz, n, group, tiles,
                 C.RowsConfig(8, 4, 1, 2, kpair=kind))


@pytest.mark.parametrize("glu", [False, True])
def test_the_l2_prefetch_changes_no_bit(glu):
    """PREFETCH (a dependent launch's first blocks bring their tiles into the L2 before
    the wait): a hint, so the product is the same bits with none, the first block's and
    every block's; each prefetch lies inside the words and the table (the emulator's
    bounds), n-tiles clamped past N included (6 n-tiles in blocks of 4)."""
    cfg = C.RowsConfig(8, 4, 1, 2)
    for i, (n, k, group) in enumerate([(48, 96, 32), (272, 640, 128), (64, 2048, 128)]):
        packed, sz, w64, tiles = _case(n, k, group, seed=20 + i)
        x = _x(1, k, seed=30 + i)
        want = E.launch(x, packed, sz, n, group, tiles, cfg, glu=glu, pdl=True)
        block = 4 * packed.numel() * 4 // (n // 8)  # an n-tile's words x NB = 4
        for budget in (block, 1 << 30):
            got = E.launch(x, packed, sz, n, group, tiles, cfg, glu=glu, pdl=True,
                           prefetch=budget)
            assert torch.equal(got, want), (n, k, budget)
        if not glu:
            _check(want, x, w64)


def test_a_prefetch_past_the_words_is_caught_and_the_budget_keeps_blocks_out():
    """Words 16 bytes short: the last n-tile's prefetch (its whole run, before the wait,
    ahead of the ring's copies of its last k-tile) reads past them, an error naming the
    prefetch; with a budget of the first block only, that block's prefetch is in bounds
    and the ring's own copy is what reads past them."""
    n, k, group = 64, 2048, 128  # 16 k-tiles: more than the warps take before the wait
    packed, sz, _, tiles = _case(n, k, group)
    short = packed.flatten()[:-4].contiguous()
    cfg = C.RowsConfig(8, 4, 1, 2)
    with pytest.raises(RuntimeError, match="cp.async.bulk.prefetch: .* outside every buffer"):
        E.launch(_x(1, k, 0), short, sz, n, group, tiles, cfg, pdl=True, prefetch=1 << 30)
    with pytest.raises(RuntimeError, match="^int4_rows .*: cp.async: .* outside every buffer"):
        E.launch(_x(1, k, 0), short, sz, n, group, tiles, cfg, pdl=True,
                 prefetch=4 * packed.numel() * 4 // (n // 8))


def test_a_slot_read_before_its_copies_land_is_caught():
    """A cp.async lands at its wait, so the kernel's text with one group too few waited
    for reads slots still full of the block's start pattern (0xFF bytes: NaN), and fails
    the check that the kernel as it is passes."""
    source = C.SOURCE.read_text()
    early = source.replace("wait_group<STAGES - 1>();", "wait_group<STAGES>();")
    assert early != source
    n, k, group = 80, 192, 64
    packed, sz, w64, tiles = _case(n, k, group)
    x, cfg = _x(1, k, 1), C.RowsConfig(4, 2, 1, 3, kpair=True)
    _check(E.launch(x, packed, sz, n, group, tiles, cfg), x, w64)
    with pytest.raises(AssertionError):
        _check(E.launch(x, packed, sz, n, group, tiles, cfg, source=early), x, w64)


def _add_rms_norm(x, res, gamma, eps):
    """(h, RMSNorm(h)) as eager_fused.add_rms_norm rounds them: h = bf16(x + res), then
    bf16(gamma * bf16(h * rsqrt(mean(h^2) + eps)))."""
    h = x if res is None else (x.float() + res.float()).to(torch.bfloat16)
    hf = h.float()
    r = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return h, (gamma.float() * (hf * r).to(torch.bfloat16).float()).to(torch.bfloat16)


@pytest.mark.parametrize("cfg", [C.RowsConfig(8, 4, 4, 2), C.RowsConfig(16, 4, 4, 4),
                                 C.RowsConfig(4, 2, 4, 3, w_as_a=False),
                                 C.RowsConfig(8, 4, 4, 2, kpair=1),
                                 C.RowsConfig(4, 2, 4, 3, kpair=2)],
                         ids=C.RowsConfig.label)
@pytest.mark.parametrize("glu", [False, True])
def test_the_norm_in_the_kernel(cfg, glu):
    """NORM (add + RMSNorm in the kernel's prologue, x's whole rows in shared memory): h =
    x + residual exactly (block 0 stores it), and the product of the norm within a bf16
    step of the norm then the product (the norm's sums in another order), at 1-4 rows,
    with and without a residual, W as the A operand or x, and the k-pair forms (their own
    buffer of x in k-tiles)."""
    n, k, group = 160, 640, 128
    packed, sz, w64, tiles = _case(n, k, group, seed=11)
    for m in (1, 3, 4):
        for with_residual in (False, True):
            gen = torch.Generator().manual_seed(10 * m + with_residual)
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            res = torch.randn(m, k, generator=gen).to(torch.bfloat16) if with_residual \
                else None
            gamma = (1 + torch.randn(k, generator=gen) / 4).to(torch.bfloat16)
            h, y = E.launch_norm(x, res, gamma, 1e-5, packed, sz, n, group, tiles, cfg,
                                 glu=glu, pdl=m == 3)
            want_h, normed = _add_rms_norm(x, res, gamma, 1e-5)
            assert torch.equal(h, want_h)
            ref = E.launch(normed, packed, sz, n, group, tiles, cfg, glu=glu).float()
            assert (y.float() - ref).abs().max() <= 2**-6 * ref.abs().max(), (m, with_residual)
            if not glu:
                _check(y, normed, w64)


def _rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """eager_fused.rope's bits on the first ``rot`` columns of y (heads of D = cos's width):
    x cos + rotate_half(x) sin, each product and the sum rounded to bf16."""
    m, n = y.shape
    d = cos.shape[-1]
    heads = y[:, :rot].float().view(m, rot // d, d)
    half = torch.cat([-heads[..., d // 2:], heads[..., :d // 2]], dim=-1)
    a = (heads * cos.float()[:, None, :]).to(torch.bfloat16).float()
    b = (half * sin.float()[:, None, :]).to(torch.bfloat16).float()
    out = y.clone()
    out[:, :rot] = (a + b).to(torch.bfloat16).view(m, rot)
    return out


@pytest.mark.parametrize("cfg,m", [(C.RowsConfig(8, 4, 1, 2), 1), (C.RowsConfig(4, 2, 4, 3), 3),
                                   (C.RowsConfig(4, 2, 16, 4), 12),
                                   (C.RowsConfig(8, 4, 4, 2, kpair=1), 4),
                                   (C.RowsConfig(8, 2, 2, 3, kpair=2), 2)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("d", [64, 128])
def test_rope_in_the_epilogue(cfg, m, d):
    """ROPE (q and k rotated as the kernel writes them, a block's n-tiles pairs of a head's
    column d and d + D / 2): the bits of the same form's product then eager_fused.rope's
    formula, on q's and k's heads; v's columns as the product writes them. Heads of 64 and
    128 (4 q heads, 2 k, 2 v), W as the A operand or x, the k-pair forms, dependent."""
    n, k, group = 8 * d, 256, 64
    rot = 6 * d
    packed, sz, w64, tiles = _case(n, k, group, seed=d + m)
    x = _x(m, k, seed=m)
    gen = torch.Generator().manual_seed(d)
    cos = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    sin = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    y = E.launch(x, packed, sz, n, group, tiles, cfg)
    got = E.launch(x, packed, sz, n, group, tiles, cfg, pdl=True, rope=(cos, sin, rot))
    assert torch.equal(got, _rope(y, cos, sin, rot))
    assert not torch.equal(got[:, :rot], y[:, :rot])  # (the rotation did something)



@pytest.mark.parametrize("cfg", [C.RowsConfig(8, 4, 4, 4), C.RowsConfig(8, 4, 4, 2, kpair=1)],
                         ids=C.RowsConfig.label)
def test_the_norm_and_rope_in_one_kernel(cfg):
    """NORM and ROPE together (q | k | v's launch_norm with rope): the same h, and the
    bits of the norm kernel's own product followed by eager_fused.rope's formula."""
    d, k, group = 64, 256, 64
    n, rot = 8 * d, 6 * d
    packed, sz, _, tiles = _case(n, k, group, seed=5)
    gen = torch.Generator().manual_seed(6)
    for m in (1, 4):
        x, res = (torch.randn(m, k, generator=gen).to(torch.bfloat16) for _ in range(2))
        gamma = (1 + torch.randn(k, generator=gen) / 4).to(torch.bfloat16)
        cos, sin = (torch.randn(m, d, generator=gen).to(torch.bfloat16) for _ in range(2))
        h, y = E.launch_norm(x, res, gamma, 1e-5, packed, sz, n, group, tiles, cfg)
        h2, got = E.launch_norm(x, res, gamma, 1e-5, packed, sz, n, group, tiles, cfg,
                                pdl=True, rope=(cos, sin, rot))
        assert torch.equal(h2, h) and torch.equal(got, _rope(y, cos, sin, rot)), m


@pytest.mark.parametrize("cfg,norm", [(C.RowsConfig(8, 4, 4, 2), False),
                                      (C.RowsConfig(8, 4, 4, 3, kpair=2), False),
                                      (C.RowsConfig(8, 4, 4, 2), True),
                                      (C.RowsConfig(4, 2, 16, 4), False)],
                         ids=lambda v: v.label() if isinstance(v, C.RowsConfig) else str(v))
def test_k_and_v_into_the_paged_cache(cfg, norm):
    """KVW (with ROPE): y as ROPE alone writes it, and k's heads (rotated) and v's in the
    paged cache (2, blocks, H_kv, bs, D) at each row's slot, every other element of the
    cache untouched; the cache a slice of a larger one (its strides, not its shape)."""
    d, hq, hkv, k, group, bs = 64, 4, 2, 256, 64, 4
    n, qcols, rot = (hq + 2 * hkv) * d, hq * d, (hq + hkv) * d
    packed, sz, _, tiles = _case(n, k, group, seed=8)
    gen = torch.Generator().manual_seed(9)
    cases = ((1, [6]), (4, [0, 13, 7, 18])) if cfg.rows <= 4 else \
        ((12, [0, 13, 7, 18, 1, 2, 19, 5, 10, 11, 16, 3]),)  # (x the mma's A operand)
    for m, slots in cases:
        x, res = (torch.randn(m, k, generator=gen).to(torch.bfloat16) for _ in range(2))
        gamma = (1 + torch.randn(k, generator=gen) / 4).to(torch.bfloat16)
        cos, sin = (torch.randn(m, d, generator=gen).to(torch.bfloat16) for _ in range(2))
        whole = torch.full((2, 7, hkv, bs, d), -7.0, dtype=torch.bfloat16)
        # slots int32 (as the graphs' buffers hold them) and int64
        cache, slot_t = whole[:, 1:6], torch.tensor(slots, dtype=[torch.int32, torch.int64][m > 1])
        rope, kv = (cos, sin, rot), (cache, slot_t, qcols)
        if norm:
            _, want = E.launch_norm(x, res, gamma, 1e-5, packed, sz, n, group, tiles, cfg,
                                    rope=rope)
            _, got = E.launch_norm(x, res, gamma, 1e-5, packed, sz, n, group, tiles, cfg,
                                   pdl=True, rope=rope, kv=kv)
        else:
            want = E.launch(x, packed, sz, n, group, tiles, cfg, rope=rope)
            got = E.launch(x, packed, sz, n, group, tiles, cfg, pdl=True, rope=rope, kv=kv)
        assert torch.equal(got, want)
        expect = torch.full_like(whole, -7.0)
        for r, slot in enumerate(slots):
            for which, lo in ((0, qcols), (1, rot)):
                expect[which, 1 + slot // bs, :, slot % bs] = want[r, lo:lo + hkv * d].view(
                    hkv, d)
        assert torch.equal(whole, expect), m


def test_the_rows_device_check_runs_both_forms_and_names_a_fault(monkeypatch):
    """wquant_torch's check of int4_rows itself (what lets int4 take it: int4_rows_ok)
    runs the rule's forms at 3 rows (W the mma's A operand) and at ROWS_MAX_M (past 8: x
    the A operand), here by the emulator: it passes the kernel as it is, with its GLU
    variant, and names the rows where a form is off."""
    def pack(q, k):  # the CUDA words, from our packed bytes
        return WT.tinygemm_layout(W.unpack_int4(q, k).to(torch.int32), WT._inner_k_tiles(k))

    def emulated(x, packed, sz, n, group, tiles, cfg=None, glu=False):
        return E.launch(x, packed, sz, n, group, tiles,
                        cfg or C.rows_config(x.shape[0], n, x.shape[1]), glu=glu)

    forms = []
    monkeypatch.setattr(WT, "tinygemm_pack", pack)
    monkeypatch.setattr(WT, "_GLU_CHECKED", {})
    monkeypatch.setattr(C, "launch", lambda x, *a, **kw: forms.append(x.shape[0]) or
                        emulated(x, *a, **kw))
    cpu = torch.device("cpu")
    assert WT._rows_case(cpu) is None and WT._GLU_CHECKED == {None: True}
    assert sorted(set(forms)) == sorted({3, WT.ROWS_MAX_M}) and WT.ROWS_MAX_M > 8
    monkeypatch.setattr(C, "launch", lambda x, *a, **kw: emulated(x, *a, **kw) *
                        (1.1 if x.shape[0] > 8 else 1))
    assert f"at {WT.ROWS_MAX_M} rows" in WT._rows_case(cpu)


VARIANTS = [(False, True, False), (False, True, True), (True, False, False),
            (True, True, False), (True, True, True)]  # (norm, rope, kv)


def test_the_variants_device_checks_take_the_kernel_and_refuse_faults(monkeypatch, caplog):
    """wquant_torch's check of each variant (what lets the decode step use it: variant_ok)
    passes the kernel as it is, run by the emulator in the form the rule gives the check's
    case, and refuses a kernel that rotates the other way (cos and sin swapped) or stores
    a row at the wrong slot."""
    from llamadist.kernels import eager_fused

    def pack(q, k):  # the CUDA words, from our packed bytes
        return WT.tinygemm_layout(W.unpack_int4(q, k).to(torch.int32), WT._inner_k_tiles(k))

    def form(x, n):
        return C.rows_config(x.shape[0], n, x.shape[1])

    def emulated(x, packed, sz, n, group, tiles, cfg=None, glu=False, rope=None, kv=None):
        return E.launch(x, packed, sz, n, group, tiles, cfg or form(x, n), glu=glu, rope=rope,
                        kv=kv)

    def emulated_norm(x, res, gamma, eps, packed, sz, n, group, tiles, glu=False, rope=None,
                      kv=None):
        return E.launch_norm(x, res, gamma, eps, packed, sz, n, group, tiles, form(x, n),
                             glu=glu, rope=rope, kv=kv)

    def faulty(fn, fault):  # fn with its rope / kv arguments changed by fault
        return lambda *a, rope=None, kv=None, **kw: fn(*a, **fault(rope, kv), **kw)

    swap = lambda rope, kv: dict(rope=rope and (rope[1], rope[0], rope[2]), kv=kv)  # noqa: E731
    slot = lambda rope, kv: dict(rope=rope, kv=kv and (kv[0], kv[1].roll(1), kv[2]))  # noqa: E731
    monkeypatch.setattr(WT, "tinygemm_pack", pack)
    monkeypatch.setattr(eager_fused, "add_rms_norm", _add_rms_norm)
    cpu = torch.device("cpu")
    for fault in (None, swap, slot):
        monkeypatch.setattr(C, "launch", faulty(emulated, fault) if fault else emulated)
        monkeypatch.setattr(C, "launch_norm",
                            faulty(emulated_norm, fault) if fault else emulated_norm)
        for norm, rope, kv in VARIANTS:
            fails = (fault is swap and rope) or (fault is slot and kv)
            assert WT._variant_check(cpu, norm, rope, kv) != fails, (fault, norm, rope, kv)
    assert "int4_rows's norm + RoPE + K/V on cpu is off" in caplog.text
