"""The columnar step message (llamadist.runtime.step_columns): every field survives the
bytes, receivers build the same PagedBatch as the per-sequence build did, and the sampling
specs are unpickled only where something samples."""

import itertools
import random

import numpy as np
import pytest
import torch

from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.paged_kv import PagedBatch
from llamadist.runtime.step_work import (SampleSpec, SeqWork, StepWork, sample_step,
                                         unpack_sampled)


def reference_build(chunks, block_size):
    """The per-sequence PagedBatch.build before the columnar form (kept to compare)."""
    s = len(chunks)
    starts = np.array([c[1] for c in chunks], np.int64)
    qlens = np.array([c[2] for c in chunks], np.int64)
    need = -(-(starts + qlens) // block_size)
    flat = np.fromiter(itertools.chain.from_iterable(
        c[0][:k] for c, k in zip(chunks, need.tolist())), np.int64, int(need.sum()))
    tables = np.zeros((s, int(need.max())), np.int64)
    tables[np.repeat(np.arange(s), need),
           np.arange(len(flat)) - np.repeat(np.cumsum(need) - need, need)] = flat
    qstart = np.concatenate([[0], np.cumsum(qlens)])
    seq = np.repeat(np.arange(s), qlens)
    pos = np.arange(qstart[-1]) + (starts - qstart[:-1])[seq]
    slots = tables[seq, pos // block_size] * block_size + pos % block_size
    return dict(positions=pos, slot_mapping=slots, query_start=qstart,
                seq_lens=starts + qlens, block_tables=tables, last_token_index=qstart[1:] - 1)


def mixed_step(n=12, seed=0, bs=4) -> StepWork:
    """Decodes and prefill chunks; seeded sampling with penalties, logprobs, prompt
    scoring and pending (scheduled-ahead) decodes; shared and distinct params."""
    rng = random.Random(seed)
    shared = SamplingParams(temperature=0.8, top_k=20, seed=1)
    seqs = []
    for i in range(n):
        start = rng.randrange(0, 40)
        ntok = 1 if i % 3 else rng.randrange(1, 9)
        blocks = tuple(rng.sample(range(1, 500), -(-(start + ntok) // bs) + rng.randrange(3)))
        spec = None
        if i % 4 != 1:
            params = shared if i % 2 else SamplingParams(
                temperature=0.5 + i / 10, repetition_penalty=1.2, presence_penalty=0.5,
                logprobs=i % 3, stop=("x", f"s{i}"))
            spec = SampleSpec(params, 1000 + i, i, tuple(range(i + 3)), tuple(range(i)))
        score = tuple(rng.randrange(100) for _ in range(ntok)) if i == 3 else ()
        seqs.append(SeqWork(f"req-{i}-é", tuple(rng.randrange(100) for _ in range(ntok)),
                            blocks, start, spec, score, 2 if score else 0,
                            prev_index=i // 2 if ntok == 1 and i % 5 == 0 else -1))
    return StepWork(seqs, bs)


def test_every_field_round_trips_and_forwarding_keeps_the_bytes():
    work = mixed_step()
    work.reset_stats = True
    packed = work.pack()
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    back = StepWork.unpack(packed)
    assert back.num_seqs == 12 and back.block_size == 4 and back.reset_stats
    assert back.tokens().tolist() == work.tokens().tolist()
    assert back.pending() == work.pending() and back.pending()[0]
    assert torch.equal(back.pack(), packed)  # a rank forwards what it got
    assert isinstance(back.columns._tail, bytes)  # nothing above needed the specs
    assert back.seqs == work.seqs  # scores, prev_index, seen/outputs, params...
    assert back.sampled_ids == work.sampled_ids and len(back.sampled_ids) == 9
    assert not StepWork.unpack(StepWork(work.seqs, 4).pack()).reset_stats


def test_an_empty_step_round_trips():
    back = StepWork.unpack(StepWork([], 16, reset_stats=True).pack())
    assert back.num_seqs == 0 and back.seqs == [] and back.reset_stats
    assert back.sampled_ids == [] and back.tokens().tolist() == [] and back.pending() == ([], [])
    with pytest.raises(ValueError, match="at least one sequence"):
        back.batch()


def test_bytes_of_another_format_are_refused():
    with pytest.raises(ValueError, match="not a step message"):
        StepWork.unpack(torch.zeros(128, dtype=torch.uint8))


@pytest.mark.parametrize("seed", range(5))
def test_paged_batch_equals_the_per_sequence_build(seed):
    work = mixed_step(n=20, seed=seed)
    old = reference_build([(s.block_ids, s.start, len(s.token_ids)) for s in work.seqs], 4)
    for w in (work, StepWork.unpack(work.pack())):
        b = w.batch()
        for name, want in old.items():
            assert getattr(b, name).tolist() == want.tolist(), name
        assert b.query_lens == tuple(len(s.token_ids) for s in work.seqs)
        assert b.starts == tuple(s.start for s in work.seqs)
        first = old["query_start"].tolist()
        extra = [first[i] + j for i, s in enumerate(work.seqs) for j in range(len(s.score))]
        assert b.logits_index.tolist() == old["last_token_index"].tolist() + extra
    chunks = [([7, 3, 5, 0], 8, 6), ([2, 9], 3, 1), ([9, 1], 0, 5)]
    ref = reference_build(chunks, 4)
    assert PagedBatch.build(chunks, 4).block_tables.tolist() == ref["block_tables"].tolist()


def test_a_decode_step_stays_a_decode_batch():
    seqs = [SeqWork(f"r{i}", (i,), (i, i + 1), 5, None) for i in range(3)]
    b = StepWork.unpack(StepWork(seqs, 4).pack()).batch()
    assert b.is_decode and b.positions.tolist() == [5, 5, 5]
    assert b.slot_mapping.tolist() == [(i + 1) * 4 + 1 for i in range(3)]


def test_sampling_from_the_message_equals_sampling_from_the_objects():
    """Seeded draws, penalties, logprobs and prompt scores through the columns of a
    received step equal the front's."""
    work = mixed_step()
    back = StepWork.unpack(work.pack())
    rows = work.num_seqs + len(work.seqs[3].score)
    logits = torch.randn(rows, 100, generator=torch.Generator().manual_seed(0))
    a, b = sample_step(logits, work), sample_step(logits, back)
    assert torch.equal(a, b)
    tokens, chosen, scored = unpack_sampled(a.tolist(), back)
    assert len(tokens) == 9 and set(chosen) == {s.request_id for s in work.seqs
                                                if s.num_logprobs is not None}
    assert [e.token_id for e in scored["req-3-é"]] == list(work.seqs[3].score)
    assert all(len(e.top) == 2 for e in scored["req-3-é"])
    assert unpack_sampled(a.tolist(), work) == (tokens, chosen, scored)


def test_tokens_are_a_tensor_of_their_own():
    back = StepWork.unpack(mixed_step().pack())
    x = back.tokens()
    x[:] = -1  # the executor writes pending tokens in place
    assert (back.tokens() >= 0).all()


def test_equal_params_are_sent_once():
    def step(shared: bool) -> StepWork:
        one = SamplingParams(temperature=0.7, stop=("a long stop string",) * 4)
        return StepWork([SeqWork(f"r{i}", (1,), (i,), 0, SampleSpec(
            one if shared else SamplingParams(temperature=0.7, stop=("a long stop string",) * 4),
            i, 0)) for i in range(50)], 16)
    distinct, shared = step(False), step(True)
    assert distinct.pack().numel() == shared.pack().numel()
    back = StepWork.unpack(distinct.pack())
    assert [s.sample for s in back.seqs] == [s.sample for s in distinct.seqs]


def test_greedy_steps_take_each_sampling_row_argmax():
    """A greedy step (no Sampler built): each sampling sequence's token is the argmax of
    its own logits row, whether every sequence samples (the rows as they are) or a prefill
    chunk between them does not (the rows gathered); a mixed step's greedy rows agree."""
    greedy, hot = SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = logits[2, 250] = logits[2].max() + 1  # a tie: the first index wins

    def step(specs):
        return StepWork([SeqWork(f"r{i}", (i,), (1,), 3, None if p is None else
                                 SampleSpec(p, 5, 2)) for i, p in enumerate(specs)], 4)

    want = logits.argmax(dim=-1).tolist()
    assert want[2] == 7
    assert sample_step(logits, step([greedy] * 4)).tolist() == want
    assert sample_step(logits, step([greedy, None, greedy, greedy])).tolist() == \
        [want[0], want[2], want[3]]
    mixed = sample_step(logits, step([greedy, hot, greedy, None])).tolist()
    assert mixed[0] == want[0] and mixed[2] == want[2]
