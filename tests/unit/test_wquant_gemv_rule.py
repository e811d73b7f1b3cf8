"""The GEMV launch planning of llamadist.kernels.wquant_triton (pure Python, no triton):
``gemv_config``'s rule for Llama-3-8B's decode shapes (the configurations the H200 sweeps
measured fastest, benchmarks/RESULTS.md), its cuts for shapes no sweep timed, and
``GemvConfig``'s labels (the keys benchmarks/wquant_sweep.py reports). The kernels
themselves: tests/gpu (in Triton's interpreter too)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from llamadist.kernels import wquant_triton as T

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
KINDS = [("int8", None), ("fp8", None), ("int4", 128), ("int4", 32)]


def _rule(kind, m, shape, group=None, sms=132, fp8_native=True):
    n, k = SHAPES[shape]
    return T.gemv_config(kind, m, n, k, group or k, sms, fp8_native=fp8_native)


def _code_bytes(kind, k):
    return (k + 1) // 2 if kind == "int4" else k


@pytest.mark.parametrize("kind,group", KINDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_rule_fills_an_h200_in_whole_groups(kind, group, m):
    """Every tile inside one scale group; >= 2 programs per SM of 132; the grid holds >= 12
    warps per SM (int4: 24) unless a further split would leave a K range < 4 tiles; >= 8
    code bytes a thread in flight per step; int8 and fp8 through the hardware's conversion
    where the device has it (but int8's two rows, and its one row in 8- or 16-row
    programs: the bit decode)."""
    gb = group // 2 if group else None
    for shape, (n, k) in SHAPES.items():
        cfg = _rule(kind, m, shape, group)
        kb = _code_bytes(kind, k)
        assert gb is None or gb % cfg.block_k == 0
        programs = -(-n // cfg.block_n) * cfg.split
        assert programs >= 2 * 132, (kind, shape, cfg)
        base_bk = 256 if kind != "int4" else min(64, gb)  # before fp8's M = 2 doubling
        full = programs * cfg.warps >= (24 if kind == "int4" else 12) * 132
        whole_rows = cfg.defer and cfg.split == 1  # one row's measured cut: >= 2 a SM
        assert full or whole_rows or kb // (2 * cfg.split) < 4 * base_bk, (kind, shape, cfg)
        assert cfg.block_n * cfg.block_k >= 8 * 32 * cfg.warps, cfg
        bits = kind == "int8" and (m == 2 or cfg.defer and cfg.block_n <= 16)
        assert cfg.native == (kind != "int4" and not bits) and not cfg.group_sums
        assert cfg.prefetch in (0, 1)


def test_rule_takes_the_measured_best_cuts_on_llama3_8b(monkeypatch):
    """The choices the docstring lists, each a configuration the H200 sweep timed:
    int4 splits K until the grid holds 24 warps per SM (gate_up 2, down 16; qkv and o stop
    at 4 tiles a range), without prefetch; groups of 32 keep 8 warps or half the rows."""
    got = {s: _rule("int4", 1, s, 128).label() for s in SHAPES}
    assert got == {"qkv": "n64k64w4s8pf0", "o": "n64k64w4s8pf0",
                   "gate_up": "n64k64w4s2pf0", "down": "n64k64w4s16pf0"}
    got = {s: _rule("int4", 1, s, 32).label() for s in SHAPES}
    assert got == {"qkv": "n128k16w8s16pf0", "o": "n128k16w8s16pf0",
                   "gate_up": "n64k16w4s2pf0", "down": "n128k16w8s16pf0"}
    # one row of int8 / fp8 (sessions 17-19): 8-row programs, sums deferred, no split-K,
    # BLOCK_K 1 024 where the grid holds <= 4 programs a SM, else 512 and 16 rows; int8's
    # biased decode (session 29) 256 where those are > 8 a SM, 8 warps where <= 4; fp8's
    # gate_up (not split) keeps its cut
    got = {s: _rule("int8", 1, s).label() for s in SHAPES}
    assert got == {"qkv": "n16k512w8s1dfpf0", "o": "n8k1024w4s1dfpf0",
                   "gate_up": "n16k256w4s1dfpf0", "down": "n8k1024w4s1dfpf0"}
    # lanes of more than INT8_BIASED_LANES products (Llama-3-70B's gate_up, K 8 192 in 256
    # bytes: 32) keep the exact decode's cut
    assert T.gemv_config("int8", 1, 57344, 8192, 8192, 132).label() == "n16k512w4s1dfpf0"
    assert T.gemv_config("int8", 1, 8192, 8192, 8192, 132).label() == "n16k512w8s1dfpf0"
    monkeypatch.setattr(T, "INT8_BIASED", False)  # the exact decode: the former cuts
    assert _rule("int8", 1, "gate_up").label() == "n16k512w4s1dfpf0"
    assert _rule("int8", 1, "qkv").label() == "n16k512w4s1dfpf0"
    got = {s: _rule("fp8", 1, s).label() for s in SHAPES}
    assert got == {"qkv": "n16k512w8s1natdfpf0", "o": "n8k1024w8s1natdfpf0",
                   "gate_up": "n32k256w8s1natpf0", "down": "n8k1024w8s1natdfpf0"}
    # int8 per 32 inputs (a Q8_0 on a GPU, session 19): whole rows in tiles of several
    # groups, sums deferred, the bit decode; 2 048 bytes at one row, 1 024 above, 16 rows
    # from three
    for m, label in ((1, "n8k2048w4s1dfpf0"), (2, "n8k1024w4s1dfpf0"),
                     (3, "n16k1024w4s1dfpf0"), (4, "n16k1024w4s1dfpf0")):
        assert {_rule("int8", m, s, 32).label() for s in SHAPES} == {label}
    for s in SHAPES:  # from two rows the M classes change one field each, never the split
        base = _rule("fp8", 4, s)
        assert (base.block_n, base.block_k, base.warps, base.prefetch) == (32, 256, 4, 0)
        assert _rule("fp8", 2, s) == dataclasses.replace(base, block_k=512)
        assert _rule("fp8", 3, s) == base  # not swept: as M = 4
        assert [_rule("int8", m, s).prefetch for m in (1, 2, 3, 4)] == [0, 0, 0, 0]
        assert not any(_rule(kind, m, s).defer for m in (2, 3, 4) for kind in ("int8", "fp8"))
        assert all(_rule("int4", m, s, g).prefetch == 0 for m in (1, 2, 4) for g in (32, 128))
        for m, g in itertools.product((1, 2, 4), (32, 128)):
            one, other = _rule("int4", 1, s, g), _rule("int4", m, s, g)
            assert dataclasses.replace(other, prefetch=one.prefetch) == one  # M: prefetch only
        one, other = _rule("int8", 2, s), _rule("int8", 4, s)  # two rows: the bit decode
        assert not one.native and dataclasses.replace(other, native=False, block_k=512) == one
    # fewer rows than SMs x 8 warps: int4 g32 keeps 8 warps (more SMs: the same rows)
    assert _rule("int4", 1, "gate_up", 32, sms=512).warps == 8


def test_fp8_native_only_where_the_device_converts():
    """Without float8e4nv (before sm_89, the interpreter) fp8 is the bit decode at the
    base cut for every M (the only bit-decode point the sweep timed); with it the M classes
    apply. int8's conversion exists everywhere."""
    for m in (1, 2, 3, 4):
        on = T.gemv_config("fp8", m, 4096, 4096, 4096, 132, fp8_native=True)
        off = T.gemv_config("fp8", m, 4096, 4096, 4096, 132, fp8_native=False)
        assert on.native and not off.native and off.prefetch == 0
        assert off == T.gemv_config("fp8", 4, 4096, 4096, 4096, 132, fp8_native=False)
        assert (on.warps, on.block_k, on.defer) == {1: (8, 1024, True), 2: (4, 512, False)
                                                     }.get(m, (4, 256, False))
    assert dataclasses.replace(on, native=False) == off  # M = 4: the same cut
    assert T.device_traits(torch.device("cpu")) == (4, False)  # the interpreter's traits
    for fp8 in (True, False):
        assert T.gemv_config("int8", 4, 4096, 4096, 4096, 132, fp8_native=fp8).native


ODD = dict(n=(1, 7, 100, 4097, 11008, 128256), k=(1, 15, 100, 258, 4097, 14336))
FORMATS = [("int8", None), ("int8", 32), ("int8", 512), ("int4", 128), ("int4", 64),
           ("int4", 32), ("fp8", None)]


@pytest.mark.parametrize("kind,group", FORMATS)
def test_rule_cuts_are_valid_for_shapes_no_sweep_timed(kind, group):
    """Odd N and K (tails, K shorter than a tile, one row), any group, M = 1..4, devices of
    4 (the interpreter), 108 and 132 SMs: tiles are powers of two inside a group, no wider
    than K needs, each K range >= 2 tiles when split (>= 4 before fp8's doubling), split
    <= 16, and a wide N (every SM a program from the rows) is never split."""
    for n, k, m, sms, fp8 in itertools.product(ODD["n"], ODD["k"], (1, 2, 3, 4),
                                               (4, 108, 132), (True, False)):
        g = group if group is not None and group < k else k
        cfg = T.gemv_config(kind, m, n, k, g, sms, fp8_native=fp8)
        kb = _code_bytes(kind, k)
        for v in (cfg.block_n, cfg.block_k, cfg.warps):
            assert v & (v - 1) == 0, cfg
        assert 8 <= cfg.block_n <= 128 and cfg.warps in (4, 8) and cfg.prefetch in (0, 1)
        wide = kind == "int8" and g < k and cfg.defer  # tiles of several whole groups
        if kind == "int4" or (g < k and not wide):
            assert (g // 2 if kind == "int4" else g) % cfg.block_k == 0, (k, g, cfg)
        if wide:
            assert cfg.block_k % g == 0 and kb % cfg.block_k == 0 and cfg.split == 1, cfg
            assert T.tile_k(cfg, kind, g) == (cfg.block_k, True)
            assert cfg.block_n == (8 if m <= 2 else 16) and -(-n // 8) >= 2 * sms, cfg
            assert not cfg.native and cfg.prefetch == 0, cfg
            continue
        assert cfg.block_k <= max(16, kb), (k, cfg)
        assert 1 <= cfg.split <= 16
        assert cfg.split == 1 or kb // cfg.split >= 2 * cfg.block_k, (k, cfg)
        if -(-n // cfg.block_n) * cfg.warps >= 24 * sms:
            assert cfg.split == 1, (n, k, sms, cfg)
        whole_rows = cfg.defer and cfg.block_n <= 16  # one row's 8- or 16-row cut
        bits = kind == "int8" and (m == 2 or whole_rows)
        assert cfg.native == ((kind == "int8" and not bits) or (kind == "fp8" and fp8))
        if cfg.defer:  # one row, one scale a row (int8's whole-row cut: the bit decode)
            assert m == 1 and g == k and (cfg.native or kind == "int8"), cfg
        if whole_rows:  # >= 2 programs a SM, whole tiles of a row (16 rows a program
            assert cfg.block_n == 8 or -(-n // 8) > 4 * sms, cfg  # where 8 would be > 4 a SM)
            assert -(-n // 8) >= 2 * sms and cfg.split == 1, cfg
            assert kb % cfg.block_k == 0, (k, cfg)  # (int8's biased decode: 256 where
            sixteens = (kind == "int8" and -(-n // 16) > 8 * sms  # 16 rows are > 8 a SM
                        and T.int8_biased(kb, 256))  # and its lanes are short enough)
            assert cfg.block_k in ((256,) if sixteens else (512, 1024)), (k, cfg)


def test_labels_name_every_field_that_changes_the_kernel():
    base = T.GemvConfig()
    variants = [base, dataclasses.replace(base, native=True),
                dataclasses.replace(base, group_sums=True),
                dataclasses.replace(base, prefetch=0),
                dataclasses.replace(base, native=True, prefetch=0),
                dataclasses.replace(base, stages=3), dataclasses.replace(base, split=2),
                dataclasses.replace(base, warps=8), dataclasses.replace(base, block_n=64),
                dataclasses.replace(base, block_k=128), dataclasses.replace(base, defer=True)]
    labels = [c.label() for c in variants]
    assert len(set(labels)) == len(labels)
    assert labels[:5] == ["n32k256w4s1", "n32k256w4s1nat", "n32k256w4s1gs",
                          "n32k256w4s1pf0", "n32k256w4s1natpf0"]


def test_first_tile_before_the_wait_only_where_measured_faster(monkeypatch):
    """first_early's rule: int8 with one scale a row at one row, as a dependent launch (the
    H200's batch-1 step 2.2% faster); fp8 (measured slower), more rows, grouped int8 and
    launches that do not wait keep their loads after the wait; FIRST_EARLY forces it either
    way (A/B runs, tests)."""
    assert T.first_early("int8", 1, False, True)
    for case in (("fp8", 1, False, True), ("int8", 2, False, True), ("int8", 1, True, True),
                 ("int8", 1, False, False), ("int4", 1, True, True)):
        assert not T.first_early(*case), case
    monkeypatch.setattr(T, "FIRST_EARLY", True)
    assert T.first_early("fp8", 3, True, False)
    monkeypatch.setattr(T, "FIRST_EARLY", False)
    assert not T.first_early("int8", 1, False, True)


def test_int8_rows_where_measured_faster(monkeypatch):
    """int8_rows's rule: the CUDA tensor-core rows at 3-8 rows (measured at 4 against the
    GEMV, and against the GEMM's tiles that take 5-16), the GEMV at 1 and 2; INT8_ROWS
    forces it at 1-8 rows or never."""
    assert [m for m in range(0, 12) if T.int8_rows(m)] == [3, 4, 5, 6, 7, 8]
    monkeypatch.setattr(T, "INT8_ROWS", True)
    assert [m for m in range(0, 12) if T.int8_rows(m)] == list(range(1, 9))
    monkeypatch.setattr(T, "INT8_ROWS", False)
    assert not any(T.int8_rows(m) for m in range(12))
