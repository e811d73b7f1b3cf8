"""Experts spread over a stage's tp x dp ranks (--ep = tp x dp) in the multi-process
engine: attention data-parallel (each replica its own requests and KV blocks) or
tensor-parallel inside each replica, the replicas stepping in lockstep (an empty step
where a replica has nothing, so the others' MoE collectives complete).

Three launches of tests/dist/engine_worker.py on a tiny Mixtral (4 experts, top-2, GQA,
3 layers) against one process's static engine: dp 2 x ep 2 (gather dispatch), tp 2 x dp 2
x ep 4 (all-to-all) and pp 2 x dp 2 x ep 2 (auto); then the command line's --ep once.
Greedy tokens equal, logits of every sampled row within 1e-4 (the collectives only reorder
float sums).

Uneven expert shares (devices of different memory, issue 17) on a tiny Mixtral of 8
experts: 5 / 3 over dp 2 x ep 2 with the gather, the all-to-all and hot replicas, 3/2/2/1
over tp 2 x dp 2, 1 / 7 over two stages; each rank holds exactly its share (and its
replicas); and the command line's per-rank --max-memory loading what `plan` prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamadist.distributed.launch import Launcher
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint
from tests.dist.test_pipeline import ROOT, WORKER, Recorder, worker_env

LOGIT_TOL = 1e-4
MAX_SEQ, NEW, BLOCK = 64, 8, 4
MODEL = "moe_top2_gqa"
PROMPTS = ["The quick brown fox", "Distributed inference splits a model", "1 2 3",
           "Once upon a time there was a tiny language model", "def main():"]
GREEDY = dict(max_new_tokens=NEW, ignore_eos=True)


def encode_prompts(model) -> list[list[int]]:
    tok = open_checkpoint(model).tokenizer()
    return [tok.encode(p) for p in PROMPTS]


def one_process(model, encoded: list[list[int]]) -> dict:
    """The greedy tokens and every step's logits of ``model`` in one process."""
    rec = Recorder(Engine.load(str(model), max_batch=len(encoded), max_seq_len=MAX_SEQ))
    results = generate(rec, None, encoded, SamplingParams(**GREEDY))
    return {"tokens": [r.token_ids for r in results], "logits": rec.steps}


@pytest.fixture(scope="module")
def moe_encoded(tiny_mixtrals) -> list[list[int]]:
    return encode_prompts(tiny_mixtrals[MODEL])


@pytest.fixture(scope="module")
def moe_reference(tiny_mixtrals, moe_encoded) -> dict:
    return one_process(tiny_mixtrals[MODEL], moe_encoded)


def ep_world(tmp: Path, model: Path, prompts, *, pp: int, tp: int, dp: int, ep: int,
             ranges: list, dispatch: str = "auto", **extra) -> dict[str, dict]:
    """``extra``: more of engine_worker's config (expert_shares, hot_experts, expert_load)."""
    # b5: every prompt at once (3 on replica 0, 2 on replica 1); b1: one at a time per
    # replica, so replica 1 finishes first and runs empty steps while replica 0 works
    jobs = [{"name": "b5", "max_batch": 5, "params": GREEDY, "warmup": True},
            {"name": "b1", "max_batch": 1, "params": GREEDY}]
    cfg = {"model": str(model), "out": str(tmp), "pp": pp, "tp": tp, "dp": dp, "ep": ep,
           "ep_dispatch": dispatch,
           "layer_ranges": ranges, "max_seq_len": MAX_SEQ, "prompts": prompts, "jobs": jobs,
           "block_size": BLOCK, "num_blocks": len(prompts) * MAX_SEQ // BLOCK + 1, **extra}
    (tmp / "config.json").write_text(json.dumps(cfg))
    code = Launcher([str(WORKER), str(tmp / "config.json")], pp * tp * dp,
                    env=worker_env()).run()
    assert code == 0, f"workers failed with exit code {code}"
    return {j["name"]: torch.load(tmp / f"{j['name']}.pt") for j in jobs}


def check(got: dict, ref: dict, name: str) -> None:
    assert got["tokens"] == ref["tokens"]
    logits = got["logits"]
    assert len(logits) == sum(len(s) for s in ref["logits"])
    worst = max((logits[(f"{name}/{row}", step)] - r[row]).abs().max().item()
                for step, r in enumerate(ref["logits"]) for row in range(r.shape[0]))
    assert worst <= LOGIT_TOL, f"max abs logit difference {worst:.2e} > {LOGIT_TOL}"


GRIDS = {  # name: (pp, tp, dp, ep, layer ranges, --ep-dispatch)
    "dp2_ep2": (1, 1, 2, 2, [[0, 3]], "gather"),
    "tp2_dp2_ep4": (1, 2, 2, 4, [[0, 3]], "all_to_all"),
    "pp2_dp2_ep2": (2, 1, 2, 2, [[0, 2], [2, 3]], "auto"),  # the CPU's auto: all-to-all
}


@pytest.fixture(scope="module", params=list(GRIDS))
def grid_run(request, tiny_mixtrals, moe_encoded, tmp_path_factory):
    pp, tp, dp, ep, ranges, dispatch = GRIDS[request.param]
    return request.param, ep_world(tmp_path_factory.mktemp(request.param),
                                   tiny_mixtrals[MODEL], moe_encoded, pp=pp, tp=tp, dp=dp,
                                   ep=ep, ranges=ranges, dispatch=dispatch)


def test_experts_over_replicas_match_one_process(grid_run, moe_reference):
    name, results = grid_run
    pp, tp, dp, *_ = GRIDS[name]
    for job in ("b5", "b1"):
        check(results[job], moe_reference, job)
    # lockstep: every rank of a stage ran every round, although the replicas' work
    # differed (b1: replica 1 ran out first and joined with empty steps)
    steps = [s for s, _ in results["b1"]["rank_steps"]]
    computed = [c for _, c in results["b1"]["rank_steps"]]
    assert len(steps) == pp * tp * dp and len(set(steps)) == 1, steps
    assert min(computed) < steps[0], (steps, computed)  # some rank joined empty steps


CLI_PROMPTS = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--prompt", PROMPTS[4]]


def cli_generate(model: Path, *flags: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "llamadist", "generate", str(model), *CLI_PROMPTS,
            "--max-new-tokens", str(NEW), "--json", "--stats", *flags]
    return subprocess.run(args, cwd=ROOT, env=worker_env(), text=True, capture_output=True,
                          timeout=240)


@pytest.fixture(scope="module")
def one_process_cli(tiny_mixtrals) -> list[dict]:
    one = cli_generate(tiny_mixtrals[MODEL])
    assert one.returncode == 0, one.stderr[-2000:]
    return [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")]


def ep_reports(model, one_process_cli, *flags: str) -> list[dict]:
    """`generate --nproc 2 --ep 2 FLAGS`: its greedy tokens equal one process's; -> the
    ranks' reports (their expert_load lines)."""
    many = cli_generate(model, "--nproc", "2", "--ep", "2", *flags)
    assert many.returncode == 0, many.stderr[-2000:]
    got = [json.loads(line)["token_ids"] for line in many.stdout.splitlines()
           if line.startswith("{")]
    assert got == [q["token_ids"] for q in one_process_cli] and len(got) == 3
    return [json.loads(line) for line in many.stderr.splitlines()
            if line.startswith("{") and '"expert_load"' in line]


def test_cli_ep_over_data_parallel_replicas(tiny_mixtrals, one_process_cli):
    """`--nproc 2 --ep 2` (dp 2 inferred): the one-process greedy tokens of each prompt."""
    reports = ep_reports(tiny_mixtrals[MODEL], one_process_cli)
    # two ranks, each holding 2 of the 4 experts, each counting every routed token (the
    # all-to-all of --ep-dispatch auto on the CPU: the header carries each rank's counts):
    # top-2 of every prompt token and of every decoded token but the last
    assert [r["dp"] for r in reports] == [0, 1]
    tokens = sum(len(q["prompt_token_ids"]) + NEW - 1 for q in one_process_cli)
    loads = [r["expert_load"] for r in reports]
    assert loads[0] == loads[1] and sorted(loads[0]) == ["0", "1", "2"]
    assert all(sum(counts) == 2 * tokens for counts in loads[0].values())


def test_cli_hot_experts(tiny_mixtrals, one_process_cli, tmp_path):
    """`--hot-experts 2 --expert-load FILE`: each layer's two busiest experts by the file
    (one of each rank's share in layer 0) on both ranks: the same tokens."""
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"0": [1, 9, 8, 2], "1": [5, 5, 0, 1], "2": [0, 0, 3, 7]}))
    reports = ep_reports(tiny_mixtrals[MODEL], one_process_cli, "--ep-dispatch",
                         "all_to_all", "--hot-experts", "2", "--expert-load", str(load))
    want = {"0": [1, 2], "1": [0, 1], "2": [2, 3]}  # ties: the lower index
    assert [r.get("expert_replicas") for r in reports] == [want, want]


# ---- uneven expert shares (devices of different memory) --------------------------------
UNEVEN = "moe_top1"   # 8 experts, top-1, 2 layers
SHARES = [[0, 1, 2, 3, 4], [5, 6, 7]]   # memory_shares(8, [2, 1]): the 300MB,150MB split
UNEVEN_LOAD = {"0": [1, 2, 3, 4, 5, 6, 90, 8], "1": [50, 1, 1, 1, 1, 1, 1, 60]}


@pytest.fixture(scope="module")
def uneven_encoded(tiny_mixtrals) -> list[list[int]]:
    return encode_prompts(tiny_mixtrals[UNEVEN])


@pytest.fixture(scope="module")
def uneven_reference(tiny_mixtrals, uneven_encoded) -> dict:
    return one_process(tiny_mixtrals[UNEVEN], uneven_encoded)


UNEVEN_RUNS = {  # name: (pp, tp, --ep-dispatch, --hot-experts, shares of the tp x 2 EP ranks)
    "gather": (1, 1, "gather", 0, SHARES),
    "all_to_all": (1, 1, "all_to_all", 0, SHARES),
    "all_to_all_hot": (1, 1, "all_to_all", 2, SHARES),
    # tp 2 x dp 2: the DP group of TP index t holds shares t and 2 + t (3 + 1 and 2 + 2)
    "tp2_all_to_all_hot": (1, 2, "all_to_all", 2, [[0, 1, 2], [3, 4], [5, 6], [7]]),
    # two stages (one MoE layer each), the same shares on both
    "pp2_auto": (2, 1, "auto", 0, [[0], [1, 2, 3, 4, 5, 6, 7]]),
}


@pytest.mark.parametrize("name", list(UNEVEN_RUNS))
def test_uneven_shares_match_one_process(name, tiny_mixtrals, uneven_encoded,
                                         uneven_reference, tmp_path):
    """dp 2 x ep 2 over 8 experts held 5 / 3 (the shares by memory of a 2:1 budget): each
    rank loads exactly its share (and its hot replicas), the dispatch routes each expert
    to its owner, not by E / ep: tokens equal, logits within 1e-4."""
    pp, tp, dispatch, hot, shares = UNEVEN_RUNS[name]
    extra = dict(expert_shares=shares)
    if hot:
        (tmp_path / "load.json").write_text(json.dumps(UNEVEN_LOAD))
        extra.update(hot_experts=hot, expert_load=str(tmp_path / "load.json"))
    ranges = [[0, 2]] if pp == 1 else [[0, 1], [1, 2]]
    results = ep_world(tmp_path, tiny_mixtrals[UNEVEN], uneven_encoded, pp=pp, tp=tp, dp=2,
                       ep=2 * tp, ranges=ranges, dispatch=dispatch, **extra)
    for job in ("b5", "b1"):
        check(results[job], uneven_reference, job)
    # hot: each layer's 2 busiest by the file (6, 7 and 0, 7); a rank holds copies of
    # those its TP index's group owns (world rank d * tp + t is EP rank d * tp + t)
    hot_of = {"0": {6, 7}, "1": {0, 7}} if hot else {"0": set(), "1": set()}
    group = [{e for s in shares[r % tp::tp] for e in s} for r in range(len(shares))]
    want = [{layer: sorted(set(share) | (hot_of[layer] & group[r])) for layer in ("0", "1")}
            for r, share in enumerate(shares)]
    if pp == 1:
        assert list(results["b5"]["rank_experts"]) == want
        return
    # world rank = dp * pp + stage (pp inside dp): stage s holds layer s of each share
    got = results["b5"]["rank_experts"]
    assert [got[d * pp + s] for d in range(2) for s in range(pp)] == \
        [{str(s): want[d][str(s)]} for d in range(2) for s in range(pp)]


def test_cli_uneven_budgets(tiny_mixtrals, tmp_path):
    """`--devices cpu,cpu --max-memory 300MB,150MB` (one budget per EP rank): rank 0 loads
    experts 0-4, rank 1 experts 5-7 (what `plan` prints for the same flags), the greedy
    tokens of one process, with either dispatch and with hot replicas on top;
    `--expert-split even` keeps 4 / 4."""
    model = tiny_mixtrals[UNEVEN]
    one = cli_generate(model)
    assert one.returncode == 0, one.stderr[-2000:]
    ref = [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")]
    budgets = ("--devices", "cpu,cpu", "--max-memory", "300MB,150MB")
    plan = subprocess.run([sys.executable, "-m", "llamadist", "plan", str(model), "--dp", "2",
                           "--ep", "2", *budgets, "--max-seq-len", str(MAX_SEQ)], cwd=ROOT,
                          env=worker_env(), text=True, capture_output=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "rank 0: experts 0-4; rank 1: experts 5-7" in plan.stdout
    assert "rank 0: 5 experts/layer" in plan.stdout and "rank 1: 3 experts/layer" in plan.stdout
    load = tmp_path / "load.json"
    load.write_text(json.dumps(UNEVEN_LOAD))
    runs = {("--ep-dispatch", "gather"): {}, ("--ep-dispatch", "all_to_all", "--hot-experts",
                                             "2", "--expert-load", str(load)):
            {"0": [6, 7], "1": [0, 7]}}
    for flags, hot in runs.items():
        reports = ep_reports(model, ref, *budgets, *flags)
        assert [r["dp"] for r in reports] == [0, 1]
        assert [r["experts"] for r in reports] == [{"0": s, "1": s} for s in SHARES]
        held = [sum(len(set(s) | set(hot.get(layer, ()))) for layer in ("0", "1"))
                for s in SHARES]
        per_expert = 3 * 64 * 128 * 4   # w1, w2, w3 of D=64, I=128 in float32
        assert (reports[0]["weight_bytes"] - reports[1]["weight_bytes"]
                == (held[0] - held[1]) * per_expert)
        assert [r.get("expert_replicas", {}) for r in reports] == [
            {k: [e for e in v] for k, v in hot.items()}] * 2
    even = ep_reports(model, ref, *budgets, "--expert-split", "even")
    assert [r["experts"] for r in even] == [{"0": s, "1": s} for s in ([0, 1, 2, 3],
                                                                         [4, 5, 6, 7])]
