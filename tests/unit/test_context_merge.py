"""The math of context parallelism in one process (llamadist.parallel.context): partial
attention over k key shards, merged, equals full attention (float64), with empty shards,
masked keys and fully masked rows; the balanced split and the ring plan."""

from __future__ import annotations

import math

import pytest
import torch

from llamadist.parallel.context import (RingPlan, balanced_split, decode_owner,
                                        merge_partials, partial_attention)

H, H_KV, D = 6, 2, 8


def reference(q, k, v, mask=None):
    """Plain softmax attention, GQA by repeating K/V heads: q (T, H, D), k/v (S, H_kv, D),
    mask (T, S) -> (T, H, D); rows with no visible key -> 0."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (S, H, D)
    scores = torch.einsum("thd,shd->hts", q, kr) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # an all -inf row: softmax gives nan
    return torch.einsum("hts,shd->thd", p, vr)


def _qkv(t, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, H, D, generator=g, dtype=torch.float64),
            torch.randn(s, H_KV, D, generator=g, dtype=torch.float64) * 2,
            torch.randn(s, H_KV, D, generator=g, dtype=torch.float64))


def _merged(q, k, v, bounds, mask=None):
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        m = None if mask is None else mask[:, lo:hi]
        parts.append(partial_attention(q, k[lo:hi], v[lo:hi], m))
    return merge_partials(parts)


def test_partial_alone_is_attention_and_lse_is_logsumexp():
    q, k, v = _qkv(5, 9)
    out, lse = partial_attention(q, k, v)
    assert out.dtype == lse.dtype == torch.float64 and lse.shape == (5, H)
    assert torch.allclose(out, reference(q, k, v), atol=1e-12)
    kr = k.repeat_interleave(H // H_KV, dim=1)
    want = torch.logsumexp(torch.einsum("thd,shd->ths", q, kr) / math.sqrt(D), -1)
    assert torch.allclose(lse, want, atol=1e-12)


@pytest.mark.parametrize("bounds", [[0, 4, 9, 17], [0, 1, 2, 3, 17], [0, 17],
                                    [0, 0, 6, 6, 17, 17]])  # the last: empty shards
def test_shards_merged_equal_full_attention(bounds):
    q, k, v = _qkv(7, 17)
    out, lse = _merged(q, k, v, bounds)
    full_out, full_lse = partial_attention(q, k, v)
    assert torch.allclose(out, reference(q, k, v), atol=1e-12)
    assert torch.allclose(lse, full_lse, atol=1e-12)


def test_causal_mask_with_fully_masked_rows_and_shards():
    """Queries at positions 3..9 against keys 0..11 causally, plus rows that see nothing
    (a query whose position is before every key) and a shard no query sees."""
    q, k, v = _qkv(8, 12, seed=1)
    q_pos = torch.tensor([-2, 3, 4, 5, 6, 7, 8, 9])  # row 0 sees no key at all
    mask = torch.arange(12).view(1, -1) <= q_pos.view(-1, 1)  # (T, S)
    out, lse = _merged(q, k, v, [0, 2, 5, 10, 12], mask)  # keys 10, 11: seen by nobody
    want = reference(q, k, v, mask)
    assert torch.allclose(out, want, atol=1e-12)
    assert torch.equal(out[0], torch.zeros(H, D)) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1:]).all() and not torch.isnan(out).any()


def test_all_shards_empty_and_large_scores():
    q, k, v = _qkv(3, 0)
    out, lse = merge_partials([partial_attention(q, k, v), partial_attention(q, k, v)])
    assert torch.equal(out, torch.zeros(3, H, D)) and torch.isneginf(lse).all()
    # scores far beyond exp's range: the correction keeps the merge exact
    q, k, v = _qkv(4, 10, seed=2)
    q = q * 300
    out, _ = _merged(q, k, v, [0, 3, 10])
    assert torch.allclose(out, reference(q, k, v), atol=1e-9) and torch.isfinite(out).all()


def test_float32_inputs_give_float32_partials_and_batch_dims():
    q, k, v = (x.float() for x in _qkv(1, 11, seed=3))
    qb, kb, vb = q.expand(2, 1, H, D), k.expand(2, 11, H_KV, D), v.expand(2, 11, H_KV, D)
    out, lse = partial_attention(qb, kb, vb, torch.ones(2, 1, 11, dtype=torch.bool))
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (2, 1, H, D)
    assert torch.allclose(out[1], reference(q.double(), k.double(), v.double()).float(),
                          atol=1e-6)


@pytest.mark.parametrize("length,cp,granule", [(5, 2, 1), (7, 3, 1), (1, 3, 1), (37, 3, 4),
                                               (3, 2, 4), (16, 2, 4)])
def test_balanced_split_covers_every_position_once(length, cp, granule):
    shares = balanced_split(length, cp, granule)
    assert sorted(p for s in shares for p in s) == list(range(length))
    c = granule * -(-length // (2 * cp * granule))
    for r, s in enumerate(shares):
        assert s == sorted(s)
        assert all(p // c in (r, 2 * cp - 1 - r) for p in s)  # its early and late chunk


def test_balanced_split_evens_the_causal_work():
    shares = balanced_split(4096, 4)
    work = [sum(p + 1 for p in s) for s in shares]  # keys each rank's queries see
    assert max(work) / min(work) < 1.001


def test_ring_plan_trims_each_step_to_half_a_block():
    """cp 2, 8 tokens: rank 0 holds 0,1 | 6,7; rank 1 holds 2,3 | 4,5. At step 1 rank 0
    has rank 1's block: only its late queries (6, 7) see it, every key (all visible).
    Rank 1 gets rank 0's block: all its queries see its early keys 0,1 only."""
    shares = balanced_split(8, 2)
    assert shares == [[0, 1, 6, 7], [2, 3, 4, 5]]
    p0, p1 = RingPlan.build(shares, 0), RingPlan.build(shares, 1)
    assert p0.width == 4
    (src, q_lo, k_hi, mask), = p0.steps[1:]
    assert (src, q_lo, k_hi, mask) == (1, 2, 4, None)
    (src, q_lo, k_hi, mask), = p1.steps[1:]
    assert (src, q_lo, k_hi, mask) == (0, 0, 2, None)
    src, q_lo, k_hi, mask = p0.steps[0]  # the diagonal block: causal inside
    assert (src, q_lo, k_hi) == (0, 0, 4) and mask.tolist()[0] == [True, False, False, False]
    empty = RingPlan.build(balanced_split(1, 3), 2)  # rank 2 holds nothing
    assert all(k_hi == 0 for _, _, k_hi, _ in empty.steps)


def test_decode_owner_round_robin_by_block():
    assert [decode_owner(p, 3, 2) for p in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    assert [decode_owner(p, 2) for p in range(4)] == [0, 1, 0, 1]


def test_cp_costs_in_the_planning_model():
    """Ring traffic of a Llama-3-8B-shaped prefill (bf16, 8 KV heads of 128: 4 KiB of K/V
    per token and layer) and the decode merge: queries gathered, two all-reduces."""
    from llamadist.config import ModelConfig
    from llamadist.planning.cost import Link, cp_decode_comm_time, cp_prefill_comm_time
    from llamadist.planning.profile import profile
    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    prof = profile(cfg, "bfloat16", 32768)
    link = Link("test", 100e9, 2e-6)
    block = 8192 * 4096  # 32768 / 4 tokens x 4 KiB
    assert cp_prefill_comm_time(prof, 32, 32768, 4, link) == pytest.approx(
        32 * 3 * (2e-6 + block / 100e9))
    assert cp_prefill_comm_time(prof, 32, 32768, 1, link) == 0.0
    # one all-gather of every rank's packed fp32 (B, H, D + 1) partials per layer
    merge = link.all_gather_s(2 * 2 * (4096 + 32) * 4, 2)
    assert merge == pytest.approx(2e-6 + 2 * (4096 + 32) * 4 / 100e9)
    assert cp_decode_comm_time(prof, 32, 2, 2, link) == pytest.approx(32 * merge)


def test_query_row_chunks_give_the_same_partials():
    """A bounded score buffer: 13 query rows in chunks of 2 (max_scores = 2 rows x H x S),
    masked, with a batch dimension, equal the one-shot result."""
    q, k, v = _qkv(13, 10, seed=4)
    mask = torch.arange(10).view(1, -1) <= torch.arange(13).view(-1, 1) - 3
    whole = partial_attention(q, k, v, mask)
    parts = partial_attention(q, k, v, mask, max_scores=2 * H * 10)
    assert torch.allclose(parts[0], whole[0], atol=1e-12)
    assert torch.allclose(parts[1], whole[1], atol=1e-12)
    qb, kb, vb = q.expand(3, 13, H, D), k.expand(3, 10, H_KV, D), v.expand(3, 10, H_KV, D)
    batched = partial_attention(qb, kb, vb, mask.expand(3, 13, 10), max_scores=7)
    assert torch.allclose(batched[0][2], whole[0], atol=1e-12)
    assert torch.allclose(batched[1][1], whole[1], atol=1e-12)


def _stripes(t, s, width, shift):
    """A striped ring block's mask: query stripe i sees key stripes < i + shift."""
    qi = torch.arange(t).view(-1, 1) // width
    ki = torch.arange(s).view(1, -1) // width
    return ki < qi + shift


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("kind", ["none", "causal", "stripes", "stripes_shift", "random",
                                  "empty_rows", "batched"])
def test_fused_cpu_path_equals_materialised_scores(kind, dtype, tol):
    """The fused kernel (runs of contiguous key ranges, additive bias, causal, GQA folded
    into rows) against the materialised reference (_partial), lse included."""
    from llamadist.parallel.context import _partial, masked_runs as _runs
    q, k, v = (x.to(dtype) for x in _qkv(12, 12, seed=5))
    mask, causal = None, False
    if kind == "causal":
        causal = True
    elif kind.startswith("stripes"):
        mask = _stripes(12, 12, 3, int(kind == "stripes_shift"))
        assert _runs(mask) is not None and len(_runs(mask)) >= 3
    elif kind in ("random", "empty_rows"):
        mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(1)) > 0.4
        if kind == "empty_rows":
            mask[[0, 7]] = False
        assert _runs(mask) is None  # the additive-bias path
    if kind == "batched":
        q, k, v = q.view(3, 4, H, D), k.view(3, 4, H_KV, D), v.view(3, 4, H_KV, D)
        mask = torch.arange(4).view(1, 1, 4) < torch.tensor([4, 1, 2]).view(3, 1, 1)
        mask = mask.expand(3, 4, 4).clone()
        mask[1, 2] = False  # one empty row in a batch
    got = partial_attention(q, k, v, mask, causal=causal)
    ref = _partial(q, k, v, torch.ones(12, 12, dtype=torch.bool).tril() if causal else mask,
                   None)
    assert got[0].dtype == ref[0].dtype
    assert torch.allclose(got[0], ref[0], atol=tol)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))
    fin = torch.isfinite(ref[1])
    assert torch.allclose(got[1][fin], ref[1][fin], atol=tol)
    if kind == "empty_rows":
        assert (got[0][[0, 7]] == 0).all() and torch.isinf(got[1][[0, 7]]).all()
