"""The GEMV launch planning of llamadist.kernels.wquant_triton (pure Python, no triton):
``gemv_config``'s rule for Llama-3-8B's decode shapes and ``GemvConfig``'s labels (the
keys benchmarks/wquant_sweep.py reports). The kernels themselves: tests/gpu."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamadist.kernels import wquant_triton as T

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
KINDS = [("int8", None), ("fp8", None), ("int4", 128), ("int4", 32)]


@pytest.mark.parametrize("kind,group", KINDS)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_rule_fills_an_h200_in_whole_groups(kind, group, m):
    """Every tile inside one scale group; >= 2 programs per SM of 132; >= 8 code bytes a
    thread in flight per step; fp8 through float8e4nv where the device has it."""
    gb = group // 2 if group else None
    for n, k in SHAPES.values():
        cfg = T.gemv_config(kind, m, n, k, group or k, 132, fp8_native=True)
        assert gb is None or gb % cfg.block_k == 0
        assert -(-n // cfg.block_n) * cfg.split >= 2 * 132, (kind, n, k, cfg)
        assert cfg.block_n * cfg.block_k >= 8 * 32 * cfg.warps, cfg
        assert cfg.native == (kind == "fp8") and not cfg.group_sums
        assert cfg.prefetch in (0, 1, 2)


def test_fp8_native_only_where_the_device_converts():
    on = T.gemv_config("fp8", 1, 4096, 4096, 4096, 132, fp8_native=True)
    off = T.gemv_config("fp8", 1, 4096, 4096, 4096, 132, fp8_native=False)
    assert on.native and not off.native
    assert dataclasses.replace(on, native=False) == off  # the same cut, another decode
    # the interpreter's (and a CPU tensor's) traits: the bit decode
    assert T.device_traits(torch.device("cpu")) == (4, False)
    assert not T.gemv_config("int8", 1, 4096, 4096, 4096, 132, fp8_native=True).native


def test_rule_prefetch_and_warps_follow_the_kind_and_rows():
    """The measured choices the docstring lists: int8 prefetch 1, 0 at M = 2; int4 groups
    of 128 prefetch 0; int4 groups of 32 8 warps, or half the rows where the rows alone
    give every SM a program (gate_up), at the same split."""
    n, k = SHAPES["o"]
    assert [T.gemv_config("int8", m, n, k, k).prefetch for m in (1, 2, 3, 4)] == [1, 0, 1, 1]
    assert T.gemv_config("int4", 1, n, k, 128).prefetch == 0
    g32 = T.gemv_config("int4", 1, n, k, 32)
    assert (g32.warps, g32.block_n, g32.block_k) == (8, 128, 16)
    wide = T.gemv_config("int4", 1, *SHAPES["gate_up"], 32)
    assert (wide.warps, wide.block_n, wide.split) == (4, 64, 2)
    # fewer SMs: the same rows no longer fill it, the 8-warp form comes back
    assert T.gemv_config("int4", 1, *SHAPES["gate_up"], 32, sms=512).warps == 8


def test_labels_name_every_field_that_changes_the_kernel():
    base = T.GemvConfig()
    variants = [base, dataclasses.replace(base, native=True),
                dataclasses.replace(base, group_sums=True),
                dataclasses.replace(base, prefetch=0),
                dataclasses.replace(base, native=True, prefetch=0),
                dataclasses.replace(base, stages=3), dataclasses.replace(base, split=2),
                dataclasses.replace(base, warps=8), dataclasses.replace(base, block_n=64),
                dataclasses.replace(base, block_k=128)]
    labels = [c.label() for c in variants]
    assert len(set(labels)) == len(labels)
    assert labels[:5] == ["n32k256w4s1", "n32k256w4s1nat", "n32k256w4s1gs",
                          "n32k256w4s1pf0", "n32k256w4s1natpf0"]

