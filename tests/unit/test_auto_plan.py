"""The automatic (tp, pp, dp, split) planner: pure, no torch device."""

import itertools
import re

import pytest

from llamadist.config import ModelConfig
from llamadist.planning.auto import (CostContext, ReplicaCost, auto_plan, format_auto_plans,
                                     make_cluster)
from llamadist.planning.devices import DeviceSpec, with_speed
from llamadist.planning.profile import profile
from llamadist.planning.strategies import CostModel
from llamadist.planning.units import PlanningError

GiB = 2**30
# Llama 3 70B shapes: 141 GB of bf16 weights.
LLAMA70B = ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128)
SMALL = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=9,
                    num_heads=16, num_kv_heads=4, head_dim=128)


def _brute_force(rc: ReplicaCost, n: int) -> tuple[float, list[tuple[int, ...]]]:
    """Min over every contiguous split of the slowest stage, among splits that fit."""
    best, arg = float("inf"), []
    for cuts in itertools.combinations(range(1, n), rc.k - 1):
        ends = [*cuts, n]
        stages = rc.stages(ends)
        if any(s.memory_bytes > s.usable_bytes for s in stages):
            continue
        worst = max(s.time_s for s in stages)
        if worst < best * (1 - 1e-12):
            best, arg = worst, [tuple(ends)]
        elif worst <= best * (1 + 1e-12):
            arg.append(tuple(ends))
    return best, arg


def test_heterogeneous_split_equals_brute_force():
    prof = profile(SMALL, "bfloat16", seq_len=2048)
    # A fast device with little memory, a reference one, a slow one: the memory limit binds.
    def replica(fast_memory: int) -> ReplicaCost:
        devices = [with_speed(DeviceSpec("cuda:0", fast_memory), 2.0),
                   DeviceSpec("cuda:1", 8 * GiB), with_speed(DeviceSpec("cuda:2", 8 * GiB), 0.4)]
        ctx = CostContext(CostModel.build(prof, 1, 2048), make_cluster(devices), SMALL, 2048, 0.1)
        return ReplicaCost(ctx, 1, range(3), 1, 1), devices

    (rc, devices), (roomy, _) = replica(GiB // 2), replica(8 * GiB)
    for r in (rc, roomy):
        best, argmins = _brute_force(r, SMALL.num_layers)
        ends = r.split()
        assert max(s.time_s for s in r.stages(ends)) == pytest.approx(best, rel=1e-12)
        assert tuple(ends) in argmins
    # The fast device takes most layers, unless its memory (embedding + 3 layers) binds.
    assert roomy.split()[0] > 3 and rc.split()[0] == 3
    best, _ = _brute_force(rc, SMALL.num_layers)
    # auto_plan reaches the same split for that layout.
    cands = auto_plan(prof, devices, config=SMALL, max_seq_len=2048, top=100)
    pp3 = next(c for c in cands if (c.tp, c.pp, c.dp) == (1, 3, 1))
    assert pp3.bottleneck_s == pytest.approx(best, rel=1e-12)


def test_tp_inside_node_and_pp_across_nodes_when_inter_node_links_are_slow():
    prof = profile(LLAMA70B, "bfloat16", seq_len=4096)
    # 2 nodes x 4 GPUs of 32 GiB: the model needs both nodes.
    slow = auto_plan(prof, gpus=8, nodes=2, gpu_memory="32GiB", inter_bw=1e9, config=LLAMA70B)
    win = slow[0]
    assert (win.tp, win.pp, win.dp) == (4, 2, 1)
    for stage in win.stages:  # every TP group on one node, the cut between nodes
        assert len({name.split("/")[0] for name in stage.devices}) == 1
    assert win.stages[0].devices[0].startswith("node0") and win.stages[1].devices[0].startswith("node1")
    assert "tensor-parallel all-reduces" in win.why and "1 GB/s between nodes" in win.why
    # The same cluster with inter-node links as fast as NVLink: one TP group of 8.
    fast = auto_plan(prof, gpus=8, nodes=2, gpu_memory="32GiB", inter_bw=300e9,
                     inter_latency_s=10e-6, config=LLAMA70B)
    assert (fast[0].tp, fast[0].pp) == (8, 1)


def test_refuses_a_model_that_fits_nowhere_with_the_shortfall_in_bytes():
    prof = profile(LLAMA70B, "bfloat16", seq_len=4096)
    with pytest.raises(PlanningError) as err:
        auto_plan(prof, gpus=2, gpu_memory="40GiB", config=LLAMA70B)
    msg = str(err.value)
    short = int(re.search(r"needs (\d+) bytes", msg).group(1))
    # Best case is half the weights and half the KV cache per GPU (tp=2).
    usable = 40 * GiB - int(40 * GiB * 0.1)
    need = (prof.total_weight_bytes + prof.kv_bytes_per_token * 4096) / 2
    assert short == pytest.approx(need - usable, rel=1e-3)
    assert "tp=2 pp=1 dp=1" in msg


def test_tp_respects_head_counts_and_objectives_rank_differently():
    prof = profile(SMALL, "bfloat16", seq_len=1024)
    lat = auto_plan(prof, gpus=8, config=SMALL, batch_size=16, top=100)
    assert all(16 % c.tp == 0 and c.tp in (1, 2, 4, 8) for c in lat)
    assert all(c.tp * c.pp * c.dp <= 8 and c.dp <= 16 for c in lat)
    thr = auto_plan(prof, gpus=8, config=SMALL, batch_size=16, objective="throughput", top=100)
    assert thr[0].tokens_per_s >= max(c.tokens_per_s for c in thr) * (1 - 1e-9)
    assert lat[0].step_s <= min(c.step_s for c in lat) * (1 + 1e-9)
    with pytest.raises(PlanningError, match="objective"):
        auto_plan(prof, gpus=8, objective="fast")


def test_format_and_plan_export():
    prof = profile(LLAMA70B, "bfloat16", seq_len=4096)
    cands = auto_plan(prof, gpus=8, nodes=2, gpu_memory="32GiB", inter_bw=1e9, config=LLAMA70B)
    text = format_auto_plans(cands)
    assert "tp=4 pp=2 dp=1" in text.splitlines()[3] and "why: tp=4 pp=2 dp=1 wins" in text
    plan = cands[0].to_plan(prof.model, LLAMA70B.num_layers, prof.dtype)
    assert plan.tp == 4 and plan.boundaries == cands[0].splits
    assert plan.devices == ("node0/cuda:0", "node1/cuda:0")
