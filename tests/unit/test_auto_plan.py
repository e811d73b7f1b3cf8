"""The automatic (tp, pp, dp, split) planner: pure, no torch device."""

import itertools
import re

import pytest

from llamadist.config import ModelConfig, named_shape
from llamadist.planning.auto import (CostContext, ReplicaCost, auto_plan, format_auto_plans,
                                     make_cluster)
from llamadist.planning.cost import LINKS, CostModel, Link, make_link
from llamadist.planning.devices import DeviceSpec, with_speed
from llamadist.planning.profile import profile
from llamadist.planning.strategies import make_plan
from llamadist.planning.units import PlanningError, format_seconds

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
    assert "tensor-parallel all-reduces" in win.why and "1 GB/s and 5 us/message between nodes" in win.why
    # The same cluster with inter-node links as fast as NVLink: one TP group of 8.
    fast = auto_plan(prof, gpus=8, nodes=2, gpu_memory="32GiB", inter_link="nvlink",
                     config=LLAMA70B)
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
    # A plan is the pipeline split only: tp is the candidate's, never claimed by the plan.
    assert "tp" not in plan.to_dict() and plan.boundaries == cands[0].splits
    assert plan.devices == ("node0/cuda:0", "node1/cuda:0")


# ---- one cost model, links with latency ------------------------------------------
def test_strategies_and_auto_charge_a_stage_the_same():
    """Stage 0 of Llama-3-8B split 0:16,16:32: the strategies' plan and the auto planner's
    placement call the one cost model, and the embedding costs B rows, not the table."""
    cfg = named_shape("llama3-8b")
    prof = profile(cfg, "bfloat16", seq_len=4096)
    dev = DeviceSpec("cuda:0", 80 * GiB)
    plan = make_plan(prof, [dev, dev], "custom", "0:16,16:32")
    ctx = CostContext(CostModel.build(prof, 1, 4096), make_cluster([dev, dev]), cfg, 4096, 0.1)
    placed = ReplicaCost(ctx, 1, range(2), 1, 1).stages([16, 32])
    for stage, place in zip(plan.stages, placed):
        assert place.compute_s == pytest.approx(stage.predicted_time_s, rel=1e-12)
    layer = prof.layers[0]
    read = 16 * (layer.weight_bytes + layer.kv_bytes_per_token * 4096) + cfg.hidden_size * 2
    assert plan.stages[0].predicted_time_s == pytest.approx(read / dev.mem_bandwidth, rel=1e-12)
    # The whole (V, D) table would add 1 GiB of reads: about 0.35 ms at 3 TB/s.
    assert plan.stages[0].predicted_time_s < (read + prof.embed.weight_bytes) / 3e12 - 3e-4
    # The auto stage adds only its send, one message of the (1, D) hidden state.
    assert placed[0].time_s - placed[0].compute_s == pytest.approx(
        LINKS["nvlink"].latency_s + cfg.hidden_size * 2 / LINKS["nvlink"].bandwidth)


def test_prefill_flops_match_the_profile():
    prof = profile(SMALL, "bfloat16", seq_len=512)
    cm = CostModel.build(prof, 1, 512)
    assert cm.prefill_flops(0, SMALL.num_layers, True, 512) == prof.total_prefill_flops
    dev = DeviceSpec("cuda:0", 80 * GiB)
    t = cm.prefill_time(dev.flops, dev.mem_bandwidth, 0, SMALL.num_layers, True, True, 512)
    assert t == pytest.approx(prof.total_prefill_flops / dev.flops)   # compute-bound


def test_link_alpha_beta_and_presets():
    link = Link("x", 1e9, 20e-6)
    assert link.send_s(1e6) == pytest.approx(20e-6 + 1e-3)
    assert link.all_reduce_s(1e6, 4) == pytest.approx(6 * 20e-6 + 1.5e-3)
    assert link.all_gather_s(1e6, 4) == pytest.approx(3 * 20e-6 + 0.75e-3)
    assert link.all_reduce_s(1e6, 1) == 0.0
    assert set(LINKS) == {"nvlink", "pcie", "infiniband", "ethernet"}
    assert LINKS["ethernet"].bandwidth == 1.25e9 and 10e-6 <= LINKS["ethernet"].latency_s
    assert make_link("pcie", latency_s=7e-6) == Link("pcie", LINKS["pcie"].bandwidth, 7e-6)
    with pytest.raises(PlanningError, match="unknown link 'wifi'.*nvlink, pcie"):
        make_link("wifi")
    with pytest.raises(PlanningError, match="bandwidth must be positive"):
        make_link("nvlink", bandwidth=0)


@pytest.mark.parametrize("links", [dict(inter_bw=1.25e9, inter_latency_s=30e-6),
                                   dict(inter_link="ethernet")])
def test_ethernet_keeps_tp_inside_a_node_and_cuts_the_pipeline_across(links):
    prof = profile(LLAMA70B, "bfloat16", seq_len=4096)
    # 2 nodes x 4 GPUs of 32 GiB over 10 GbE-class links: the model needs both nodes.
    cands = auto_plan(prof, gpus=8, nodes=2, gpu_memory="32GiB", config=LLAMA70B, top=100,
                      **links)
    win = cands[0]
    assert win.pp >= 2 and win.tp > 1
    nodes = [{name.split("/")[0] for name in st.devices} for st in win.stages]
    assert all(len(n) == 1 for n in nodes)                 # every TP group on one node
    assert set().union(*nodes) == {"node0", "node1"}       # the pipeline crosses nodes
    # tp=8 spans both nodes: 2 all-reduces per layer plus the embedding's, each a ring of
    # 14 messages over the slow link, and the logits' all-gather of 7.
    tp8 = next(c for c in cands if (c.tp, c.pp) == (8, 1))
    link = make_link("ethernet", links.get("inter_bw"), links.get("inter_latency_s"))
    hidden, logits = 8192 * 2, 128256 * 2
    want = 161 * link.all_reduce_s(hidden, 8) + link.all_gather_s(logits, 8)
    assert tp8.breakdown()["tp_comm"] == pytest.approx(want, rel=1e-9)
    assert tp8.breakdown()["tp_comm"] > 161 * 14 * 30e-6
    # The parts add up to the prediction (latency objective: one micro-batch in turn).
    assert sum(win.breakdown().values()) == pytest.approx(win.time_per_token_s, rel=1e-12)


def test_format_prints_each_prediction_with_its_parts():
    prof = profile(LLAMA70B, "bfloat16", seq_len=4096)
    cands = auto_plan(prof, gpus=8, nodes=2, gpu_memory="32GiB", inter_link="ethernet",
                      config=LLAMA70B)
    lines = format_auto_plans(cands).splitlines()
    assert all(w in lines[1] for w in ("time/token", "compute", "all-reduce", "p2p", "bubble"))
    for x, row in zip(cands, lines[3:]):
        parts = x.breakdown()
        for value in (x.time_per_token_s, parts["compute"], parts["tp_comm"], parts["pp_comm"]):
            assert format_seconds(value) in row
        assert x.label in row and f"{x.bubble:.0%}" in row
    d = cands[0].to_dict()
    assert set(d["breakdown_s"]) == {"compute", "tp_comm", "pp_comm"} and "bubble" in d
