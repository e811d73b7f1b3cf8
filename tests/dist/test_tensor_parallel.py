"""Tensor parallelism on CPU: gloo processes against the single-process Engine and
Hugging Face transformers on the same tiny random weights.

Two spawns keep the file cheap: one TP=2 world runs every model (mha, gqa_tied, llama3
and a kv1 model with fewer KV heads than ranks, biases, tied head and a vocab that does
not divide by tp), one TP=4 world runs mha and llama3 (2 KV heads < 4 ranks; with fused projections).
Tolerance: 1e-4 max abs logit difference in float32 (the all-reduce only reorders sums).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamadist.config import ModelConfig
from llamadist.parallel.tensor import (TensorParallelError, apply_tensor_parallel, check_tp,
                                       tp_kv_heads, tp_shard_fn)

LOGIT_TOL = 1e-4
PROMPT_LEN, NEW_TOKENS, SAMPLED_TOKENS, MAX_SEQ = 12, 16, 8, 64
SAMPLE_SEED = 1234


# ---- the in-test driver (runs inside each spawned rank) ----------------------
class RecordingCheckpoint:
    """Wraps a checkpoint and records (name, shard, shape read, full shape) per read."""

    def __init__(self, inner):
        self.inner, self.path, self.config = inner, inner.path, inner.config
        self.reads: list[tuple[str, tuple | None, tuple, tuple]] = []

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name, shard=None):
        t = self.inner.get(name, shard)
        self.reads.append((name, shard, tuple(t.shape), tuple(self.inner.shape(name))))
        return t

    def tokenizer(self):
        return self.inner.tokenizer()


def _run_job(folder: str, prompt: list[int], rank: int, world: int, group,
             fuse: bool = False) -> dict:
    from llamadist.runtime.stage import build_tp_stage
    from llamadist.weights.safetensors_ckpt import HFCheckpoint
    ckpt = RecordingCheckpoint(HFCheckpoint(Path(folder)))
    L = ckpt.config.num_layers
    stage = build_tp_stage(ckpt, range(L), "cpu", torch.float32, 1, MAX_SEQ, group, rank, world,
                           fuse=fuse)
    ids = torch.tensor([prompt])  # (1, T)
    t = ids.shape[1]
    with torch.inference_mode():
        prefill = stage.forward(ids, torch.arange(t).view(1, t), 0, None, logits="all")  # (1,T,V)
        greedy = _decode(stage, prefill[:, -1], t, NEW_TOKENS, None)
        gen = torch.Generator().manual_seed(SAMPLE_SEED)  # same seed on every rank
        logits = stage.forward(ids, torch.arange(t).view(1, t), 0, None)
        sampled = _decode(stage, logits[:, -1], t, SAMPLED_TOKENS, gen)
    return {"prefill": prefill[0].clone(), "greedy": greedy, "sampled": sampled,
            "reads": ckpt.reads, "kv_heads": stage.caches[0].layer(0).k.shape[1]}


def _decode(stage, last: torch.Tensor, pos: int, n: int, gen: torch.Generator | None) -> list[int]:
    """Greedy (gen None) or temperature-1 sampling of n tokens from (1, V) logits."""
    out = []
    for i in range(n):
        if gen is None:
            tok = last.argmax(-1)
        else:
            tok = torch.multinomial(torch.softmax(last.float(), -1), 1, generator=gen)[:, 0]
        out.append(int(tok))
        if i + 1 < n:
            last = stage.forward(tok.view(1, 1), torch.tensor([[pos + i]]), pos + i, None)[:, -1]
    return out


def _worker(rank: int, world: int, store: str, jobs: list[dict], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))  # the TP group, passed explicitly
        for job in jobs:
            res = _run_job(job["folder"], job["prompt"], rank, world, group,
                           job.get("fuse", False))
            torch.save(res, Path(out_dir) / f"{job['name']}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_tp(world: int, jobs: list[dict], tmp: Path) -> dict[str, list[dict]]:
    """Spawn ``world`` gloo ranks; returns {job name: [result of rank 0, 1, ...]}."""
    tmp.mkdir(parents=True, exist_ok=True)
    store = tempfile.mktemp(dir=tmp, prefix="store")
    mp.spawn(_worker, args=(world, store, jobs, str(tmp)), nprocs=world, join=True)
    return {j["name"]: [torch.load(tmp / f"{j['name']}.rank{r}.pt", weights_only=False)
                        for r in range(world)] for j in jobs}


# ---- models and references (parent process) ----------------------------------
def make_kv1_model(folder: Path) -> Path:
    """num_key_value_heads=1 (< tp), q/k/v/o and MLP biases, tied head, vocab 387 (odd)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tests.tiny import make_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder) + 3
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                      mlp_bias=True, rope_theta=10000.0)
    torch.manual_seed(5)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # random biases too, so a bias added twice would show
                p.normal_(0, 0.08 if p.dim() == 2 else 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def reference(folder: Path, prompt: list[int]) -> dict:
    """Prefill logits and greedy tokens from llamadist's Engine and from transformers."""
    import transformers
    from llamadist.generation.generate import generate
    from llamadist.generation.sampling import SamplingParams
    from llamadist.runtime.engine import Engine
    ids = torch.tensor([prompt])
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(ids).logits[0]
        hf_tokens = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    eng = Engine.load(str(folder), max_seq_len=MAX_SEQ)
    eng_logits = eng.forward(ids, torch.arange(len(prompt)).view(1, -1), 0, logits="all")[0]
    eng_tokens = generate(eng, None, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS,
                                                              ignore_eos=True))[0].token_ids
    return {"hf_logits": hf_logits, "hf_tokens": hf_tokens, "logits": eng_logits,
            "tokens": eng_tokens}


def _prompt(vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist()


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    out = {k: Path(v) for k, v in tiny_models.items()}
    out["kv1"] = make_kv1_model(tmp_path_factory.mktemp("kv1") / "kv1")
    return out


@pytest.fixture(scope="module")
def prompts(folders):
    return {k: _prompt(ModelConfig.from_json_file(f / "config.json").vocab_size, 7 + i)
            for i, (k, f) in enumerate(sorted(folders.items()))}


@pytest.fixture(scope="module")
def refs(folders, prompts):
    return {k: reference(f, prompts[k]) for k, f in folders.items()}


@pytest.fixture(scope="module")
def tp2(folders, prompts, tmp_path_factory):
    jobs = [{"name": k, "folder": str(f), "prompt": prompts[k]} for k, f in folders.items()]
    return run_tp(2, jobs, tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def tp4(folders, prompts, tmp_path_factory):
    # llama3 runs with q|k|v and gate|up fused over the local shards (the CUDA default).
    jobs = [{"name": k, "folder": str(folders[k]), "prompt": prompts[k], "fuse": k == "llama3"}
            for k in ("mha", "llama3")]
    return run_tp(4, jobs, tmp_path_factory.mktemp("tp4"))


def _check_against_refs(results: list[dict], ref: dict) -> None:
    for rank, res in enumerate(results):
        got = res["prefill"]
        assert got.shape == ref["logits"].shape
        assert (got - ref["logits"]).abs().max().item() <= LOGIT_TOL, f"rank {rank} vs Engine"
        assert (got - ref["hf_logits"]).abs().max().item() <= LOGIT_TOL, f"rank {rank} vs HF"
        assert res["greedy"] == ref["tokens"] == ref["hf_tokens"], f"rank {rank} greedy"
    # Sampling with one seed shared by every rank draws the same tokens everywhere.
    assert all(r["sampled"] == results[0]["sampled"] for r in results)


# ---- tests -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "gqa_tied", "llama3"])
def test_tp2_matches_engine_and_transformers(kind, tp2, refs):
    _check_against_refs(tp2[kind], refs[kind])


def test_tp2_fewer_kv_heads_than_ranks(tp2, refs, folders):
    """kv=1 < tp=2: the one KV head is replicated; biases, tied head and an odd vocab."""
    _check_against_refs(tp2["kv1"], refs["kv1"])
    assert [r["kv_heads"] for r in tp2["kv1"]] == [1, 1]


@pytest.mark.parametrize("kind", ["mha", "llama3"])
def test_tp4(kind, tp4, refs, folders):
    _check_against_refs(tp4[kind], refs[kind])
    config = ModelConfig.from_json_file(folders[kind] / "config.json")
    assert all(r["kv_heads"] == tp_kv_heads(config, 4) for r in tp4[kind])


@pytest.mark.parametrize("kind", ["mha", "gqa_tied"])
def test_each_rank_reads_only_its_slice(kind, tp2):
    replicated = ("layernorm.weight", "model.norm.weight")
    covered: dict[str, int] = {}
    for rank, res in enumerate(tp2[kind]):
        names = [n for n, *_ in res["reads"]]
        assert len(names) == len(set(names)), "a tensor was read twice"
        for name, shard, shape, full in res["reads"]:
            n, n_full = torch.Size(shape).numel(), torch.Size(full).numel()
            if name.endswith(replicated):
                assert shard is None and shape == full
                continue
            assert shard is not None, f"rank {rank} read all of {name}"
            assert n * 2 == n_full, f"rank {rank} read {shape} of {name} {full}"
            covered[name] = covered.get(name, 0) + n
    # The two ranks together read each sharded tensor exactly once.
    full_sizes = {name: torch.Size(full).numel() for name, _, _, full in tp2[kind][0]["reads"]}
    assert all(covered[n] == full_sizes[n] for n in covered)


# ---- errors and the pass itself (no processes) -------------------------------------
def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=100, hidden_size=96, intermediate_size=192, num_layers=2,
                num_heads=12, num_kv_heads=4, head_dim=8)
    return ModelConfig(**{**base, **kw})


def test_heads_must_divide_by_tp():
    with pytest.raises(TensorParallelError, match=r"12 query heads to divide by 5"):
        check_tp(_config(), 5)


def test_kv_heads_that_neither_split_nor_replicate():
    # 12 q heads / 6 ranks = 2 per rank, but 3 q heads share a KV head: a rank would need two.
    with pytest.raises(TensorParallelError, match=r"4 KV heads.*4 % 6 = 4, 6 % 4 = 2"):
        check_tp(_config(), 6)


def test_kv_head_choice_when_replicated():
    config = _config(num_heads=8, num_kv_heads=2)
    assert tp_kv_heads(config, 2) == 1 and tp_kv_heads(config, 8) == 1
    d = config.head_dim
    # rank r holds kv head r * 2 // 8: ranks 0-3 head 0, ranks 4-7 head 1.
    starts = [tp_shard_fn(config, r, 8)("model.layers.0.self_attn.k_proj.weight", (16, 96))[1]
              for r in range(8)]
    assert starts == [0] * 4 + [d] * 4


def test_pass_needs_a_meta_model():
    from llamadist.model.llama import Llama
    config = _config(num_heads=4, num_kv_heads=2, hidden_size=32)
    with pytest.raises(TensorParallelError, match="meta"):
        apply_tensor_parallel(Llama(config), None, 0, 2)


def test_unknown_parameter_has_no_silent_rule():
    with pytest.raises(TensorParallelError, match="no tensor-parallel rule"):
        tp_shard_fn(_config(), 0, 2)("model.layers.0.self_attn.rotary.weight", (8,))


def test_cpu_kernel_pass_reaches_the_parallel_linears():
    """The runtime's CPU pass swaps the kernel into the TP modules' matmul (linear_fn);
    before it they are plain F.linear, the pure model's math."""
    import torch.nn.functional as F

    from llamadist.kernels import cpu_decode
    from llamadist.model.llama import Llama
    from llamadist.parallel.tensor import (ColumnParallelLinear, RowParallelLinear,
                                           VocabParallelHead)
    from llamadist.runtime.kernel_passes import use_cpu_linear
    with torch.device("meta"):
        model = Llama(_config(num_heads=4, num_kv_heads=2, hidden_size=32))
    apply_tensor_parallel(model, None, 0, 2)
    kinds = (ColumnParallelLinear, RowParallelLinear, VocabParallelHead)
    parallel = [m for m in model.modules() if isinstance(m, kinds)]
    assert parallel and all(m.linear_fn is F.linear for m in parallel)
    use_cpu_linear(model)
    assert all(m.linear_fn is cpu_decode.linear for m in parallel)
