"""Split execution: every strategy and 1-4 stages give the unsplit model's tokens and logits."""

import pytest
import torch

from llamadist.api import build_engine
from llamadist.config import RuntimeConfig
from llamadist.planning.layout import resolve_layout
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint

LOGIT_TOL = 1e-5  # fp32, max abs difference against the unsplit model
STRATEGIES = ["uniform", "memory", "compute", "mixed", "custom"]


def custom_boundaries(num_layers: int, stages: int) -> str:
    # Deliberately uneven: the last stage takes one layer, the rest share the remainder.
    cuts = [0] + [1 + i * (num_layers - 1) // (stages - 1) for i in range(stages - 1)] if stages > 1 else [0]
    cuts = sorted(set(cuts[:stages])) + [num_layers]
    return ",".join(f"{a}:{b}" for a, b in zip(cuts, cuts[1:]))


def split_engine(ckpt, strategy: str, stages: int, max_seq: int = 96) -> Engine:
    cfg = ckpt.config
    devices = ",".join(["cpu"] * stages)
    boundaries = custom_boundaries(cfg.num_layers, stages) if strategy == "custom" else None
    speeds = ",".join(str(1.0 + i) for i in range(stages)) if strategy in ("compute", "mixed") else None
    layout = resolve_layout(cfg, devices=devices, strategy=strategy, boundaries=boundaries,
                            device_speed=speeds, max_memory=",".join(["4GiB"] * stages),
                            dtype="float32", max_batch=2, max_seq_len=max_seq)
    assert len(layout.layer_ranges) == stages
    return build_engine(ckpt, layout, RuntimeConfig(max_seq_len=max_seq, max_batch=2,
                                                   dtype="float32"))


@pytest.fixture(scope="module")
def reference(tiny_models):
    ckpt = open_checkpoint(tiny_models["gqa_tied"])
    ref = Engine.load(str(tiny_models["gqa_tied"]), max_batch=2, max_seq_len=96)
    torch.manual_seed(0)
    ids = torch.randint(3, ckpt.config.vocab_size, (2, 20))
    logits = ref.forward(ids, torch.arange(20).expand(2, 20), 0, None, logits="all")
    tokens = generate(ref, None, [ids[0].tolist(), ids[1, 5:].tolist()],
                      SamplingParams(max_new_tokens=12, ignore_eos=True))
    return ckpt, ids, logits, [t.token_ids for t in tokens]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_split_matches_unsplit(reference, strategy, stages):
    ckpt, ids, ref_logits, ref_tokens = reference
    eng = split_engine(ckpt, strategy, stages)
    got = eng.forward(ids, torch.arange(20).expand(2, 20), 0, None, logits="all")
    assert (got - ref_logits).abs().max().item() <= LOGIT_TOL
    out = generate(eng, None, [ids[0].tolist(), ids[1, 5:].tolist()],
                   SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in out] == ref_tokens


class RecordingCheckpoint:
    """Wraps a checkpoint and records every tensor read."""

    def __init__(self, inner):
        self.inner, self.read = inner, []
        self.path, self.config = inner.path, inner.config

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name, shard=None):
        self.read.append(name)
        return self.inner.get(name, shard)


@pytest.mark.parametrize("kind", ["gqa_tied", "mha"])
def test_stage_reads_only_its_own_tensors(tiny_models, kind):
    ckpt = open_checkpoint(tiny_models[kind])
    n = ckpt.config.num_layers
    ranges = [range(0, 2), range(2, n - 1), range(n - 1, n)]
    all_read = []
    for k, layers in enumerate(ranges):
        rec = RecordingCheckpoint(ckpt)
        build_stage(rec, layers, "cpu", torch.float32, 1, 32, has_embed=k == 0, has_head=k == 2)
        own = {f"model.layers.{i}." for i in layers}
        for name in rec.read:
            if name.startswith("model.layers."):
                assert any(name.startswith(p) for p in own), f"stage {k} read {name}"
        assert len(rec.read) == len(set(rec.read)), "a tensor was read twice"
        assert ("model.embed_tokens.weight" in rec.read) == (
            k == 0 or (k == 2 and ckpt.config.tie_word_embeddings))
        assert ("model.norm.weight" in rec.read) == (k == 2)
        all_read += rec.read
    # Together the stages read each checkpoint tensor once (the tied embedding twice:
    # the last stage keeps its own copy for the head).
    expected = sorted(ckpt.names()) + (["model.embed_tokens.weight"]
                                       if ckpt.config.tie_word_embeddings else [])
    assert sorted(all_read) == sorted(expected)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2, tmp_path_factory):
    # The GGUF's weights dequantised once into a safetensors folder: every split below then
    # loads in a fraction of a second instead of dequantising Q4_1 again.
    from llamadist.weights.gguf import convert_gguf_to_hf
    folder = convert_gguf_to_hf(smollm2, tmp_path_factory.mktemp("smollm2") / "hf", progress=False)
    ckpt = open_checkpoint(folder)
    tok = ckpt.tokenizer()
    ids = tok.encode("The three primary colors are")
    layout = resolve_layout(ckpt.config, devices="cpu", dtype="float32", max_batch=1,
                            max_seq_len=64)
    one = build_engine(ckpt, layout, RuntimeConfig(max_seq_len=64, max_batch=1, dtype="float32"))
    x, pos = torch.tensor([ids]), torch.arange(len(ids)).view(1, -1)
    logits = one.forward(x, pos, 0, None, logits="all")
    tokens = generate(one, tok, [ids], SamplingParams(max_new_tokens=12, ignore_eos=True))
    return ckpt, ids, logits, tokens[0].token_ids


# Every strategy once, at 2 or 3 stages: a strategy only chooses the boundaries, and every
# strategy at 1-4 stages is checked against the unsplit model above (test_split_matches_
# unsplit, the tiny tied model); here each plans SmolLM2's 30 layers and splits real weights.
# custom at 3 stages: a one-layer first stage and a middle one (0:1, 1:15, 15:30).
@pytest.mark.parametrize("stages,strategy", [(2, "uniform"), (3, "memory"), (3, "compute"),
                                             (2, "mixed"), (3, "custom")])
def test_split_on_smollm2(smollm2_reference, strategy, stages):
    """SmolLM2 (real weights, tied embeddings): every strategy gives the unsplit logits and
    greedy tokens."""
    ckpt, ids, ref_logits, ref_tokens = smollm2_reference
    eng = split_engine(ckpt, strategy, stages, max_seq=64)
    x, pos = torch.tensor([ids]), torch.arange(len(ids)).view(1, -1)
    assert (eng.forward(x, pos, 0, None, logits="all") - ref_logits).abs().max().item() <= LOGIT_TOL
    out = generate(eng, None, [ids], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert out[0].token_ids == ref_tokens
