"""Context parallelism's pure parts: the grid's cp axis, which CP rank holds which tokens
of a step (llamadist.runtime.cp_step.CPStep, host data only), the planner choosing CP
only when nothing else fits, and the llama3.1-8b shape."""

from __future__ import annotations

import pytest

from llamadist.config import ModelConfig, named_shape
from llamadist.distributed.grid import coords, cp_index, group_ranks, rank_of
from llamadist.planning.auto import auto_plan
from llamadist.planning.checks import GridError, check_grid, grid_size
from llamadist.planning.profile import profile
from llamadist.runtime.cp_step import CPStep, stripe_owner
from llamadist.runtime.step_work import SeqWork, StepWork


def test_grid_cp_axis_sits_between_tp_and_pp():
    pp, tp, dp, cp = 2, 2, 1, 2
    for rank in range(8):
        d, p, t = coords(rank, pp, tp, dp, cp)
        assert rank_of(d, p, t, pp, tp, cp, cp_index(rank, tp, cp)) == rank
    assert group_ranks("cp", pp, tp, dp, cp) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks("tp", pp, tp, dp, cp) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks("pp", pp, tp, dp, cp) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks("stage", pp, tp, dp, cp) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for dim in ("cp", "tp", "pp", "dp"):  # every rank in exactly one group of each
        assert sorted(r for g in group_ranks(dim, pp, tp, dp, cp) for r in g) == list(range(8))
    assert group_ranks("tp", 2, 2, 2) == group_ranks("tp", 2, 2, 2, 1)  # cp 1: as before


def test_grid_size_counts_cp():
    assert grid_size(None, None, 2, 1, cp=2) == (4, 1)
    assert grid_size(6, None, 1, 1, cp=3) == (6, 2)
    with pytest.raises(GridError, match="pp=1 x tp=2 x cp=2 x dp=1 = 4"):
        grid_size(6, 1, 2, 1, cp=2)
    cfg = named_shape("llama3-8b")
    assert check_grid(cfg, 4, None, tp=2, cp=2) == (4, 1, 2, 1)


def step(*seqs: tuple[list[int], int, int], block: int = 8) -> StepWork:
    """seqs: (scheduler block ids, start, num_tokens)."""
    return StepWork([SeqWork(f"r{i}", tuple([1] * n), tuple(b), s, None)
                     for i, (b, s, n) in enumerate(seqs)], block)


def shares(work: StepWork, cp: int) -> list[CPStep]:
    return [CPStep.build(work, cp, r) for r in range(cp)]


def test_every_token_on_exactly_one_rank_at_its_owners_stripe():
    work = step(([5, 9, 2], 0, 21), ([3, 4], 6, 9), ([7], 3, 1))  # cp 2: stripes of 4
    got = shares(work, 2)
    flat = sorted(int(f) for s in got for f in s.mine[s.own])  # decodes run everywhere
    assert flat == list(range(31))
    for s in got:
        for seq, pos in zip(s.seq_of[s.own], s.positions[s.own]):
            home = work.seqs[seq].block_ids[0] % 2
            assert stripe_owner(int(pos), home, 2, 4) == s.rank
        # the decode (flat 30) is run by every rank, stored by one, merged by every rank
        assert s.mine[s.rep_rows].tolist() == [30] and s.has_past
        assert len(s.slots) == int(s.own.sum())
    # distinct (block, offset) slots on each rank
    assert all(len(set(s.slots.tolist())) == len(s.slots) for s in got)
    # the decode's logit row comes from CP rank 0, the prefills' from their owners
    assert got[0].logits_from[2] == (0, 2)


def test_short_requests_stay_on_one_rank_and_spread_by_home():
    # three requests of at most one stripe (4 tokens): each whole on one rank; homes
    # (first block id mod cp) 1, 2, 0 put them on three different ranks
    work = step(([4], 0, 3), ([5], 0, 4), ([6], 0, 2), block=12)
    got = shares(work, 3)
    holders = [{s.rank for s in got if (s.seq_of == i).any()} for i in range(3)]
    assert holders == [{1}, {2}, {0}]
    assert all(s.ring_width == 0 for s in got)  # no sequence spans ranks: no ring


def test_long_prompt_is_striped_evenly_and_rings():
    work = step((list(range(1, 9)), 0, 64))  # 64 tokens, cp 2 x stripes of 4
    got = shares(work, 2)
    assert [s.num_tokens for s in got] == [32, 32]
    assert all(s.ring_width == 32 for s in got)
    # causal work (keys each query sees) within 15% over the ranks
    work_of = [sum(int(p) + 1 for p in s.positions) for s in got]
    assert max(work_of) / min(work_of) < 1.15


def test_past_lengths_match_the_positions_each_rank_stored():
    blocks = [5, 9, 2, 7]
    for start in (0, 3, 4, 8, 13, 24):
        work = step((blocks, start, 2))
        for s in shares(work, 2):
            home = blocks[0] % 2
            stored = sum(stripe_owner(p, home, 2, 4) == s.rank for p in range(start))
            assert s.past_lens[0] == stored
            assert (s.past_width > 0) == (start > 0)


def test_logit_rows_come_from_their_owners_in_step_order():
    work = step(([1, 2], 0, 11), ([3], 0, 2), ([4, 6], 5, 1))
    got = shares(work, 2)
    last = [10, 12, 13]  # flat index of each sequence's last token
    for row, (owner, k) in enumerate(got[0].logits_from):
        assert int(got[owner].mine[got[owner].logits_local[k]]) == last[row]
    # a step of decodes only: CP rank 0 has every logit row, nothing is gathered
    decodes = shares(step(([1, 2], 9, 1), ([3], 5, 1)), 2)
    assert [s.logits_gather for s in decodes] == [False, False]
    assert [len(s.logits_local) for s in decodes] == [2, 0]


def test_block_size_must_split_over_cp():
    with pytest.raises(ValueError, match="multiple of cp=3"):
        CPStep.build(step(([1], 0, 2), block=8), 3, 0)


# ---- the planner ---------------------------------------------------------------
ONE_HEAD = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2,
                       num_heads=1, num_kv_heads=1, head_dim=256,
                       max_position_embeddings=1 << 20)


def test_auto_chooses_cp_only_when_one_sequence_does_not_fit():
    """One head (no TP) and 2 layers (PP halves the KV at most): a 1M-token sequence's KV
    (2 GiB) fits 600 MiB devices only split 4 ways along the sequence."""
    prof = profile(ONE_HEAD, dtype="bfloat16", seq_len=1 << 20)
    best = auto_plan(prof, gpus=4, gpu_memory="600MiB", max_seq_len=1 << 20, config=ONE_HEAD)[0]
    assert best.cp == 4 and best.num_devices == 4
    assert "context parallelism because" in best.why and "ring prefill" in best.why
    assert best.stages[0].cp_comm_s > 0 and best.stages[0].ring_prefill_s > 0
    assert best.max_memory_bytes <= 600 * 2**20
    roomy = auto_plan(prof, gpus=4, gpu_memory="80GiB", max_seq_len=1 << 20, config=ONE_HEAD)
    assert all(c.cp == 1 for c in roomy)


def test_llama31_shape_has_128k_context_and_llama3_rope():
    cfg = named_shape("llama3.1-8b")
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    base = named_shape("llama3-8b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads) == \
        (base.hidden_size, base.num_layers, base.num_kv_heads)
