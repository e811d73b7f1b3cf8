"""The routed expert GEMV (llamadist.kernels.moe_routed) and the choice between it and the
grouped GEMM (llamadist.kernels.moe_grouped.expert_path).

The kernel runs on the CPU through Triton's interpreter against the expert loop
(tests/moe_routed_cases.py, in a subprocess: TRITON_INTERPRET must be set before triton
is imported): float32 within 1e-5 and bfloat16 within 2e-2, every expert and a share,
top-1 and top-2, batch 1-3, two tokens routed to one expert, and a whole tiny Mixtral's
greedy tokens and logits; a shape whose D and F span several weight tiles against a
float64 reference; and each kind of launch config (prefetch, split-K, x in the tile's
layout, other tiles and warps) on odd shapes. Skipped when triton is not installed (CPU-only torch wheels
have none; tests/gpu/test_moe_grouped_gpu.py covers the compiled kernel)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llamadist.kernels import gpu, moe_grouped, moe_routed
from llamadist.kernels.moe_grouped import GROUPED, ROUTED, expert_path
from llamadist.kernels.moe_routed import DEFAULT, Cut, RoutedConfig
from tests.interpreted import start_all


def test_expert_path_routed_below_one_assignment_per_expert():
    # Mixtral-8x7B: 8 experts, top-2: 2, 4, 6 assignments read fewer than 8 experts
    assert [expert_path(n, 2, 8) for n in (1, 2, 3, 4, 5, 32, 2048)] == [ROUTED] * 3 + [GROUPED] * 4
    # top-1 over 8 experts: up to 7 tokens
    assert expert_path(7, 1, 8) == ROUTED and expert_path(8, 1, 8) == GROUPED
    # an expert-parallel share of 4 experts (top-2 of 8): a rank holds G = 4
    assert expert_path(1, 2, 4) == ROUTED and expert_path(2, 2, 4) == GROUPED
    assert expert_path(1, 2, 3) == ROUTED and expert_path(1, 2, 2) == GROUPED
    # where the routed kernel does not run, always the grouped GEMM
    assert all(expert_path(n, 2, 8, routed_usable=False) == GROUPED for n in (1, 2, 3, 64))


def test_routed_kernel_offered_only_where_triton_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not moe_routed.usable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert moe_routed.usable(torch.device("cpu")) == gpu.INSTALLED


def test_routed_config_round_trips_through_the_ops_ints_and_rejects_bad_cuts():
    cfg = RoutedConfig(Cut(32, 128, warps=8, prefetch=2, x_tile=True),
                       Cut(4, 1024, warps=2, prefetch=1, split=4))
    assert RoutedConfig.from_ints(cfg.ints()) == cfg
    assert RoutedConfig.from_ints(DEFAULT.ints()) == DEFAULT == RoutedConfig()
    # the H200 sweep's best gate/up cut, a down cut within 0.6% of its best at N = 1-3
    assert DEFAULT.label() == "gu16x128w4p0_dn4x512w4p0"
    assert cfg.label() == "gu32x128w8p2x_dn4x1024w2p1s4"
    for bad in (dict(rows=12), dict(cols=0), dict(warps=3), dict(prefetch=3), dict(split=0)):
        with pytest.raises(ValueError):
            Cut(**({"rows": 8, "cols": 64} | bad))
    with pytest.raises(ValueError):  # gate/up has no split-K
        RoutedConfig(gate_up=Cut(16, 256, split=2))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm: PyTorch >= 2.8")
def test_expert_sum_sends_each_shape_to_the_chosen_kernel(monkeypatch):
    """moe_grouped.expert_sum, what the kernel pass installs, is where the choice is
    applied: the routed kernel is called for N = 1 of 8 experts top-2 and not for N = 4
    (here a recording wrapper over the grouped GEMM's reference stands in for the routed
    kernel, so it runs without Triton; the kernel's own math is the interpreted test's)."""
    calls = []

    def routed(*args, **kw):
        calls.append(args[0].shape[0])
        return moe_grouped.grouped_expert_sum(*args, **kw)
    monkeypatch.setattr(moe_routed, "routed_expert_sum", routed)
    g, d, f = 8, 16, 24
    w13, w2 = torch.randn(g, 2 * f, d), torch.randn(g, d, f)
    for n in (1, 4):
        x = torch.randn(n, d)
        weights = torch.softmax(torch.randn(n, 2), -1)
        index = torch.stack([torch.randperm(g)[:2] for _ in range(n)])
        got = moe_grouped.expert_sum(x, weights, index, w13, w2, routed=True)
        want = moe_grouped.grouped_expert_sum(x, weights, index, w13, w2)
        assert torch.equal(got, want)
    assert calls == [1]


no_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                               reason="triton not installed")
MODEL_KINDS = ["moe_top2_gqa", "moe_top1"]


@pytest.fixture(scope="module")
def interpreted(tiny_mixtrals, tmp_path_factory):
    """Every interpreted run of this module started at once (tests/interpreted.py)."""
    folders = {kind: str(p) for kind, p in tiny_mixtrals.items()}
    runs = start_all(tmp_path_factory.mktemp("moe_routed_runs"), "moe_routed_cases",
                     {"blocks": ("cpu", "blocks", *folders.values()),
                      "configs": ("cpu", "configs"),
                      **{kind: ("cpu", "model", folders[kind]) for kind in MODEL_KINDS}})
    yield runs
    for run in runs.values():
        run.stop()


@no_triton
def test_routed_kernel_interpreted_equals_the_expert_loop(tiny_mixtrals, interpreted):
    proc = interpreted["blocks"].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    # 3 Mixtrals x (all, a share) x batch 1-3, the dtypes taking turns (each of all and a
    # share, and each batch size, in both), and 2 hand-routed cases each; a shape over
    # several tiles x (all, a share) x batch 1-3 in float32
    assert proc.stdout.count(": ") == len(tiny_mixtrals) * (2 * 3 + 2) + 2 * 3
    assert proc.stdout.count("bfloat16 N=") == len(tiny_mixtrals) * 3
    assert proc.stdout.count("shape G=") == 6
    assert "FAIL" not in proc.stdout


@no_triton
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_whole_model_interpreted_routed_decode_equals_the_loop(interpreted, kind):
    """Greedy tokens and logits through use_grouped_experts (the routed kernel for decode
    at batch 1, and at batch 2 of 8 experts top-1) equal the expert loop's."""
    proc = interpreted[kind].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "routed kernel calls=" in proc.stdout and "FAIL" not in proc.stdout


@no_triton
def test_routed_kernel_interpreted_every_config_kind_on_odd_shapes(interpreted):
    """tests/moe_routed_cases.config_kinds (prefetch 0 / 1 / 2, split-K of the down kernel,
    x in the tile's layout, other tiles and warps, DEFAULT) on D = 83, F = 149 against a
    float64 reference: top-1 and top-2, every expert and a share, batch 1-3, both dtypes."""
    proc = interpreted["configs"].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.count("config gu") == 6 * 4 and "FAIL" not in proc.stdout
    assert "s3" in proc.stdout and "p2" in proc.stdout and "x_dn" in proc.stdout
