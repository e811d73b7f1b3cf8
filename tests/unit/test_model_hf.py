"""The pure model against Hugging Face transformers on the same weights."""

import pytest
import torch

from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine

transformers = pytest.importorskip("transformers")

LOGIT_TOL = 1e-4  # fp32, max abs difference


@pytest.fixture(scope="module", params=["mha", "gqa_tied", "llama3"])
def pair(request, tiny_models):
    folder = tiny_models[request.param]
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = Engine.load(str(folder), max_seq_len=128, max_batch=2)
    return hf, ours


def test_logits_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (2, 48))
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours.forward(ids, torch.arange(48).expand(2, 48), 0, None, logits="all")
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= LOGIT_TOL


def test_incremental_decode_logits_match(pair):
    """Prefill then token-by-token decode through the KV cache equals a full forward."""
    hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(3, hf.config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    ours.forward(ids[:, :16], torch.arange(16).view(1, -1), 0)
    for t in range(16, 24):
        step = ours.forward(ids[:, t:t + 1], torch.tensor([[t]]), t)
        assert (step[0, 0] - ref[t]).abs().max().item() <= LOGIT_TOL


def test_32_greedy_tokens_identical(pair):
    hf, ours = pair
    torch.manual_seed(3)
    ids = torch.randint(3, hf.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 12:].tolist()
    got = generate(ours, None, [ids[0].tolist()], SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert got[0].token_ids == ref
