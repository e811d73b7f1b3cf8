"""Expert memory per EP rank in the planner (issue 17): uneven shares (E % ep, or shares by
device memory) and hot-expert replicas (--hot-experts N --expert-load FILE) counted rank by
rank, as parallel.expert places them; `plan` prints each rank's experts; a run whose
replicas do not fit is refused with the numbers before any process starts."""

from __future__ import annotations

import json

import pytest

from llamadist.config import ModelConfig
from llamadist.planning.cost import CostModel
from llamadist.planning.devices import parse_devices
from llamadist.planning.experts import (ExpertPlacement, expert_shares, hot_experts,
                                        memory_shares, run_placement)
from llamadist.planning.layout import resolve_layout
from llamadist.planning.profile import profile
from llamadist.planning.strategies import make_plan
from llamadist.planning.units import PlanningError, format_bytes
from llamadist.weights.checkpoint import open_checkpoint
from tests.tiny import MOE_CONFIGS

SEQ = 64


def _config(kind: str) -> ModelConfig:
    """A tiny Mixtral of tests.tiny.MOE_CONFIGS, as its config.json reads (no weights)."""
    return ModelConfig.from_hf_dict(dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=384,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1e4, **MOE_CONFIGS[kind]))


def _per_expert(prof) -> float:
    row = prof.layers[0]
    return row.expert_bytes / row.num_experts


def test_shares_even_and_by_memory():
    assert expert_shares(3, 2) == [[0, 1], [2]]
    assert expert_shares(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for e, ep in ((3, 2), (8, 3), (8, 8), (5, 1), (7, 4)):   # equal budgets: the even shares
        assert memory_shares(e, [10] * ep) == expert_shares(e, ep)
    big, small = memory_shares(8, [2e9, 1e9])
    assert (len(big), len(small)) == (5, 3) and big + small == list(range(8))
    assert [len(s) for s in memory_shares(4, [100, 1, 1])] == [2, 1, 1]   # one at least each
    with pytest.raises(PlanningError, match="3 ranks for 2 experts"):
        memory_shares(2, [1, 1, 1])


def test_placement_holds_what_parallel_expert_loads():
    """ExpertPlacement.held is the set ExpertParallelMoE keeps on each rank: its share and
    the hot experts its TP index's group owns (checked against parallel.expert itself)."""
    from llamadist.parallel.expert import _check_layout
    cfg = _config("moe_top1")   # 8 experts
    load = {0: [5, 90, 3, 60, 1, 2, 80, 4], 1: [9, 1, 1, 1, 1, 1, 1, 8]}
    hot = hot_experts(load, 3)
    assert hot == {0: [1, 3, 6], 1: [0, 1, 7]}
    for ep, tp in ((2, 1), (4, 1), (4, 2), (8, 2), (3, 1)):
        p = ExpertPlacement.build(cfg.num_experts, ep, hot, tp)
        for r in range(ep):
            group = p.shares[r % tp::tp] if tp > 1 else p.shares
            for layer in (0, 1):
                _, kept = _check_layout(cfg, p.shares[r], "all_to_all",
                                        object() if tp > 1 else None, group, 0, hot[layer])
                assert p.held(r, layer) == tuple(sorted(set(p.shares[r]) | set(kept))), \
                    (ep, tp, r, layer)
    p = ExpertPlacement.build(8, 4, hot, 2)  # shares 0-1, 2-3, 4-5, 6-7; hot 1, 3, 6
    assert p.held(0, 0) == (0, 1)            # TP index 0's group owns 0, 1, 4, 5: hot 1
    assert p.held(2, 0) == (1, 4, 5)
    assert p.held(1, 0) == (2, 3, 6)         # TP index 1's group (2, 3, 6, 7): hot 3, 6
    assert p.held(3, 0) == (3, 6, 7)


def test_uneven_shares_count_the_busiest_rank():
    """3 experts over 2 ranks: a rank holds 2, not 1.5; the stage's memory is that rank's."""
    cfg = _config("moe_e3_tied")
    prof = profile(cfg, dtype="float32", seq_len=SEQ)
    per, n = _per_expert(prof), cfg.num_layers
    whole = CostModel.build(prof, 1, SEQ).weight_bytes(0, n, True, True)
    two = CostModel.build(prof, 1, SEQ, ep=2)
    assert two.rank_experts(0, n, 2) == [2 * n, n]
    assert two.weight_bytes(0, n, True, True) == pytest.approx(whole - n * per)  # 2 of 3 kept
    mem = two.rank_memory(0, n, True, True)
    assert mem[0] == pytest.approx(two.memory(0, n, True, True))
    assert mem[0] - mem[1] == pytest.approx(n * per)


def test_hot_replicas_are_counted_per_rank_and_in_the_plan():
    cfg = _config("moe_top2_gqa")   # 4 experts, 3 layers
    prof = profile(cfg, dtype="float32", seq_len=SEQ)
    per, n = _per_expert(prof), cfg.num_layers
    load = {layer: [1, 2, 30, 40] for layer in range(n)}     # experts 2, 3 (rank 1's) hot
    plain = ExpertPlacement.build(4, 2)
    hot = ExpertPlacement.build(4, 2, hot_experts(load, 2))
    assert hot.counts(range(n)) == [[4] * n, [2] * n]      # rank 0 holds all four
    cpu = parse_devices("cpu", "1GB")
    kw = dict(batch_size=1, max_seq_len=SEQ, config=cfg, ep=2)
    a = make_plan(prof, cpu, "uniform", experts=plain, **kw).stages[0]
    b = make_plan(prof, cpu, "uniform", experts=hot, **kw).stages[0]
    assert a == make_plan(prof, cpu, "uniform", **kw).stages[0]   # None: the even shares
    assert b.weight_bytes - a.weight_bytes == pytest.approx(2 * n * per)
    # replicas of experts a rank already owns cost nothing
    own = ExpertPlacement.build(4, 2, {layer: [0] for layer in range(n)})
    assert own.counts(range(n)) == [[2] * n, [3] * n]
    c = make_plan(prof, cpu, "uniform", experts=own, **kw).stages[0]
    assert c.weight_bytes - a.weight_bytes == pytest.approx(n * per)


def test_devices_of_different_memory_get_shares_by_memory():
    """Two EP ranks, one device with half the other's memory: the even shares overflow the
    small one; shares by memory fit both, each rank counted against its own budget."""
    cfg = _config("moe_top1")   # 8 experts
    prof = profile(cfg, dtype="float32", seq_len=SEQ)
    n = cfg.num_layers
    even = CostModel.build(prof, 1, SEQ, ep=2).rank_memory(0, n, True, True)
    assert even[0] == even[1]
    shared = even[0] - 4 * n * _per_expert(prof)           # what every rank holds alike
    budgets = [shared + 5.5 * n * _per_expert(prof), shared + 3.5 * n * _per_expert(prof)]
    assert even[1] > budgets[1]                              # 4 experts do not fit rank 1
    by_memory = ExpertPlacement.build(8, 2, shares=memory_shares(8, budgets))
    assert [len(s) for s in by_memory.shares] == [5, 3]
    ranks = CostModel.build(prof, 1, SEQ, ep=2, placement=by_memory).rank_memory(0, n, True,
                                                                                 True)
    assert all(m <= b for m, b in zip(ranks, budgets))
    assert ranks[0] - ranks[1] == pytest.approx(2 * n * _per_expert(prof))


def test_run_with_hot_replicas_that_do_not_fit_is_refused_with_the_numbers(tmp_path):
    cfg = _config("moe_top2_gqa")
    prof = profile(cfg, dtype="float32", seq_len=SEQ)
    path = tmp_path / "load.json"
    path.write_text(json.dumps({str(i): [1, 2, 30, 40] for i in range(cfg.num_layers)}))
    assert run_placement(4, 2, 2, 2, str(path)) is None      # ep = tp: no replicas
    placement = run_placement(4, 2, 1, 2, str(path))
    assert placement.counts([0]) == [[4], [2]]
    kw = dict(batch_size=1, max_seq_len=SEQ, config=cfg, ep=2)
    cpu = parse_devices("cpu", "1GB")
    fits = make_plan(prof, cpu, "uniform", **kw).stages[0].memory_bytes
    hot = make_plan(prof, cpu, "uniform", experts=placement, **kw).stages[0].memory_bytes
    budget = str(int((fits + hot) / 2 / 0.9))                # between them, after headroom
    run = dict(devices="cpu", max_memory=budget, dtype="float32", max_batch=1,
               max_seq_len=SEQ, ep=2)
    assert resolve_layout(cfg, **run).plan.stages[0].memory_bytes == fits
    with pytest.raises(PlanningError, match=r"does not fit: .*counted with the hot-expert "
                                            r"replicas .*EP rank 0 holds up to 4 experts per "
                                            r"layer \(2 of its own \+ 2 hot replicas"):
        resolve_layout(cfg, experts=placement, **run)


@pytest.fixture(scope="module")
def mixtral(tiny_mixtrals):
    return tiny_mixtrals["moe_top2_gqa"]


def test_plan_prints_each_ranks_experts(mixtral, tmp_path, capsys):
    from llamadist.cli.main import main
    load = tmp_path / "load.json"
    load.write_text(json.dumps({str(i): [1, 2, 30, 40] for i in range(3)}))
    flags = ["plan", str(mixtral), "--devices", "cpu", "--dp", "2", "--ep", "2",
             "--max-memory", "1GB", "--max-seq-len", str(SEQ)]
    assert main(flags) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("experts of stage 0")]
    per = format_bytes(2 * 3 * _per_expert(profile(open_checkpoint(mixtral).config,
                                                   dtype="float32", seq_len=SEQ)))
    assert len(lines) == 1 and f"ranks 0-1: 2 experts/layer, {per} each" in lines[0]
    assert main([*flags, "--hot-experts", "2", "--expert-load", str(load)]) == 0
    hot = capsys.readouterr().out
    line = next(x for x in hot.splitlines() if x.startswith("experts of stage 0"))
    assert "rank 0: 2 + 2 hot experts/layer" in line and "rank 1: 2 experts/layer" in line
    assert "(memory counts rank 0's)" in line
    weights = []
    for extra in ([], ["--hot-experts", "2", "--expert-load", str(load)]):
        assert main([*flags, *extra, "--json"]) == 0
        weights.append(json.loads(capsys.readouterr().out)["stages"][0]["weight_bytes"])
    prof = profile(open_checkpoint(mixtral).config, dtype="float32", seq_len=SEQ)
    assert weights[1] - weights[0] == pytest.approx(2 * 3 * _per_expert(prof))  # 2 a layer
    # a budget between the two: refused with the numbers, by every strategy
    hot = ["--hot-experts", "2", "--expert-load", str(load)]
    # (the KV cache, 24 KiB here, is far less than half the replicas' bytes; 10% headroom)
    assert 3 * 2 * 16 * 4 * SEQ < (weights[1] - weights[0]) / 4
    budget = str(int((sum(weights) / 2 + 3 * 2 * 16 * 4 * SEQ) / 0.9))
    small = [x if x != "1GB" else budget for x in flags]
    assert main(small) == 0
    capsys.readouterr()
    for strategy in ([], ["--strategy", "memory"]):
        assert main([*small, *hot, *strategy]) == 2
        err = capsys.readouterr().err
        assert "EP rank 0 holds up to 4 experts per layer (2 of its own + 2 hot replicas" in err
        assert "needs" in err and "budget" in err
    # replicas need experts over replicas (ep > tp), as the run commands say
    assert main(["plan", str(mixtral), "--devices", "cpu", "--tp", "2", "--hot-experts", "1",
                 "--expert-load", str(load)]) == 2
    assert "--hot-experts 1 goes with experts spread over data-parallel" in \
        capsys.readouterr().err


def test_run_command_refuses_replicas_that_do_not_fit(mixtral, tmp_path):
    """The run's Job (before any process starts) plans the replicas and refuses them."""
    from llamadist.cli.jobs import JOBS
    from llamadist.cli.main import build_parser
    ckpt = open_checkpoint(mixtral)
    prof = profile(ckpt.config, dtype="float32", seq_len=SEQ)
    cpu = parse_devices("cpu", "1GB")
    kw = dict(batch_size=1, max_seq_len=SEQ, config=ckpt.config, ep=2)
    fits = make_plan(prof, cpu, "uniform", **kw).stages[0].memory_bytes
    load = tmp_path / "load.json"
    load.write_text(json.dumps({str(i): [1, 2, 30, 40] for i in range(3)}))
    base = ["generate", str(mixtral), "--devices", "cpu", "--dp", "2", "--ep", "2",
            "--max-seq-len", str(SEQ), "--prompt", "hi", "--max-new-tokens", "2",
            "--max-memory", str(int(fits * 1.05 / 0.9))]
    job = JOBS["generate"](build_parser().parse_args(base), ckpt, ckpt.tokenizer())
    assert job.layout.ep == 2 and job.layout.plan.stages[0].memory_bytes == fits
    args = build_parser().parse_args([*base, "--hot-experts", "2", "--expert-load", str(load)])
    with pytest.raises(PlanningError, match="EP rank 0 holds up to 4 experts per layer"):
        JOBS["generate"](args, ckpt, ckpt.tokenizer())


def test_auto_refuses_hot_experts(mixtral, tmp_path, capsys):
    """--auto keeps each replica's experts to itself: replicas would be ignored."""
    from llamadist.cli.main import main
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"0": [1, 2, 3, 4]}))
    for cmd in (["plan", str(mixtral)], ["generate", str(mixtral), "--prompt", "hi"]):
        assert main([*cmd, "--auto", "--devices", "cpu", "--hot-experts", "1",
                     "--expert-load", str(load)]) == 2
        assert "--hot-experts 1 goes with experts spread over data-parallel replicas, " \
               "which --auto does not plan" in capsys.readouterr().err


def test_run_shares_is_the_one_choice():
    """run_shares: --expert-split even / memory, by default memory when the EP ranks'
    budgets differ; run_placement builds the planner's placement from it."""
    from llamadist.planning.experts import run_shares
    assert run_shares(8, 2) == run_shares(8, 2, [7, 7]) == expert_shares(8, 2)
    assert run_shares(8, 2, [300e6, 150e6]) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert run_shares(8, 2, [300e6, 150e6], "even") == expert_shares(8, 2)
    assert run_shares(8, 2, [300e6, 150e6], "memory") == memory_shares(8, [2, 1])
    assert run_shares(4, 2, [2, 1]) == [[0, 1, 2], [3]]
    with pytest.raises(PlanningError, match="needs each EP rank's budget"):
        run_shares(8, 2, None, "memory")
    with pytest.raises(PlanningError, match="3 expert budgets for ep=2"):
        run_shares(8, 2, [1, 2, 3])
    with pytest.raises(PlanningError, match="--expert-split must be one of"):
        run_shares(8, 2, [1, 2], "fast")
    # the placement: None where it is the even shares without replicas (the planner's
    # default), else the uneven shares, with or without hot replicas
    assert run_placement(8, 2, 1, 0, None, [5, 5]) is None
    assert run_placement(8, 2, 1, 0, None, [2, 1], "even") is None
    assert run_placement(8, 2, 2, 0, None, [2, 1]) is None        # ep = tp: the TP pass's
    p = run_placement(8, 2, 1, 0, None, [2, 1])
    assert p.shares == ((0, 1, 2, 3, 4), (5, 6, 7)) and p.hot == ()
    assert p.counts([0, 1]) == [[5, 5], [3, 3]]
    # TP x DP: EP rank d * tp + t, budgets in that order; ranks of one TP index replicate
    # only the hot experts their group owns
    grid = run_placement(8, 4, 2, 0, None, [4, 2, 1, 1])
    assert [len(s) for s in grid.shares] == [4, 2, 1, 1]


def test_plan_prints_uneven_shares(tmp_path):
    from llamadist.planning.experts import expert_rank_lines
    p = ExpertPlacement.build(8, 2, shares=memory_shares(8, [2, 1]))
    lines = expert_rank_lines([(0, 2)], p, 10.0, [0, 1])
    assert lines[0] == ("expert shares per EP rank (uneven, every MoE layer): rank 0: "
                        "experts 0-4; rank 1: experts 5-7")
    assert "rank 0: 5 experts/layer, 100 B; rank 1: 3 experts/layer, 60 B" in lines[1]
    even = expert_rank_lines([(0, 2)], ExpertPlacement.build(8, 2), 10.0, [0, 1])
    assert len(even) == 1 and even[0].startswith("experts of stage 0")


def test_run_layout_carries_the_shares_each_rank_checked(mixtral):
    """`--devices cpu,cpu --max-memory A,B` over --dp 2 --ep 2 (one budget per EP rank):
    the Job's layout holds the shares by memory (what every rank is handed, JSON and
    RankSpec alike), the planner counts them, each rank is checked against its own
    budget; --expert-split even with a rank too small for half the experts is refused."""
    from llamadist.cli.front import rank_spec_of
    from llamadist.cli.jobs import JOBS
    from llamadist.cli.main import build_parser
    from llamadist.planning.layout import Layout
    ckpt = open_checkpoint(mixtral)   # 4 experts, 3 layers
    base = ["generate", str(mixtral), "--devices", "cpu,cpu", "--dp", "2", "--ep", "2",
            "--max-seq-len", str(SEQ), "--prompt", "hi", "--max-new-tokens", "2"]

    def job(*flags):
        return JOBS["generate"](build_parser().parse_args([*base, *flags]), ckpt,
                                ckpt.tokenizer())
    prof = profile(ckpt.config, dtype="float32", seq_len=SEQ)
    per, n = _per_expert(prof), ckpt.config.num_layers
    even = job("--max-memory", "1GB,1GB").layout
    assert even.expert_shares == () and even.ep == 2
    fits = even.plan.stages[0].memory_bytes          # 2 experts a layer on each rank
    small = int((fits - 0.5 * n * per) / 0.9)        # rank 1: room for 1.5 a layer
    big = int((fits + 1.5 * n * per) / 0.9)
    uneven = job("--max-memory", f"{big},{small}").layout
    assert uneven.expert_shares == ((0, 1, 2), (3,))   # memory_shares(4, [big, small])
    assert uneven.plan.stages[0].memory_bytes == pytest.approx(fits + n * per)
    assert Layout.from_json(uneven.to_json()).expert_shares == uneven.expert_shares
    assert rank_spec_of(job("--max-memory", f"{big},{small}")).expert_shares == \
        ((0, 1, 2), (3,))
    with pytest.raises(PlanningError, match=r"stage 0 EP rank 1: needs .*\(2 experts per "
                                            r"layer\) but its --max-memory .* leaves"):
        job("--max-memory", f"{big},{small}", "--expert-split", "even")
    with pytest.raises(PlanningError, match="no 'auto' entries"):
        job("--max-memory", "1GB,auto")


def test_expert_split_refusals(mixtral, capsys):
    """--expert-split needs experts over replicas, and by memory a budget per EP rank."""
    from llamadist.cli.main import main
    base = ["plan", str(mixtral), "--max-seq-len", str(SEQ)]
    assert main([*base, "--tp", "2", "--expert-split", "memory"]) == 2
    assert "--expert-split memory goes with experts spread over data-parallel" in \
        capsys.readouterr().err
    assert main([*base, "--dp", "2", "--ep", "2", "--max-memory", "1GB",
                 "--expert-split", "memory"]) == 2
    assert "--expert-split memory needs each EP rank's budget" in capsys.readouterr().err
    assert main([*base, "--auto", "--devices", "cpu", "--expert-split", "even"]) == 2
    assert "--expert-split even goes with experts spread over data-parallel replicas, " \
           "which --auto does not plan" in capsys.readouterr().err
    # budgets alike: the even shares, as without them
    assert main([*base, "--dp", "2", "--ep", "2", "--devices", "cpu,cpu",
                 "--max-memory", "1GB,1GB"]) == 0
    out = capsys.readouterr().out
    assert "expert shares per EP rank" not in out and "ranks 0-1: 2 experts/layer" in out
    assert main([*base, "--dp", "2", "--ep", "2", "--devices", "cpu,cpu",
                 "--max-memory", "1GB,500MB"]) == 0
    assert "rank 0: experts 0-2; rank 1: expert 3" in capsys.readouterr().out


def test_budgets_per_ep_rank_of_each_stage(mixtral):
    """--pp 2 --dp 2 --ep 2: four budgets, stage by stage; one placement serves both
    stages, so each rank's smallest room per MoE layer decides (stage 0 holds 2 of the 3
    layers, stage 1 one: a rank's 200MB there is its smallest)."""
    from llamadist.cli.jobs import JOBS
    from llamadist.cli.main import build_parser
    ckpt = open_checkpoint(mixtral)
    base = ["generate", str(mixtral), "--pp", "2", "--dp", "2", "--ep", "2",
            "--max-seq-len", str(SEQ), "--prompt", "hi", "--max-new-tokens", "2"]

    def layout(*flags):
        return JOBS["generate"](build_parser().parse_args([*base, *flags]), ckpt,
                                ckpt.tokenizer()).layout
    same = layout("--devices", "cpu,cpu,cpu,cpu", "--max-memory", "1GB,1GB,1GB,1GB")
    assert same.expert_shares == () and same.pp == 2
    assert layout("--max-memory", "1GB,1GB,1GB,200MB").expert_shares == ((0, 1, 2), (3,))
    assert layout("--max-memory", "1GB,1GB,200MB,1GB").expert_shares == ((0,), (1, 2, 3))
    with pytest.raises(PlanningError, match="the EP ranks of one stage name different"):
        layout("--devices", "cpu,cuda:0,cpu,cpu", "--max-memory", "1GB,1GB,1GB,400MB")
