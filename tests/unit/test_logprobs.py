"""Log-probabilities out of the engine: the sampled tokens' (and their top k) and a
prompt's (completions' echo + logprobs), against a plain full forward of Hugging Face
transformers on the same weights; prompts chunked across steps, batched with others,
over two stages."""

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.engine import LLMEngine
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint

PROMPT = "Distributed inference splits a model across devices, processes and hosts."


def engine_for(path, stages: int = 1, batch_tokens: int | None = None) -> LLMEngine:
    ckpt = open_checkpoint(path)
    runtime = RuntimeConfig(max_seq_len=128, max_batch=3, dtype="float32",
                            max_batch_tokens=batch_tokens)
    n = ckpt.config.num_layers
    cuts = [0, n // 2, n] if stages == 2 else [0, n]
    model = Engine.build(ckpt, [range(a, b) for a, b in zip(cuts, cuts[1:])], ["cpu"] * stages,
                         torch.float32, 3, 128, runtime=runtime, static_cache=False)
    return LLMEngine(model, ckpt.tokenizer(), runtime, block_size=8)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """ids -> (T, V) log-softmax of the full forward (transformers)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    return run


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]):
    reqs, steps = engine.submit(prompts, params)
    outs = {r.id: [] for r in reqs}
    for step in steps:
        for i, out in step:
            outs[reqs[i].id].append(out)
    return reqs, [outs[r.id] for r in reqs]


@pytest.mark.parametrize("stages,batch_tokens", [(1, None), (1, 8), (2, 8)])
def test_logprobs_match_a_full_forward(tiny_model, reference, stages, batch_tokens):
    engine = engine_for(tiny_model, stages, batch_tokens)
    tok = engine.tokenizer
    ids = tok.encode(PROMPT)
    other = tok.encode("The quick brown fox")
    params = [SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2),
              SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=0.9, seed=1),
              SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=0.9, seed=2,
                             logprobs=0)]
    reqs, outs = run(engine, [ids, other, other], params)
    scored, plain, sampled = reqs
    ref = reference(scored.all_ids)  # (T, V)
    p = len(ids)
    # the prompt: token i scored by position i - 1; the first has none
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == p
    for i in range(1, p):
        e = scored.prompt_logprobs[i]
        assert e.token_id == ids[i]
        assert e.logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = ref[i - 1].topk(2)
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    # the generated tokens (greedy: the top-1 is the chosen one)
    for j, out in enumerate(outs[0]):
        pos = p - 1 + j
        assert out.logprobs.token_id == out.token_id == scored.output_ids[j]
        assert out.logprobs.logprob == pytest.approx(ref[pos, out.token_id].item(), abs=1e-4)
        assert out.logprobs.top[0][0] == out.token_id and len(out.logprobs.top) == 3
    assert all(o.logprobs is None for o in outs[1]) and plain.prompt_logprobs is None
    # sampled at temperature 0.9: the logprob is still the model's own (raw logits)
    ref2 = reference(sampled.all_ids)
    for j, out in enumerate(outs[2]):
        pos = len(other) - 1 + j
        assert out.logprobs.top == ()
        assert out.logprobs.logprob == pytest.approx(ref2[pos, out.token_id].item(), abs=1e-4)


def test_scoring_skips_the_prefix_cache(tiny_model, reference):
    engine = engine_for(tiny_model)
    ids = engine.tokenizer.encode(PROMPT * 2)
    run(engine, [ids], [SamplingParams(max_new_tokens=2)])  # fills the prefix cache
    reqs, _ = run(engine, [ids], [SamplingParams(max_new_tokens=2, prompt_logprobs=0)])
    assert reqs[0].num_cached_prompt == 0
    again, _ = run(engine, [ids], [SamplingParams(max_new_tokens=2)])
    assert again[0].num_cached_prompt > 0  # the cache was there to hit
    ref = reference(ids)
    got = [e.logprob for e in reqs[0].prompt_logprobs[1:]]
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert got == pytest.approx(want, abs=1e-4)
