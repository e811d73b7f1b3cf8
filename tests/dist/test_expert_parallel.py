"""Expert parallelism on CPU: gloo processes against one process on the same tiny random
Mixtral weights (tests.tiny.MOE_CONFIGS), at the stage level (runtime.stage.build_stage
with the pass of llamadist.parallel.expert) and through the continuous-batching engine.

Two spawns: a world of 2 (ep 2 with 4 experts and with 3 uneven experts, ep 2 with
tensor-parallel attention on the same ranks, ep 2 "gather" dispatch with a different
prompt on each rank, the paged engine, and a model cut into two pipeline stages), a world
of 4 (ep 4 with 8 and 4 experts).
Tolerance: 1e-4 max abs logit difference in float32 (the reduce only reorders sums).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamadist.config import ModelConfig
from llamadist.parallel.expert import (ExpertParallelError, apply_expert_parallel,
                                       expert_shares)
from tests.dist.test_tensor_parallel import RecordingCheckpoint

LOGIT_TOL = 1e-4
NEW_TOKENS, MAX_SEQ = 16, 64
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [40, 41, 300, 7, 9, 200, 100, 3, 77]]


# ---- the in-test driver (runs inside each spawned rank) ----------------------
def _build(job: dict, rank: int, world: int, groups, lanes: int = 1,
           layers: range | None = None):
    from llamadist.parallel.expert import expert_parallel_pass
    from llamadist.parallel.tensor import tensor_parallel_pass
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.safetensors_ckpt import HFCheckpoint
    ckpt = RecordingCheckpoint(HFCheckpoint(Path(job["folder"])))
    cfg = ckpt.config
    ep = groups.ep
    if job.get("tp"):  # attention tensor-parallel; the TP pass spreads the experts (EP = TP)
        kw = tensor_parallel_pass(cfg, groups.tp.device_group, rank, world)
    else:
        kw = expert_parallel_pass(cfg, ep.device_group, ep.rank_in_group, ep.world_size,
                                  job.get("dispatch", "replicated"),
                                  placement=job.get("placement"))
    layers = range(cfg.num_layers) if layers is None else layers
    stage = build_stage(ckpt, layers, "cpu", torch.float32, 2, MAX_SEQ, lanes=lanes, **kw)
    return ckpt, stage


def _decode(stage, last: torch.Tensor, pos: int) -> list[int]:
    out = []
    for i in range(NEW_TOKENS):
        tok = last.argmax(-1)
        out.append(int(tok))
        last = stage.forward(tok.view(1, 1), torch.tensor([[pos + i]]), pos + i, None)[:, -1]
    return out


def _stage_job(job: dict, rank: int, world: int, groups) -> dict:
    ckpt, stage = _build(job, rank, world, groups)
    # token-local dispatches: each rank serves its own prompt (data-parallel attention)
    local = job.get("dispatch") in ("gather", "all_to_all", "auto")
    prompt = PROMPTS[rank % 2] if local else PROMPTS[0]
    ids, t = torch.tensor([prompt]), len(prompt)
    with torch.inference_mode():
        prefill = stage.forward(ids, torch.arange(t).view(1, t), 0, None, logits="all")
        greedy = _decode(stage, prefill[:, -1], t)
    moe = stage.model.model.layers["0"].block_sparse_moe
    return {"prefill": prefill[0].clone(), "greedy": greedy, "prompt": prompt,
            "reads": [n for n, *_ in ckpt.reads], "experts": sorted(map(int, moe.experts))}


class _TwoStages:
    """Layers [0, 1) then [1, L): a pipeline cut, each stage expert-parallel on its own
    (both in this process; the hidden state passes between them directly)."""

    def __init__(self, first, second):
        self.stages = (first, second)

    def forward(self, x, positions, start, mask, logits="last"):
        h = self.stages[0].forward(x, positions, start, mask)  # (B, T, D) hidden
        return self.stages[1].forward(h, positions, start, mask, logits=logits)


def _pipeline_job(job: dict, rank: int, world: int, groups) -> dict:
    ckpt, first = _build(job, rank, world, groups, layers=range(1))
    ckpt2, second = _build(job, rank, world, groups, layers=range(1, ckpt.config.num_layers))
    assert first.model.has_embed and not first.model.has_head and second.model.has_head
    pipe = _TwoStages(first, second)
    prompt = PROMPTS[0]
    ids, t = torch.tensor([prompt]), len(prompt)
    with torch.inference_mode():
        prefill = pipe.forward(ids, torch.arange(t).view(1, t), 0, None, logits="all")
        greedy = _decode(pipe, prefill[:, -1], t)
    moe = second.model.model.layers["1"].block_sparse_moe
    return {"prefill": prefill[0].clone(), "greedy": greedy, "prompt": prompt,
            "reads": [n for n, *_ in ckpt.reads + ckpt2.reads],
            "experts": sorted(map(int, moe.experts))}


def _module_job(job: dict, rank: int, world: int, groups) -> dict:
    """A token-local dispatch at the module level, several steps of uneven token counts
    (``steps``: the tokens of each data-parallel replica per step; zero: a replica with
    nothing to do still joins the collectives), experts placed as ``placement`` says.
    ``tp``: the grid's TP x DP = EP form (world 4: replicas of 2 TP ranks; the TP ranks
    of a replica hold the same tokens, different experts)."""
    import dataclasses

    from llamadist.model.moe import SparseMoE, count_routing
    from llamadist.parallel.expert import apply_expert_parallel, hot_experts
    cfg = ModelConfig.from_json_file(Path(job["folder"]) / "config.json")
    cfg = dataclasses.replace(cfg, num_experts=job.get("experts", cfg.num_experts))
    torch.manual_seed(0)  # the same full block on every rank
    full = SparseMoE(cfg)
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(16, cfg.hidden_size)  # replica d's tokens: x[8 d:]
    tp = job.get("tp", 1)
    if tp > 1:  # every rank makes every group, in the same order
        tps = [dist.new_group([d * tp + t for t in range(tp)]) for d in range(world // tp)]
        dps = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
        group, reduce_group = dps[rank % tp], tps[rank // tp]
    else:
        group, reduce_group = groups.ep.device_group, None
    placement = job.get("placement") or expert_shares(cfg.num_experts, world)
    replicas, hot_load = job.get("replicas", []), None
    if job.get("hot"):  # the most-loaded experts by the counters, after one counted pass
        count_routing(full)
        with torch.no_grad():
            full(x)
        hot_load = full.routed.tolist()
        replicas = hot_experts({0: hot_load}, job["hot"])[0]
    model = _one_moe_layer(cfg)  # through the pass: it projects the placement on the group
    apply_expert_parallel(model, group, rank, world, job["dispatch"],
                          reduce_group=reduce_group, placement=placement,
                          crossover=job.get("crossover", 0),
                          replicas={0: replicas})
    part = model.model.layers["0"].block_sparse_moe
    part.to_empty(device="cpu")
    loaded = part.load_state_dict(full.state_dict(), strict=False)  # its experts, the router
    assert not loaded.missing_keys
    count_routing(part)
    count_routing(full)
    replica = rank // tp
    got, want = [], []
    with torch.no_grad():
        for counts in job["steps"]:
            mine = x[8 * replica:8 * replica + counts[replica]]
            got.append(part(mine.unsqueeze(0)))
            want.append(full(mine.unsqueeze(0)))
    return {"got": got, "want": want, "held": sorted(map(int, part.experts)),
            "dispatched": dict(part.dispatched), "rows_out": part.rows_out,
            "routed": part.routed.tolist(), "routed_here": full.routed.tolist(),
            "replicas": part.replicas, "hot_load": hot_load}


def _one_moe_layer(cfg: ModelConfig):
    """A meta-built one-layer model around ``cfg``'s MoE block (apply_expert_parallel
    replaces its block)."""
    import dataclasses

    from llamadist.model.llama import Llama
    with torch.device("meta"):
        return Llama(dataclasses.replace(cfg, num_layers=1))


def _engine_job(job: dict, rank: int, world: int, groups) -> dict:
    """Two prompts batched continuously by the paged engine on every rank in lockstep
    (the scheduler is deterministic, so every rank runs the same steps)."""
    from llamadist.config import RuntimeConfig
    from llamadist.engine.engine import LLMEngine
    from llamadist.generation.sampling import SamplingParams
    from llamadist.runtime.engine import Engine
    ckpt, stage = _build(job, rank, world, groups, lanes=0)
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=2)
    llm = LLMEngine(Engine(ckpt.config, [stage], ckpt, runtime), None, runtime)
    reqs, steps = llm.submit(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for _ in steps:
        pass
    return {"tokens": [r.output_ids for r in reqs], "load": stage.expert_load()}


def _worker(rank: int, world: int, store: str, jobs: list[dict], out_dir: str) -> None:
    from llamadist.distributed.groups import DistContext, ParallelGroups
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # One stage: world 2 is tp=2 (EP over the TP ranks), world 4 is dp=4 (EP over the
        # replicas); either way the ep group is all ranks, passed explicitly.
        ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
        tp = 2 if world == 2 else 1
        groups = ParallelGroups(ctx, pp=1, tp=tp, dp=world // tp, expert_parallel=True)
        assert groups.ep.ranks == list(range(world))
        for job in jobs:
            run = {"engine": _engine_job, "pipeline": _pipeline_job,
                   "module": _module_job}.get(job.get("kind"), _stage_job)
            torch.save(run(job, rank, world, groups), Path(out_dir) / f"{job['name']}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ep(world: int, jobs: list[dict], tmp: Path) -> dict[str, list[dict]]:
    tmp.mkdir(parents=True, exist_ok=True)
    store = tempfile.mktemp(dir=tmp, prefix="store")
    mp.spawn(_worker, args=(world, store, jobs, str(tmp)), nprocs=world, join=True)
    return {j["name"]: [torch.load(tmp / f"{j['name']}.{r}.pt", weights_only=False)
                        for r in range(world)] for j in jobs}


# ---- references (parent process) ----------------------------------------------
def reference(folder: Path, prompt: list[int]) -> dict:
    import transformers
    from llamadist.generation.generate import generate
    from llamadist.generation.sampling import SamplingParams
    from llamadist.runtime.engine import Engine
    ids = torch.tensor([prompt])
    hf = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(ids).logits[0]
    eng = Engine.load(str(folder), max_seq_len=MAX_SEQ)
    logits = eng.forward(ids, torch.arange(len(prompt)).view(1, -1), 0, logits="all")[0]
    tokens = generate(eng, None, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS,
                                                          ignore_eos=True))[0].token_ids
    return {"hf_logits": hf_logits, "logits": logits, "tokens": tokens}


@pytest.fixture(scope="module")
def refs(tiny_mixtrals):
    return {(k, i): reference(f, p) for k, f in tiny_mixtrals.items()
            for i, p in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def ep2(tiny_mixtrals, tmp_path_factory):
    f = {k: str(v) for k, v in tiny_mixtrals.items()}
    jobs = [{"name": "top2", "folder": f["moe_top2_gqa"]},
            {"name": "uneven", "folder": f["moe_e3_tied"]},
            {"name": "tp_ep", "folder": f["moe_top2_gqa"], "tp": True},
            {"name": "gather", "folder": f["moe_top1"], "dispatch": "gather"},
            {"name": "engine", "folder": f["moe_top1"], "kind": "engine"},
            {"name": "pipeline", "folder": f["moe_top2_gqa"], "kind": "pipeline"},
            {"name": "module", "folder": f["moe_top2_gqa"], "kind": "module",
             "dispatch": "gather", "steps": [[3, 0]]},
            # uneven experts, each rank its own prompt, only the routed rows travel
            {"name": "a2a", "folder": f["moe_top2_gqa"], "dispatch": "all_to_all",
             "placement": [[0], [1, 2, 3]]},
            {"name": "module_a2a", "folder": f["moe_top2_gqa"], "kind": "module",
             "dispatch": "all_to_all", "experts": 5, "placement": [[4], [0, 1, 2, 3]],
             "steps": [[3, 0], [0, 5], [0, 0], [8, 1]]},
            # hot experts: 0 and 4 on both ranks (against none); then every expert on both
            {"name": "module_cold", "folder": f["moe_top2_gqa"], "kind": "module",
             "dispatch": "all_to_all", "experts": 5, "placement": [[4], [0, 1, 2, 3]],
             "steps": [[3, 0], [8, 6]]},
            {"name": "module_hot", "folder": f["moe_top2_gqa"], "kind": "module",
             "dispatch": "all_to_all", "experts": 5, "placement": [[4], [0, 1, 2, 3]],
             "replicas": [0, 4], "steps": [[3, 0], [8, 6]]},
            {"name": "module_all_hot", "folder": f["moe_top2_gqa"], "kind": "module",
             "dispatch": "all_to_all", "experts": 5, "placement": [[4], [0, 1, 2, 3]],
             "replicas": [0, 1, 2, 3, 4], "steps": [[3, 0], [8, 6]]},
            {"name": "module_counted_hot", "folder": f["moe_top2_gqa"], "kind": "module",
             "dispatch": "all_to_all", "experts": 5, "placement": [[4], [0, 1, 2, 3]],
             "hot": 2, "steps": [[3, 0], [8, 6]]}]
    return run_ep(2, jobs, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def ep4(tiny_mixtrals, tmp_path_factory):
    f = {k: str(v) for k, v in tiny_mixtrals.items()}
    jobs = [{"name": "top1", "folder": f["moe_top1"]},
            {"name": "top2", "folder": f["moe_top2_gqa"]},
            {"name": "a2a", "folder": f["moe_top1"], "dispatch": "all_to_all",
             "placement": [[0], [1, 2, 3], [4, 5], [6, 7]]},
            # TP x DP = EP: 2 replicas of 2 TP ranks, 6 experts unevenly over the 4 ranks,
            # experts 1 and 4 (both of TP index 1) replicated; "auto" gathers steps of at
            # most 4 tokens over the replicas
            {"name": "grid_auto", "folder": f["moe_top2_gqa"], "kind": "module", "tp": 2,
             "dispatch": "auto", "crossover": 4, "experts": 6,
             "placement": [[0], [1, 2], [3], [4, 5]], "replicas": [1, 4],
             "steps": [[3, 0], [0, 5], [0, 0], [8, 2], [1, 1]]}]
    return run_ep(4, jobs, tmp_path_factory.mktemp("ep4"))


def _check(results: list[dict], refs: dict, kind: str) -> None:
    for rank, res in enumerate(results):
        ref = refs[(kind, PROMPTS.index(res["prompt"]))]
        got = res["prefill"]
        assert got.shape == ref["logits"].shape
        assert (got - ref["logits"]).abs().max().item() <= LOGIT_TOL, f"rank {rank} vs Engine"
        assert (got - ref["hf_logits"]).abs().max().item() <= LOGIT_TOL, f"rank {rank} vs HF"
        assert res["greedy"] == ref["tokens"], f"rank {rank} greedy tokens"


def _check_reads(results: list[dict], num_experts: int) -> None:
    """Each rank read only its own experts, each expert was read by exactly one rank, and
    every rank read the router."""
    owners: dict[int, list[int]] = {}
    for rank, res in enumerate(results):
        for name in res["reads"]:
            if ".experts." in name:
                e = int(name.split(".experts.")[1].split(".")[0])
                assert e in res["experts"], f"rank {rank} read expert {e}"
                if name.endswith("w1.weight") and ".layers.0." in name:
                    owners.setdefault(e, []).append(rank)
        assert "model.layers.0.block_sparse_moe.gate.weight" in res["reads"]
    assert owners == {e: [r] for r, res in enumerate(results) for e in res["experts"]}
    assert sorted(owners) == list(range(num_experts))


# ---- tests -----------------------------------------------------------------------
@pytest.mark.parametrize("name,kind,experts", [
    ("top2", "moe_top2_gqa", [[0, 1], [2, 3]]), ("uneven", "moe_e3_tied", [[0, 1], [2]])])
def test_ep2_matches_one_process(name, kind, experts, ep2, refs):
    _check(ep2[name], refs, kind)
    assert [r["experts"] for r in ep2[name]] == experts
    _check_reads(ep2[name], sum(map(len, experts)))


def test_tensor_parallel_pass_spreads_the_experts(ep2, refs):
    """tensor_parallel_pass alone (as the multi-process --tp path builds stages): attention
    tensor-parallel, each rank holding and reading half of the experts."""
    _check(ep2["tp_ep"], refs, "moe_top2_gqa")
    assert [r["experts"] for r in ep2["tp_ep"]] == [[0, 1], [2, 3]]
    _check_reads(ep2["tp_ep"], 4)


def test_ep2_on_two_pipeline_stages(ep2, refs):
    """Layers [0, 1) and [1, 3) as two stages, each with its own EP pass."""
    _check(ep2["pipeline"], refs, "moe_top2_gqa")
    _check_reads(ep2["pipeline"], 4)


def test_ep2_gather_dispatch_different_tokens_per_rank(ep2, refs):
    """Each rank prefills and decodes its own prompt (12 and 9 tokens): the all-gather +
    reduce-scatter gives each the one-process result for its own prompt."""
    assert [r["prompt"] for r in ep2["gather"]] == PROMPTS
    _check(ep2["gather"], refs, "moe_top1")


def _check_steps(res: list[dict], steps: list[list[int]], tp: int = 1) -> None:
    """Every rank's output of every step is the one-module block's on its tokens."""
    for rank, r in enumerate(res):
        for i, counts in enumerate(steps):
            got, want = r["got"][i], r["want"][i]
            assert got.shape == want.shape == (1, counts[rank // tp], want.shape[-1])
            if got.numel():
                assert (got - want).abs().max().item() <= 1e-5, (rank, i)
    assert all(g.abs().max().item() > 0 for r in res for g in r["got"] if g.numel())
    # every rank counted every replica's tokens: the sum of what each replica's own
    # one-module block counted (once per replica: its TP ranks hold the same tokens)
    want = [sum(res[d * tp]["routed_here"][e] for d in range(len(res) // tp))
            for e in range(len(res[0]["routed"]))]
    assert sum(want) > 0 and all(r["routed"] == want for r in res)


def test_ep2_gather_uneven_and_empty_ranks(ep2):
    res = ep2["module"]
    assert [r["held"] for r in res] == [[0, 1], [2, 3]]
    _check_steps(res, [[3, 0]])
    assert [r["dispatched"] for r in res] == [{"gather": 1, "all_to_all": 0}] * 2


def test_ep2_all_to_all_different_tokens_per_rank(ep2, refs):
    """Each rank its own prompt, experts 1 + 3: the one-process logits and tokens."""
    assert [r["prompt"] for r in ep2["a2a"]] == PROMPTS
    assert [r["experts"] for r in ep2["a2a"]] == [[0], [1, 2, 3]]
    _check(ep2["a2a"], refs, "moe_top2_gqa")
    _check_reads(ep2["a2a"], 4)


def test_ep2_all_to_all_uneven_placement_and_empty_ranks(ep2):
    """Steps where one rank, or both, have no token; expert 4 alone on rank 0."""
    res = ep2["module_a2a"]
    assert [r["held"] for r in res] == [[4], [0, 1, 2, 3]]
    _check_steps(res, [[3, 0], [0, 5], [0, 0], [8, 1]])
    # the step without any token sends nothing
    assert [r["dispatched"] for r in res] == [{"gather": 0, "all_to_all": 3}] * 2


def test_ep2_replicated_hot_experts(ep2):
    """Replicas of hot experts on every rank: still the one-module result, fewer rows
    leave a rank, none when every expert is everywhere."""
    steps = [[3, 0], [8, 6]]
    hot, cold, every = ep2["module_hot"], ep2["module_cold"], ep2["module_all_hot"]
    assert [r["held"] for r in hot] == [[0, 4], [0, 1, 2, 3, 4]]
    _check_steps(hot, steps)
    _check_steps(every, steps)
    assert [r["rows_out"] for r in every] == [0, 0]
    _check_steps(cold, steps)
    # the same tokens: rows for experts 0 and 4 no longer leave (rank 0's tokens routed to
    # 0, rank 1's to 4); rows for 1..3 still do
    assert [a["rows_out"] < b["rows_out"] for a, b in zip(hot, cold)] == [True, True]
    # replicas chosen by the routing counters (hot_experts): the 2 busiest of the 5
    counted = ep2["module_counted_hot"]
    _check_steps(counted, steps)
    load, chosen = counted[0]["hot_load"], counted[0]["replicas"]
    assert len(chosen) == 2 and all(r["replicas"] == chosen for r in counted)
    assert min(load[e] for e in chosen) >= max(load[e] for e in range(5) if e not in chosen)
    assert [r["held"] for r in counted] == [sorted({4, *chosen}), sorted({0, 1, 2, 3, *chosen})]


def test_ep2_inside_the_paged_engine(ep2, refs):
    want = [refs[("moe_top1", i)]["tokens"] for i in range(2)]
    assert [r["tokens"] for r in ep2["engine"]] == [want, want]
    # every rank routes (and counts) every token: 21 prompt + 2 x 15 decoded, top-1
    loads = [r["load"] for r in ep2["engine"]]
    assert loads[0] == loads[1] and all(sum(v) == 51 for v in loads[0].values())


@pytest.mark.parametrize("name,kind,n", [("top1", "moe_top1", 8), ("top2", "moe_top2_gqa", 4)])
def test_ep4_matches_one_process(name, kind, n, ep4, refs):
    _check(ep4[name], refs, kind)
    assert [len(r["experts"]) for r in ep4[name]] == [n // 4] * 4
    _check_reads(ep4[name], n)


def test_ep4_all_to_all_uneven(ep4, refs):
    assert [r["experts"] for r in ep4["a2a"]] == [[0], [1, 2, 3], [4, 5], [6, 7]]
    _check(ep4["a2a"], refs, "moe_top1")
    _check_reads(ep4["a2a"], 8)


def test_ep4_auto_over_tp_replicas(ep4):
    """TP x DP = EP at the module level: "auto" gathers the small steps (3 and 2 tokens
    over the replicas), sends the large ones all-to-all (5 and 10), nothing for none;
    the replicas of 1 and 4 on both ranks of TP index 1 (whose DP group owns them)."""
    res = ep4["grid_auto"]
    assert [r["held"] for r in res] == [[0], [1, 2, 4], [3], [1, 4, 5]]
    _check_steps(res, [[3, 0], [0, 5], [0, 0], [8, 2], [1, 1]], tp=2)
    assert [r["dispatched"] for r in res] == [{"gather": 2, "all_to_all": 2}] * 4


# ---- the command line's --tp (experts spread over the TP ranks) -------------------------
@pytest.mark.parametrize("grid", [["--nproc", "2", "--tp", "2"],
                                  ["--nproc", "4", "--tp", "2", "--pp", "2"]])
def test_cli_tensor_parallel_mixtral(tiny_mixtrals, grid):
    """The multi-process command line, whose --tp builds stages through
    tensor_parallel_pass: the one-process greedy tokens (EOS aside)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    prompt = "The quick brown fox"
    args = [sys.executable, "-m", "llamadist", "generate", str(tiny_mixtrals["moe_top1"]),
            "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--json"]
    one = subprocess.run(args, cwd=root, env=env, text=True, capture_output=True, timeout=120)
    many = subprocess.run(args + grid, cwd=root, env=env, text=True, capture_output=True,
                          timeout=240)
    assert one.returncode == 0 and many.returncode == 0, many.stderr[-2000:]
    got, want = (json.loads(r.stdout.splitlines()[-1])["token_ids"] for r in (many, one))
    assert got == want and len(want) >= 4


# ---- the pass itself (no processes) ------------------------------------------------
def test_expert_shares():
    assert expert_shares(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_shares(3, 2) == [[0, 1], [2]]
    assert expert_shares(5, 1) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ExpertParallelError, match="ep=9"):
        expert_shares(8, 9)


def test_pass_refuses_dense_and_loaded_models(tiny_mixtrals):
    from llamadist.model.llama import Llama
    dense = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                        num_heads=2, num_kv_heads=2, head_dim=4)
    with torch.device("meta"):
        m = Llama(dense)
    with pytest.raises(ExpertParallelError, match="mixture-of-experts"):
        apply_expert_parallel(m, None, 0, 2)
    moe = ModelConfig.from_json_file(tiny_mixtrals["moe_top1"] / "config.json")
    with pytest.raises(ExpertParallelError, match="meta-built"):
        apply_expert_parallel(Llama(moe), None, 0, 2)
