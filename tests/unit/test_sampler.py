"""The sampler is pure and per request: a request's tokens depend on its prompt, its params
and its seed, never on the batch it shares, max_batch, or torch's global RNG."""

import math

import pytest
import torch

from llamadist.api import LLM
from llamadist.generation.generate import Generator, generate
from llamadist.generation.sampling import (Sampler, SamplingParams, greedy_tokens,
                                           plain_argmax, reference_uniform, seed_key, uniform)
from llamadist.runtime.engine import Engine

PROMPTS = ["The quick brown fox", "Distributed inference splits a model across devices and",
           "1 2 3", "Once upon a time there was a tiny language model that dreamed"]
SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1234,
                         ignore_eos=True)


@pytest.fixture(scope="module")
def llms(tiny_model) -> dict[int, LLM]:
    """The tiny model built for max_batch 1, 2 and 4."""
    return {b: LLM(str(tiny_model), max_batch=b, max_seq_len=128) for b in (1, 2, 4)}


@pytest.fixture(scope="module")
def static(tiny_model):
    """The static-cache path (one left-padded batch), which the pipeline ranks still run."""
    return Engine.load(str(tiny_model), max_batch=4, max_seq_len=128)


@pytest.fixture(scope="module")
def alone(llms) -> list[list[int]]:
    """Each prompt's tokens when it is the only request."""
    return [llms[1].generate(p, SAMPLED)[0].token_ids for p in PROMPTS]


def test_alone_is_really_sampled(llms, alone):
    greedy = [r.token_ids for r in llms[4].generate(PROMPTS, SamplingParams(
        max_new_tokens=16, ignore_eos=True))]
    assert len({len(llms[1].encode(p)) for p in PROMPTS}) == 4  # really different lengths
    assert all(len(t) == 16 for t in alone)
    assert alone != greedy


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_seeded_request_same_alone_and_in_a_batch(llms, alone, max_batch):
    batched = llms[max_batch].generate(PROMPTS, SAMPLED)
    assert [r.token_ids for r in batched] == alone


def test_layout_does_not_matter(tiny_model, alone):
    two_stages = LLM(str(tiny_model), devices="cpu,cpu", max_batch=4, max_seq_len=128)
    assert len(two_stages.engine.stages) == 2
    assert [r.token_ids for r in two_stages.generate(PROMPTS, SAMPLED)] == alone


def test_batch_order_does_not_matter(llms, alone):
    rev = llms[4].generate(PROMPTS[::-1], SAMPLED)
    assert [r.token_ids for r in rev] == alone[::-1]


def test_seed_changes_tokens(llms, alone):
    other = llms[4].generate(PROMPTS, SamplingParams(**{**SAMPLED.__dict__, "seed": 99}))
    assert [r.token_ids for r in other] != alone


def test_each_request_its_own_params(llms, alone, static):
    """Mixed knobs in one batch: every row gets what it gets alone."""
    mixed = [SAMPLED, SamplingParams(max_new_tokens=16, ignore_eos=True),  # greedy
             SamplingParams(max_new_tokens=7, temperature=1.2, top_k=5, min_p=0.05, seed=7,
                            ignore_eos=True),
             SamplingParams(max_new_tokens=16, repetition_penalty=3.0, ignore_eos=True)]
    eng = static
    enc = [llms[4].encode(p) for p in PROMPTS]
    together = generate(eng, llms[4].tokenizer, enc, mixed)
    each = [generate(eng, llms[4].tokenizer, [e], p)[0] for e, p in zip(enc, mixed)]
    assert [r.token_ids for r in together] == [r.token_ids for r in each]
    assert together[0].token_ids == alone[0]
    assert len(together[2].token_ids) == 7 and together[2].finish_reason == "length"
    plain = generate(eng, None, [enc[3]], SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert together[3].token_ids != plain[0].token_ids  # the penalty acted on its row only


def test_unseeded_leaves_global_rng_alone_and_records_its_seed(llms):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    enc = [llms[4].encode(x) for x in PROMPTS[:2]]
    torch.manual_seed(42)
    before = torch.get_rng_state()
    runs = []
    for _ in range(2):
        reqs, steps = llms[4].submit(enc, p)
        for _ in steps:
            pass
        runs.append(reqs)
    assert torch.equal(torch.get_rng_state(), before)
    seeds = [s.seed for run in runs for s in run]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 4  # fresh per request
    assert runs[0][0].output_ids != runs[1][0].output_ids  # so unseeded runs differ
    # The recorded seed repeats the request.
    again = llms[1].generate(PROMPTS[1], SamplingParams(**{**p.__dict__, "seed": seeds[1]}))
    assert again[0].token_ids == runs[0][1].output_ids


def test_static_path_samples_like_the_engine(llms, alone, static):
    """The static-cache path (the pipeline ranks') draws the same seeded tokens."""
    enc = [llms[1].encode(p) for p in PROMPTS]
    assert [r.token_ids for r in generate(static, llms[1].tokenizer, enc, SAMPLED)] == alone


def test_greedy_is_argmax(llms, static):
    """Greedy tokens are the plain argmax of the engine's logits, step by step."""
    eng, tok = static, llms[1].tokenizer
    ids = tok.encode(PROMPTS[1])
    want, x, pos = [], torch.tensor([ids]), torch.arange(len(ids)).view(1, -1)
    for step in range(8):
        logits = eng.forward(x, pos, 0 if step == 0 else len(ids) + step - 1)
        want.append(int(logits[0, -1].argmax()))
        x, pos = torch.tensor([[want[-1]]]), torch.tensor([[len(ids) + step]])
    got = Generator(eng, tok, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for _ in got.stream([ids]):
        pass
    assert got.sequences[0].token_ids == want


# ---- the stream itself ------------------------------------------------------------
def test_uniform_is_the_reference_stream():
    seeds, steps = [0, 5, 2**40 + 3, -7], [0, 3, 11, 2**33]
    u = uniform(torch.tensor([seed_key(s) for s in seeds]), torch.tensor(steps), 300)
    for r, (s, k) in enumerate(zip(seeds, steps)):
        for t in (0, 1, 150, 299):
            assert u[r, t].item() == pytest.approx(reference_uniform(s, k, t), abs=2**-25)
    assert ((u > 0) & (u < 1)).all()


def test_uniform_looks_uniform():
    u = uniform(torch.tensor([seed_key(s) for s in range(64)]), torch.zeros(64, dtype=torch.long),
                4096).flatten()
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 4 / math.sqrt(12 * n)
    counts = torch.histc(u, bins=16, min=0, max=1)
    chi2 = (((counts - n / 16) ** 2) / (n / 16)).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 45
    # Neighbouring tokens, steps and seeds are not correlated.
    grid = uniform(torch.tensor([seed_key(1), seed_key(2)]), torch.tensor([0, 0]), 4096)
    nxt = uniform(torch.tensor([seed_key(1)]), torch.tensor([1]), 4096)
    for a, b in [(grid[0, :-1], grid[0, 1:]), (grid[0], grid[1]), (grid[0], nxt[0])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.06


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 8000
    s = Sampler([SamplingParams(temperature=1.0)] * n, range(n), "cpu")
    tok = s.sample(probs.log().expand(n, -1))
    freq = torch.bincount(tok, minlength=4).float() / n
    assert (freq - probs).abs().max().item() < 4 * math.sqrt(0.25 / n)
    # One request over many steps draws from the same distribution.
    one = Sampler([SamplingParams(temperature=1.0)], [3], "cpu")
    toks = torch.cat([one(probs.log().view(1, -1)) for _ in range(4000)])
    freq = torch.bincount(toks, minlength=4).float() / 4000
    assert (freq - probs).abs().max().item() < 4 * math.sqrt(0.25 / 4000)


def test_a_row_does_not_see_its_neighbours():
    """Same logits, params and seed: the same token, whatever the other rows hold."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(),
              SamplingParams(temperature=1.5, top_k=4), SamplingParams(temperature=1.0, min_p=0.1),
              SamplingParams(temperature=0.9), SamplingParams(temperature=2.0, top_k=1)]
    seeds = [11, 0, 12, 13, 14, 15]
    batch = Sampler(params, seeds, "cpu")
    got = torch.stack([batch(logits) for _ in range(20)])  # (steps, B)
    for r in range(6):
        one = Sampler([params[r]], [seeds[r]], "cpu")
        assert torch.stack([one(logits[r:r + 1]) for _ in range(20)])[:, 0].tolist() == \
            got[:, r].tolist()
    assert got[:, 1].tolist() == [int(logits[1].argmax())] * 20  # greedy row
    assert len(set(got[:, 0].tolist())) > 1  # sampled rows really vary over steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_same_bits():
    keys, steps = torch.tensor([seed_key(s) for s in (1, 2, 3)]), torch.tensor([0, 5, 9])
    assert torch.equal(uniform(keys.cuda(), steps.cuda(), 1000).cpu(), uniform(keys, steps, 1000))


def test_greedy_tokens_are_torch_argmax():
    """The vectorized argmax (numpy's, on the CPU) picks PyTorch's index: the first of
    equal maxima, a NaN as the maximum, -inf rows, strided rows, other dtypes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, generator=g)
    x[1, 10] = x[1, 900] = 50.0
    x[2, 333], x[2, 500] = float("nan"), float("nan")
    x[3] = float("-inf")
    x[4] = x[4].round()  # many ties
    views = [x, x[:, ::3], x.t().contiguous().t(), x.view(6, 1, 1000)[:, -1],
             x.to(torch.bfloat16), x[:0]]
    for v in views:
        got = greedy_tokens(v)
        assert got.dtype == torch.int64 and torch.equal(got, v.argmax(dim=-1))
    assert plain_argmax([SamplingParams(), SamplingParams(top_k=1, temperature=0.5)])
    assert not plain_argmax([SamplingParams(), SamplingParams(temperature=0.5)])
    assert not plain_argmax([SamplingParams(repetition_penalty=1.2)])
    assert not plain_argmax([SamplingParams(presence_penalty=0.5)])
