"""benchmarks/schedule_sim.py: the real engine over a virtual clock charges each step its
modelled time, and its trace accounts for every token of the workload."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from schedule_sim import H200, simulate  # noqa: E402

FLAT = replace(H200(), curve=((1, 0.01), (2, 0.01)), token_s=0.001, weights_s=0.0,
               eager_host_s=0.0, graph_host_s=0.0, host_pre_s=0.0, host_post_s=0.0,
               attn_flops_s=1e30)


def test_one_request_costs_its_prefill_then_a_graph_step_per_token():
    st = simulate([10], 3, FLAT, max_batch=1)
    # a 10-token eager prefill (10 ms), then 2 decode steps through graphs (10 ms each)
    assert st["wall_s"] == pytest.approx(0.03)
    assert st["ttft_p50_s"] == pytest.approx(0.01)
    assert st["tpot_p50_s"] == pytest.approx(0.01)
    t = st["trace"]
    assert (t["prefill"]["steps"], t["decode_graph"]["steps"]) == (1, 2)


def test_the_simulated_trace_adds_up_to_the_workload():
    lens = [5, 40, 17, 33, 8, 26]
    st = simulate(lens, 4, FLAT, max_batch=4, budget=16)
    t = st["trace"]["all"]
    assert t["prefill_tokens"] == sum(lens)
    assert t["sampled"] == st["generated_tokens"] == 4 * len(lens)
    assert t["decodes"] == 3 * len(lens)
    assert t["run_s"] == pytest.approx(st["wall_s"])
    assert "mixed" in st["trace"]  # the budget made prompts share steps with decodes


def test_compare_finds_a_simulated_trace_at_its_own_model(tmp_path):
    from schedule_sim import compare
    slow = replace(FLAT, token_s=0.003)  # eager steps 3x the model compared against
    st = simulate([5, 40, 17, 33, 8, 26], 8, slow, max_batch=4, budget=16)
    st["_trace"].write(tmp_path / "t.jsonl")
    got = compare(str(tmp_path / "t.jsonl"), FLAT, max_batch=4)
    eager = [v for k, v in got.items() if not k.startswith("decode_graph")]
    assert eager and all(v["ratio"] == pytest.approx(3.0) for v in eager)
    graph = [v for k, v in got.items() if k.startswith("decode_graph")]
    assert graph and all(v["ratio"] == pytest.approx(1.0) for v in graph)
