"""End to end on the real SmolLM2-135M GGUF: llamadist against transformers on the same file."""

import json

import pytest
import torch

from llamadist.api import LLM
from llamadist.cli import main
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.runtime.paged_kv import PagedBatch

transformers = pytest.importorskip("transformers")

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    return smollm2_hf  # (tests/conftest.py: loaded once, shared with tests/unit/test_gguf.py)


@pytest.fixture(scope="module")
def ours(smollm2):
    return LLM(str(smollm2), max_batch=2, max_seq_len=128)


def test_logits_match_transformers_gguf(smollm2, ours, hf_model):
    ids = ours.tokenizer.encode(PROMPT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(x).logits  # (1, T, V)
    # The paged path: the prompt as one chunk on fresh blocks, then the last position's
    # logits (the engine samples nothing else).
    static = Engine.load(str(smollm2), max_seq_len=128)
    got = static.forward(x, torch.arange(len(ids)).view(1, -1), 0, None, logits="all")
    assert (got - ref).abs().max().item() <= 1e-3  # fp32; dequantised weights identical
    static.init_paged(num_blocks=4, block_size=64)
    last = static.forward_paged(x.view(-1), PagedBatch.build([([1, 2], 0, len(ids))], 64))
    assert (last[0] - ref[0, -1]).abs().max().item() <= 1e-3


def test_32_greedy_tokens_identical_to_transformers(ours, hf_model):
    ids = ours.tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    reqs, steps = ours.submit([ids], SamplingParams(max_new_tokens=32, ignore_eos=True))
    for _ in steps:  # through the continuous-batching engine, as users run it
        pass
    assert reqs[0].output_ids == ref


def test_chat_answer_is_sensible(ours):
    reply = ours.chat([{"role": "user", "content": "What is the capital of France?"}],
                      max_new_tokens=24)
    assert "Paris" in reply


def test_convert_round_trip_gives_identical_tokens(smollm2, ours, tmp_path, capsys):
    out = tmp_path / "smollm2-hf"
    assert main(["convert", str(smollm2), str(out)]) == 0
    capsys.readouterr()
    args = ["--prompt", PROMPT, "--max-new-tokens", "24", "--json"]
    assert main(["generate", str(out)] + args) == 0
    converted = json.loads(capsys.readouterr().out)
    assert main(["generate", str(smollm2)] + args) == 0
    original = json.loads(capsys.readouterr().out)
    assert converted["prompt_token_ids"] == original["prompt_token_ids"]
    assert converted["token_ids"] == original["token_ids"]
    # ... and transformers loads the converted folder to the same greedy tokens.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = original["prompt_token_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ref[: len(original["token_ids"])] == original["token_ids"]
