"""Per-expert load statistics: the on-device counters of SparseMoE (no host sync when
counting), LLM.expert_load across two in-process stages, and the Prometheus families
the server exports from them."""

from __future__ import annotations

import pytest
import torch

from llamadist import LLM, SamplingParams
from llamadist.config import ModelConfig
from llamadist.model.moe import SparseMoE, count_routing


def test_counting_adds_each_assignment_once(tiny_mixtrals):
    cfg = ModelConfig.from_json_file(tiny_mixtrals["moe_top1"] / "config.json")
    moe = SparseMoE(cfg)
    count_routing(moe)
    index = torch.tensor([[3], [3], [0], [7], [3]])  # (N, k=1)
    moe.count(index)
    moe.count(index[:2])
    assert moe.routed.tolist() == [1, 0, 0, 5, 0, 0, 0, 1]


def test_llm_expert_load_over_two_stages(tiny_mixtrals):
    llm = LLM(str(tiny_mixtrals["moe_top2_gqa"]), devices="cpu,cpu", max_seq_len=64,
              max_batch=2)
    assert llm.expert_load() == {0: [0] * 4, 1: [0] * 4, 2: [0] * 4}
    prompts = [[5, 6, 7, 8, 9], [40, 41, 300]]
    llm.run(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    load = llm.expert_load()
    assert sorted(load) == [0, 1, 2]  # layers of both stages
    computed = 5 + 3 + 2 * 3  # prompt tokens, then every sampled token but the last
    assert all(sum(v) == 2 * computed for v in load.values()), load


def test_expert_metrics_families():
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from llamadist.serve.metrics import expert_metrics
    routed, imbalance = expert_metrics({3: [6, 2, 0, 0], 5: [0, 0, 0, 0]})
    assert isinstance(routed, CounterMetricFamily) and isinstance(imbalance, GaugeMetricFamily)
    got = {(s.labels["layer"], s.labels["expert"]): s.value for s in routed.samples}
    assert got[("3", "0")] == 6 and got[("3", "1")] == 2 and got[("5", "3")] == 0
    assert all(s.name == "llamadist_expert_routed_tokens_total" for s in routed.samples)
    ratio = {s.labels["layer"]: s.value for s in imbalance.samples}
    assert ratio == {"3": pytest.approx(6 / 2), "5": 0.0}  # busiest 6 over a mean of 2
