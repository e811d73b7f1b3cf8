"""Presence and frequency penalties (OpenAI's: on the generated tokens' counts, not the
prompt's): the sampler's arithmetic, and the paged engine equal to the static generator
with them on (a request's tokens depend on its prompt, params and seed only)."""

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.engine import LLMEngine
from llamadist.generation.generate import generate, make_sampler
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint


def test_sampler_subtracts_presence_and_frequency():
    logits = torch.tensor([[3.0, 2.9, 2.0, 0.0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)
    s = make_sampler([[2, 2, 2]], [p], [0], 4, torch.device("cpu"), outputs=[[0, 0, 1]])
    # token 0: 3 - 0.5 - 2 * 0.3 = 1.9; token 1: 2.9 - 0.5 - 0.3 = 2.1; token 2 (prompt
    # only): 2.0 untouched; so token 1 wins
    assert s.sample(logits).tolist() == [1]
    assert s(logits).tolist() == [1] and s.counts[0].tolist() == [2, 2, 0, 0]
    plain = make_sampler([[2]], [SamplingParams()], [0], 4, torch.device("cpu"))
    assert plain.counts is None and plain.sample(logits).tolist() == [0]
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


def test_paged_engine_equals_static_generator(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    tok = ckpt.tokenizer()
    runtime = RuntimeConfig(max_seq_len=96, max_batch=2, dtype="float32")
    model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32, 1, 96,
                         runtime=runtime, static_cache=False)
    engine = LLMEngine(model, tok, runtime, block_size=8)
    static = Engine.load(str(tiny_model), max_seq_len=96)
    prompts = [tok.encode("The quick brown fox"), tok.encode("1 2 3 4 5 6 7")]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True, presence_penalty=2.0),
              SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8, seed=5,
                             frequency_penalty=1.5, presence_penalty=-0.5)]
    reqs, steps = engine.submit(prompts, params)
    for _ in steps:
        pass
    for r, p, sp in zip(reqs, prompts, params):
        assert r.output_ids == generate(static, tok, [p], sp)[0].token_ids
    greedy = reqs[0].output_ids
    assert len(set(greedy)) == len(greedy)  # a presence penalty of 2 on this model: no repeat
    plain = generate(static, tok, [prompts[0]], SamplingParams(max_new_tokens=40,
                                                               ignore_eos=True))[0].token_ids
    assert len(set(plain)) < len(plain)  # without it, greedy repeats itself
