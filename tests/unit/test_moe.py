"""Mixtral (sparse mixture of experts) against transformers' MixtralForCausalLM on the same
weights: tiny random configurations (4 experts top-2 GQA, 8 experts top-1, 3 experts top-2
tied), loaded from Hugging Face folders and from a GGUF with stacked experts."""

import json

import gguf
import numpy as np
import pytest
import torch

from llamadist import LLM, SamplingParams
from llamadist.cli import main
from llamadist.config import ConfigError, ModelConfig
from llamadist.generation.generate import generate
from llamadist.runtime.engine import Engine
from llamadist.weights.gguf import GGUFCheckpoint
from llamadist.weights.safetensors_ckpt import HFCheckpoint
from tests.moe_gguf import write_mixtral_gguf
from tests.tiny import MOE_CONFIGS

transformers = pytest.importorskip("transformers")

LOGIT_TOL = 1e-4  # fp32, max abs difference
KINDS = list(MOE_CONFIGS)


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tiny_mixtrals):
    folder = tiny_mixtrals[request.param]
    hf = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, hf


def hf_greedy(hf, ids: list[int], n: int = 32) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ---- configuration ---------------------------------------------------------------------
def test_config_reads_experts(tiny_mixtrals):
    for kind, folder in tiny_mixtrals.items():
        cfg = ModelConfig.from_json_file(folder / "config.json")
        assert cfg.is_moe and cfg.num_experts == MOE_CONFIGS[kind]["num_local_experts"]
        assert cfg.num_experts_per_tok == MOE_CONFIGS[kind]["num_experts_per_tok"]
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg  # the HF dict round trip


@pytest.mark.parametrize("model_type,arch,named", [
    ("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE"),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "DeepSeek-V3"),
    ("dbrx", "DbrxForCausalLM", "DBRX")])
def test_unsupported_moe_refused_by_name(tiny_mixtrals, model_type, arch, named):
    d = json.loads((tiny_mixtrals["moe_top1"] / "config.json").read_text())
    d.update(model_type=model_type, architectures=[arch])
    with pytest.raises(ConfigError, match=f"{arch}.*{named}.*not implemented"):
        ModelConfig.from_hf_dict(d)


def test_mixtral_config_errors(tiny_mixtrals):
    d = json.loads((tiny_mixtrals["moe_top1"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="sliding_window=64"):
        ModelConfig.from_hf_dict({**d, "sliding_window": 64})
    assert ModelConfig.from_hf_dict({**d, "sliding_window": 4096}).is_moe  # >= context: none
    with pytest.raises(ConfigError, match="num_experts_per_tok=9"):
        ModelConfig.from_hf_dict({**d, "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="num_local_experts=None"):
        ModelConfig.from_hf_dict({**d, "num_local_experts": None})


# ---- the model against transformers ----------------------------------------------------
def test_logits_match_transformers(pair):
    folder, hf = pair
    ours = Engine.load(str(folder), max_seq_len=128, max_batch=2)
    expert = ours.stages[0].model.model.layers["0"].block_sparse_moe.experts["0"]
    assert expert.w13 is not None  # the fused w1|w3 path (llamadist.model.fuse) is tested
    torch.manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours.forward(ids, torch.arange(40).expand(2, 40), 0, None, logits="all")
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= LOGIT_TOL
    # the decode path (one token through the KV cache) too
    ours.forward(ids[:, :32], torch.arange(32).expand(2, 32), 0)
    for t in range(32, 40):
        step = ours.forward(ids[:, t:t + 1], torch.full((2, 1), t), t)
        assert (step[:, 0] - ref[:, t]).abs().max().item() <= LOGIT_TOL


def test_32_greedy_tokens_static_path(pair):
    folder, hf = pair
    ours = Engine.load(str(folder), max_seq_len=128, max_batch=1)
    ids = list(range(7, 19))
    got = generate(ours, None, [ids], SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert got[0].token_ids == hf_greedy(hf, ids)


def test_32_greedy_tokens_llm_batched(pair):
    """Two prompts of different lengths batched continuously through the paged engine:
    each one's tokens equal transformers' greedy tokens for it alone."""
    folder, hf = pair
    llm = LLM(str(folder), max_seq_len=128, max_batch=2)
    prompts = [list(range(5, 17)), [40, 41, 300, 7, 9]]
    reqs, _ = llm.run(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert [r.output_ids for r in reqs] == [hf_greedy(hf, p) for p in prompts]


def test_cli_generate_equals_transformers(capsys, tiny_mixtrals):
    folder = tiny_mixtrals["moe_top1"]
    hf = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base = ["generate", str(folder), "--prompt", "The quick brown fox", "--max-new-tokens",
            "32", "--json"]
    assert main(base) == 0
    row = json.loads(capsys.readouterr().out)
    got, ref = row["token_ids"], hf_greedy(hf, row["prompt_token_ids"])
    assert got == ref[:len(got)]  # the CLI stops at EOS (id 2); transformers was told not to
    assert len(got) == 32 or (got[-1] == 2 and 2 not in got[:-1])
    # a pipeline cut through the MoE layers, and PyTorch instead of the C kernels, give
    # the same tokens
    assert main(base + ["--devices", "cpu,cpu", "--boundaries", "0:1,1:2"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == row["token_ids"]
    assert main(base + ["--no-cpu-kernels"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == row["token_ids"]


# ---- GGUF: stacked experts -------------------------------------------------------------
def test_gguf_round_trip_same_tokens(tmp_path, tiny_mixtrals):
    folder = tiny_mixtrals["moe_top1"]  # its greedy tokens vary (24 distinct of 32)
    path = write_mixtral_gguf(folder, tmp_path / "tiny-mixtral.gguf")
    g, h = GGUFCheckpoint(path), HFCheckpoint(folder)
    assert g.config.num_experts == 8 and g.config.num_experts_per_tok == 1
    assert g.names() == h.names()
    for name in h.names():
        assert torch.equal(g.get(name), h.get(name)), name
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    prompt = list(range(5, 17))
    a, _ = LLM(str(folder), max_seq_len=128).run([prompt], params)
    b, _ = LLM(str(path), max_seq_len=128).run([prompt], params)
    assert len(a[0].output_ids) == 32 and a[0].output_ids == b[0].output_ids


def test_gguf_converts_back_to_a_mixtral_folder(tmp_path, tiny_mixtrals):
    """convert_gguf_to_hf writes a folder transformers loads as MixtralForCausalLM, with
    the original logits."""
    from llamadist.weights.gguf import convert_gguf_to_hf
    folder = tiny_mixtrals["moe_top2_gqa"]
    out = convert_gguf_to_hf(write_mixtral_gguf(folder, tmp_path / "m.gguf"), tmp_path / "hf",
                             progress=False)
    a = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(b).__name__ == "MixtralForCausalLM"
    ids = torch.arange(5, 25).view(1, -1)
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() <= 1e-5


def test_gguf_quantized_stacked_experts(tmp_path, tiny_mixtrals):
    """A Q8_0 stack: each expert (and a row slice of it) reads back as its own slice of
    the dequantized stack."""
    folder = tiny_mixtrals["moe_top2_gqa"]
    q8 = gguf.GGMLQuantizationType.Q8_0
    ck = GGUFCheckpoint(write_mixtral_gguf(folder, tmp_path / "q8.gguf", expert_type=q8))
    t = next(t for t in ck._reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
    stack = gguf.quants.dequantize(t.data, q8).reshape(4, 64, 96)  # (E, D, F)
    for e in range(4):
        name = f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"
        assert ck.shape(name) == (64, 96)
        assert np.array_equal(ck.get(name).numpy(), stack[e])
        assert np.array_equal(ck.get(name, (0, 16, 40)).numpy(), stack[e, 16:40])


# ---- planning: total and active parameters, bytes, FLOPs --------------------------------
def test_profile_mixtral_8x7b_counts():
    """transformers' MixtralForCausalLM(MixtralConfig()) has 46,702,792,704 parameters
    (counted on the meta device); a token uses 12.88 B of them (2 of 8 experts)."""
    from llamadist.config import named_shape
    from llamadist.planning.profile import format_profile_table, profile
    p = profile(named_shape("mixtral-8x7b"))
    assert p.total_params == 46_702_792_704
    expert = 3 * 4096 * 14336
    assert p.total_active_params == p.total_params - 32 * 6 * expert == 12_879_925_248
    assert p.total_weight_bytes == 2 * p.total_params
    assert p.total_active_weight_bytes == 2 * p.total_active_params
    assert "active per token" in format_profile_table(p)
    totals = p.to_dict()["totals"]
    assert totals["active_params"] == p.total_active_params
    assert type(p).from_json(p.to_json()) == p


def test_profile_matches_transformers_parameter_count(tiny_mixtrals):
    from llamadist.planning.profile import profile
    for kind, folder in tiny_mixtrals.items():
        cfg = ModelConfig.from_json_file(folder / "config.json")
        with torch.device("meta"):
            hf = transformers.MixtralForCausalLM(transformers.MixtralConfig.from_pretrained(folder))
        p = profile(cfg, dtype="float32", seq_len=16)
        assert p.total_params == sum(t.numel() for t in hf.parameters()), kind
        row = p.layers[0]
        d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
        attn = 2 * d * cfg.q_size + 2 * d * cfg.kv_size
        assert row.expert_bytes == 4 * e * 3 * d * f
        # FLOPs per token: attention projections, the router, k experts (not all e)
        assert row.matmul_flops_per_token == 2 * (attn + d * e + k * 3 * d * f)


def test_decode_bytes_and_budgets_count_experts():
    """A decode step reads the routed experts only (k at batch 1, nearly all at batch 64);
    memory budgets count every expert, divided by the expert-parallel ranks."""
    from llamadist.config import named_shape
    from llamadist.planning.cost import CostModel
    from llamadist.planning.profile import decode_step_bytes, expected_experts, profile
    p = profile(named_shape("mixtral-8x7b"))
    per_expert = p.layers[0].expert_bytes / 8
    assert expected_experts(8, 2, 1) == 2 and expected_experts(8, 2, 64) == pytest.approx(8)
    one = decode_step_bytes(p, 1, 0)
    assert one == pytest.approx(p.total_active_weight_bytes - p.embed.weight_bytes
                                + 4096 * 2)  # routed weights + head + one embedding row
    assert decode_step_bytes(p, 64, 0) - one == pytest.approx(
        32 * 6 * per_expert + 63 * 4096 * 2, rel=1e-6)
    whole = CostModel.build(p, 1, 1024).weight_bytes(0, 32, True, True)
    assert whole == p.total_weight_bytes
    half = CostModel.build(p, 1, 1024, ep=2).weight_bytes(0, 32, True, True)
    assert half == pytest.approx(whole - 32 * 4 * per_expert)
    # tensor parallelism spreads the experts over its ranks too (EP = TP) ...
    tp2 = CostModel.build(p, 1, 1024, tp=2).weight_bytes(0, 32, True, True, tp=2)
    assert tp2 == pytest.approx(whole / 2)
    # ... unless there are fewer experts than ranks: then each rank holds them all
    tp16 = CostModel.build(p, 1, 1024, tp=16).weight_bytes(0, 32, True, True, tp=16)
    assert tp16 == pytest.approx((whole - 32 * 8 * per_expert) / 16 + 32 * 8 * per_expert)


def test_moe_decodes_without_cuda_graphs(tiny_mixtrals):
    """The expert loop has data-dependent shapes: a CUDA stage of an MoE model decodes
    eagerly, unless every block has a graph-safe expert_fn (the grouped kernel); a dense
    model on the same stage keeps its graphs."""
    from dataclasses import replace
    from types import SimpleNamespace

    from llamadist.model.llama import Llama
    from llamadist.model.moe import SparseMoE
    cfg = ModelConfig.from_json_file(tiny_mixtrals["moe_top1"] / "config.json")
    dense = replace(cfg, num_experts=0, num_experts_per_tok=0)
    with torch.device("meta"):
        moe_model, dense_model = Llama(cfg), Llama(dense)
    on_cuda = [SimpleNamespace(device=torch.device("cuda"), model=moe_model, batch_size=1)]
    assert Engine(cfg, on_cuda).cuda_graphs is False
    blocks = [m for m in moe_model.modules() if isinstance(m, SparseMoE)]
    for m in blocks[:-1]:
        m.expert_fn = lambda x, w, i: x
    assert Engine(cfg, on_cuda).cuda_graphs is False  # one block still loops
    blocks[-1].expert_fn = lambda x, w, i: x
    assert Engine(cfg, on_cuda).cuda_graphs is True
    dense_stage = [SimpleNamespace(device=torch.device("cuda"), model=dense_model, batch_size=1)]
    assert Engine(dense, dense_stage).cuda_graphs


# ---- the block's extension points ------------------------------------------------------
def test_shared_expert_and_routing_are_replaceable(tiny_mixtrals):
    """A shared expert is added to every token and a routing rule is a plain function:
    other MoE families fit the block without rewriting it."""
    from llamadist.model.moe import Expert, SparseMoE
    cfg = ModelConfig.from_json_file(tiny_mixtrals["moe_top2_gqa"] / "config.json")
    torch.manual_seed(0)
    moe = SparseMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        base = moe(x)
        # by hand: softmax over 4 experts, top 2 renormalised
        probs = torch.softmax(moe.gate(x), -1)
        w, i = probs.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        want = sum(w[..., j, None] * torch.stack([moe.experts[str(int(e))](t)
                                                  for t, e in zip(x.reshape(-1, x.shape[-1]),
                                                                  i[..., j].flatten())])
                   .view_as(x) for j in range(2))
        assert (base - want).abs().max().item() < 1e-5
        moe.shared_expert = Expert(cfg.hidden_size, 32)
        shared = moe.shared_expert(x)
        assert (moe(x) - base - shared).abs().max().item() < 1e-6
        moe.shared_expert = None
        moe.routing = lambda logits, k: (torch.ones(logits.shape[0], 1), logits.argmax(-1, True))
        top1 = moe(x)
        first = moe.experts["0"](x)
        mask = (moe.gate(x).argmax(-1) == 0)
        assert (top1[mask] - first[mask]).abs().max().item() < 1e-6


def test_bench_reports_expert_load(capsys, tiny_mixtrals):
    """Tokens routed per expert per layer, counted over the timed run only: every
    prompt token and every decoded token goes to k experts in each layer."""
    folder = tiny_mixtrals["moe_top2_gqa"]
    assert main(["bench", str(folder), "--batch", "2", "--prompt-len", "16", "--gen-len", "5",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    load = report["stages"][0]["expert_load"]
    assert sorted(load) == ["0", "1", "2"] and all(len(v) == 4 for v in load.values())
    routed = (report["prompt_tokens"] + 2 * (5 - 1)) * 2  # top-2
    assert all(sum(v) == routed for v in load.values())


def test_plans_count_experts_per_ep_rank_and_ep_collectives():
    """Two devices whose budgets hold Mixtral 8x7B's stages only when each holds half the
    experts; the EP collectives by the alpha-beta model."""
    from llamadist.config import named_shape
    from llamadist.planning.cost import LINKS, ep_comm_time
    from llamadist.planning.devices import DeviceSpec
    from llamadist.planning.profile import profile
    from llamadist.planning.strategies import make_plan
    from llamadist.planning.units import PlanningError
    cfg = named_shape("mixtral-8x7b")
    p = profile(cfg, seq_len=1024)
    gpu = DeviceSpec("cuda:0", 30 * 2**30, 1.0, "gpu", 1e15, 4e12)  # 30 GiB: < 87 GiB / 2
    with pytest.raises(PlanningError):
        make_plan(p, [gpu, gpu], "memory", max_seq_len=1024, config=cfg)
    plan = make_plan(p, [gpu, gpu], "memory", max_seq_len=1024, config=cfg, ep=4)
    expert = p.layers[0].expert_bytes
    assert sum(s.weight_bytes for s in plan.stages) == pytest.approx(
        p.total_weight_bytes - 32 * expert * 3 / 4, rel=1e-9)
    link = LINKS["nvlink"]
    hidden = 8 * 4096 * 2
    assert ep_comm_time(p, 32, 8, 1, link) == 0.0
    assert ep_comm_time(p, 32, 8, 4, link) == pytest.approx(32 * link.all_reduce_s(hidden, 4))
    a2a = ep_comm_time(p, 32, 8, 4, link, "all_to_all")
    rows = 8 * 13 / 7  # a token to 4 (1 - 6/8 x 5/7) ranks on average: top-2 of 8 over 4
    assert a2a == pytest.approx(32 * (link.all_to_all_s(rows * (4096 * 2 + 24), 4)
                                      + link.all_to_all_s(rows * 4096 * 2, 4)))
    gather = ep_comm_time(p, 32, 8, 4, link, "gather")
    assert gather > ep_comm_time(p, 32, 8, 4, link)  # 4x the tokens cross, twice
