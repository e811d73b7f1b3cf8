"""The all-to-all dispatch of llamadist.parallel.expert without processes: the row plan
(which token goes to which rank), the packing of rows with their routing, and the whole
exchange played out by hand over a few simulated ranks (each an ExpertParallelMoE's
share of one SparseMoE) against the one-module result."""

from __future__ import annotations

import pytest
import torch

from llamadist.config import ModelConfig
from llamadist.model.moe import SparseMoE
from llamadist.parallel.expert import (ExpertParallelError, ExpertParallelMoE,
                                       assigned_weights, expert_owners, hot_experts, pack_rows,
                                       read_expert_load, route_plan, unpack_rows)


def moe_config(experts: int = 6, k: int = 2, dim: int = 24) -> ModelConfig:
    return ModelConfig(vocab_size=10, hidden_size=dim, intermediate_size=40, num_layers=1,
                       num_heads=2, num_kv_heads=2, head_dim=dim // 2, num_experts=experts,
                       num_experts_per_tok=k)


def test_route_plan_one_row_per_token_and_rank():
    owner = torch.tensor([0, 0, 1, 1])
    index = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 3]])
    tokens, counts = route_plan(index, owner, 2)
    # rank 0: tokens 0 and 2 (token 0's two experts share one row); rank 1: 1, 2, 3
    assert tokens.tolist() == [0, 2, 1, 2, 3] and counts.tolist() == [2, 3]


def test_route_plan_skips_experts_of_other_groups():
    owner = torch.tensor([-1, 0, -1, 1])  # experts 0 and 2: a TP peer's business
    tokens, counts = route_plan(torch.tensor([[0, 2], [1, 0], [2, 3]]), owner, 2)
    assert tokens.tolist() == [1, 2] and counts.tolist() == [1, 1]
    tokens, counts = route_plan(torch.empty(0, 2, dtype=torch.long), owner, 2)
    assert tokens.numel() == 0 and counts.tolist() == [0, 0]


def test_expert_owners_refuses_double_and_foreign_experts():
    assert expert_owners([[0, 3], [1], [2]], 5) == [0, 1, 2, 0, -1]
    with pytest.raises(ExpertParallelError, match="expert 1 is on ranks 0 and 1"):
        expert_owners([[0, 1], [1]], 3)
    with pytest.raises(ExpertParallelError, match="expert 7"):
        expert_owners([[0], [7]], 3)


@pytest.mark.parametrize("dtype,dim,k", [(torch.float32, 24, 2), (torch.bfloat16, 7, 1),
                                         (torch.float16, 5, 3)])
def test_pack_rows_round_trip(dtype, dim, k):
    x = torch.randn(4, dim).to(dtype)
    w = torch.rand(4, k)
    i = torch.randint(0, 100, (4, k))
    buf = pack_rows(x, w, i)
    assert buf.dtype == torch.uint8 and buf.shape[0] == 4
    x2, w2, i2 = unpack_rows(buf, dim, dtype, k)
    assert torch.equal(x2, x) and torch.equal(w2, w) and torch.equal(i2, i)
    with pytest.raises(ExpertParallelError, match="bytes"):
        unpack_rows(buf, dim + 1, dtype, k)


def test_runtime_config_refuses_an_unknown_dispatch():
    from llamadist.config import ConfigError, RuntimeConfig
    assert RuntimeConfig().ep_dispatch == "auto"
    with pytest.raises(ConfigError, match="--ep-dispatch must be one of auto, gather"):
        RuntimeConfig(ep_dispatch="scatter")


def test_assigned_weights_zero_the_slots_of_other_ranks():
    owner = torch.tensor([0, 1, 1, 0])  # expert 3 replicated: this rank (0) computes it
    index = torch.tensor([[0, 2], [3, 1], [1, 2]])  # rows: to 0, to 0, to 1 (row order)
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    got = assigned_weights(index, w, owner, [2, 1])
    assert torch.equal(got, torch.tensor([[0.6, 0.0], [0.7, 0.0], [0.5, 0.5]]))


def test_hot_experts_by_load():
    load = {0: [5, 9, 1, 9], 3: [0, 0, 7, 2]}
    assert hot_experts(load, 2) == {0: [1, 3], 3: [2, 3]}
    assert hot_experts({"1": [4, 2]}, 0) == {1: []}
    with pytest.raises(ExpertParallelError, match="n must be"):
        hot_experts(load, -1)


def test_read_expert_load(tmp_path):
    good = tmp_path / "load.json"
    good.write_text('{"0": [3, 1, 4], "2": [1, 5, 9]}')
    assert read_expert_load(str(good), 3) == {0: [3, 1, 4], 2: [1, 5, 9]}
    with pytest.raises(ExpertParallelError, match=r"layer\(s\) \[0, 2\] do not count"):
        read_expert_load(str(good), 4)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ExpertParallelError, match="not a JSON object"):
        read_expert_load(str(bad), 3)


def test_replicas_only_with_the_row_dispatches():
    cfg = moe_config()
    with pytest.raises(ExpertParallelError, match="replicas of hot experts go with"):
        ExpertParallelMoE(cfg, [0], None, "gather", replicas=[1])
    part = ExpertParallelMoE(cfg, [0], None, "all_to_all", placement=[[0], [1, 2, 3, 4, 5]],
                             replicas=[5, 5, 3])
    assert sorted(map(int, part.experts)) == [0, 3, 5] and part.replicas == [3, 5]


def test_all_to_all_needs_a_placement_that_holds_its_experts():
    cfg = moe_config()
    with pytest.raises(ExpertParallelError, match="placement"):
        ExpertParallelMoE(cfg, [0, 1], None, "all_to_all")
    with pytest.raises(ExpertParallelError, match="not one rank's share"):
        ExpertParallelMoE(cfg, [0, 1], None, "auto", placement=[[0], [1, 2, 3, 4, 5]])
    with pytest.raises(ExpertParallelError, match="dispatch must be"):
        ExpertParallelMoE(cfg, [0, 1], None, "scatter")


def simulate_all_to_all(full: SparseMoE, cfg: ModelConfig, placement: list[list[int]],
                        xs: list[torch.Tensor], replicas=()) -> list[torch.Tensor]:
    """What the ranks' _exchange computes, with the collectives replaced by slicing: rank
    r's rows for rank s are the s-th block of r's payload. ``replicas``: on every rank."""
    ranks = len(placement)
    shares = []
    for experts in placement:
        part = ExpertParallelMoE(cfg, experts, None, "all_to_all", placement=placement,
                                 replicas=replicas)
        assert not part.load_state_dict(full.state_dict(), strict=False).missing_keys
        shares.append(part)
    plans = []
    for r, x in enumerate(xs):
        owner = torch.tensor([r if e in replicas else o for e, o in
                              enumerate(expert_owners(placement, cfg.num_experts))])
        w, i = full.route(x)
        tokens, send = route_plan(i, owner, ranks)
        w = assigned_weights(i[tokens], w[tokens], owner, send.tolist())
        plans.append((tokens, send.tolist(), pack_rows(x[tokens], w, i[tokens])))
    # all-to-all out: receiver s gets the s-th block of every sender, in sender order
    blocks = [list(p.split(send)) for _, send, p in plans]
    partials = []
    for s in range(ranks):
        got = torch.cat([blocks[r][s] for r in range(ranks)])
        rx, rw, ri = unpack_rows(got, cfg.hidden_size, xs[0].dtype, cfg.num_experts_per_tok)
        partials.append(shares[s].expert_sum(rx, rw, ri).split(
            [plans[r][1][s] for r in range(ranks)]))
    outs = []
    for r, (x, (tokens, _, _)) in enumerate(zip(xs, plans)):
        back = torch.cat([partials[s][r] for s in range(ranks)])  # all-to-all back
        out = torch.zeros_like(x)
        outs.append(out.index_add_(0, tokens, back))
    return outs


@pytest.mark.parametrize("k,replicas", [(1, ()), (2, ()), (2, (1, 5)), (2, tuple(range(6)))])
def test_simulated_exchange_equals_one_module(k, replicas):
    cfg = moe_config(k=k)
    torch.manual_seed(0)
    full = SparseMoE(cfg)
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    placement = [[0], [1, 2, 3, 4], [5]]  # uneven
    xs = [torch.randn(7, cfg.hidden_size), torch.randn(0, cfg.hidden_size),
          torch.randn(3, cfg.hidden_size)]  # the middle rank has no token this step
    with torch.no_grad():
        outs = simulate_all_to_all(full, cfg, placement, xs, replicas)
        for x, out in zip(xs, outs):
            want = full(x)
            assert out.shape == want.shape
            if x.numel():
                assert (out - want).abs().max().item() <= 1e-5
        assert outs[0].abs().max().item() > 0


# ---- the rule that chooses (planning.cost) ------------------------------------------
def test_rows_per_token():
    from llamadist.planning.cost import a2a_rows_per_token
    assert a2a_rows_per_token(8, 1, 4) == pytest.approx(1.0)
    assert a2a_rows_per_token(8, 2, 4) == pytest.approx(4 * (1 - 6 / 8 * 5 / 7))
    assert a2a_rows_per_token(8, 2, 8) == pytest.approx(2.0)  # one expert per rank
    assert a2a_rows_per_token(4, 4, 2) == pytest.approx(2.0)  # every rank, every token


def test_crossover_moves_with_overhead_and_ranks():
    from llamadist.config import named_shape
    from llamadist.planning.cost import LINKS, ep_comm_time, ep_dispatch_crossover
    from llamadist.planning.profile import profile
    p = profile(named_shape("mixtral-8x7b"), seq_len=1024)
    link = LINKS["nvlink"]
    # same latency, fewer bytes: without an overhead the all-to-all always wins
    assert ep_dispatch_crossover(p, 4, link, 0.0) == 0
    small, large = (ep_dispatch_crossover(p, 4, link, o) for o in (10e-6, 40e-6))
    assert 0 < small < large
    for b, gather_wins in ((large, True), (large + 1, False)):
        g = ep_comm_time(p, 1, b, 4, link, "gather")
        a = ep_comm_time(p, 1, b, 4, link, "all_to_all", 40e-6)
        assert (g <= a) == gather_wins
        assert ep_comm_time(p, 1, b, 4, link, "auto", 40e-6) == min(g, a)
    # more ranks: the gather moves more per token, so it stops paying sooner
    assert ep_dispatch_crossover(p, 8, link, 40e-6) < large


def test_auto_crossover_by_device_kind():
    from llamadist.config import named_shape
    from llamadist.planning.cost import ep_auto_crossover
    from llamadist.planning.profile import profile
    from llamadist.planning.units import PlanningError
    p = profile(named_shape("mixtral-8x7b"), seq_len=1024)
    assert ep_auto_crossover(p, 2, "cpu") == 0  # measured: gloo's all-to-all never lost
    gpu = ep_auto_crossover(p, 4, "gpu")
    assert gpu > 0 and gpu % 4 == 0
    with pytest.raises(PlanningError, match="tpu"):
        ep_auto_crossover(p, 2, "tpu")
