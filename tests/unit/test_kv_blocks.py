"""BlockPool: allocation all-or-nothing, reference counts, prefix cache hits, LRU eviction."""

import pytest

from llamadist.engine.kv_blocks import NULL_BLOCK, BlockPool
from llamadist.engine.request import Request
from llamadist.generation.sampling import SamplingParams

BS = 4


def req(rid, prompt, max_new=4):
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new), seed=0)


def compute(pool, r, n, prefix=()):
    """Allocate, pretend the model computed n more tokens, commit."""
    assert pool.allocate(r, n, prefix)
    r.num_computed += len(prefix) * pool.block_size + n
    pool.commit(r)


def audit(pool, holders):
    """Every usable block is exactly one of: referenced, free-clean, free-cached; ref counts
    equal the number of holders."""
    refs = [0] * pool.num_blocks
    for r in holders:
        assert len(set(r.block_ids)) == len(r.block_ids)
        for b in r.block_ids:
            refs[b] += 1
    assert refs[NULL_BLOCK] == 0
    for b in range(1, pool.num_blocks):
        assert pool.ref_count(b) == refs[b], b
    free = pool._clean + list(pool._evictable)
    assert len(set(free)) == len(free) == pool.num_free
    assert set(free).isdisjoint(b for r in holders for b in r.block_ids)
    assert pool.num_used + pool.num_free == pool.num_usable == pool.num_blocks - 1


def test_allocate_is_all_or_nothing_and_never_hands_out_block_zero():
    pool = BlockPool(num_blocks=5, block_size=BS)  # 4 usable
    a, b = req("a", range(10)), req("b", range(10))
    assert pool.allocate(a, 10)  # 3 blocks
    assert len(a.block_ids) == 3 and NULL_BLOCK not in a.block_ids
    assert not pool.allocate(b, 5)  # needs 2, 1 free
    assert b.block_ids == [] and pool.num_free == 1
    assert pool.allocate(b, 4)
    audit(pool, [a, b])
    assert pool.num_free == 0
    # growing within the last block needs no new block; crossing it needs one
    a.num_computed = 10
    assert pool.allocate(a, 2) and len(a.block_ids) == 3
    assert not pool.allocate(a, 3)
    pool.free(a)
    assert pool.num_free == 3 and a.block_ids == []
    audit(pool, [b])


def test_prefix_match_reuses_full_blocks_and_leaves_one_token():
    pool = BlockPool(num_blocks=20, block_size=BS)
    system = list(range(100, 112))  # 3 full blocks
    a = req("a", system + [1, 2, 3])
    compute(pool, a, a.num_tokens)
    assert pool.num_cached == 3  # the partial 4th block is not cached
    b = req("b", system + [7, 8])
    blocks, n = pool.match_prefix(b.all_ids)
    assert blocks == a.block_ids[:3] and n == 12
    compute(pool, b, b.num_tokens - n, blocks)
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] != a.block_ids[3]
    assert all(pool.ref_count(x) == 2 for x in a.block_ids[:3])
    audit(pool, [a, b])
    # exactly the cached tokens: the match stops one token short of the whole sequence
    c = req("c", system)
    assert pool.match_prefix(c.all_ids) == (a.block_ids[:2], 8)
    # a different first block breaks the chain even if later blocks are equal
    d = req("d", [0, 0, 0, 0] + system[4:] + [1])
    assert pool.match_prefix(d.all_ids) == ([], 0)


def test_prefix_caching_off_never_matches():
    pool = BlockPool(num_blocks=10, block_size=BS, prefix_caching=False)
    a = req("a", range(9))
    compute(pool, a, 9)
    assert pool.num_cached == 0
    assert pool.match_prefix(list(range(9))) == ([], 0)
    pool.free(a)
    assert pool.num_free == 9


def test_freed_cached_blocks_stay_findable_and_are_evicted_lru():
    pool = BlockPool(num_blocks=7, block_size=BS)  # 6 usable
    a, b = req("a", range(0, 9)), req("b", range(50, 59))
    compute(pool, a, 8)  # 2 full blocks, cached
    compute(pool, b, 8)
    pool.free(a)  # released first: least recently used
    pool.free(b)
    assert pool.num_free == 6 and pool.num_cached == 4
    a2 = req("a2", range(0, 9))
    assert pool.match_prefix(a2.all_ids)[1] == 8
    # 2 clean blocks go first, then a's cached blocks (released before b's), tail first
    c = req("c", range(200, 216))
    assert pool.allocate(c, 12)  # 3 blocks: 2 clean + a's second block
    assert pool.match_prefix(a2.all_ids)[1] == 4  # a's head survives, its tail is gone
    assert pool.match_prefix(req("b2", range(50, 59)).all_ids)[1] == 8
    assert pool.allocate(c, 16)  # one more: a's head block
    assert pool.match_prefix(a2.all_ids) == ([], 0)
    assert pool.match_prefix(req("b2", range(50, 59)).all_ids)[1] == 8
    audit(pool, [c])


def test_sharing_an_unreferenced_cached_block_counts_as_using_a_free_block():
    pool = BlockPool(num_blocks=4, block_size=BS)  # 3 usable
    a = req("a", range(9))
    compute(pool, a, 8)
    pool.free(a)  # 2 cached, unreferenced: all 3 blocks free
    b = req("b", range(9))
    blocks, n = pool.match_prefix(b.all_ids)
    assert n == 8
    assert not pool.allocate(b, 9, blocks)  # 2 shared + 3 new > 3 free
    assert b.block_ids == [] and pool.num_free == 3 and pool.num_cached == 2
    assert pool.allocate(b, 1, blocks)
    assert pool.num_free == 0 and b.block_ids[:2] == blocks
    audit(pool, [b])


def test_same_prefix_computed_twice_stays_private_and_chains():
    pool = BlockPool(num_blocks=10, block_size=BS)
    a, b = req("a", range(13)), req("b", range(13))
    assert pool.allocate(a, 13) and pool.allocate(b, 13)  # both before either commits
    a.num_computed = b.num_computed = 13
    pool.commit(a)
    pool.commit(b)
    assert pool.num_cached == 3
    assert not any(pool.is_cached(x) for x in b.block_ids)
    a_blocks = a.block_ids[:3]
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 9 and pool.num_cached == 3
    assert pool.match_prefix(list(range(13))) == (a_blocks, 12)
    # b's duplicate blocks went back clean: the next allocation takes them, not a's
    c = req("c", range(500, 512))
    assert pool.allocate(c, 12)
    assert pool.match_prefix(list(range(13))) == (a_blocks, 12)


def test_prefix_blocks_only_for_an_empty_request():
    pool = BlockPool(num_blocks=10, block_size=BS)
    a = req("a", range(9))
    compute(pool, a, 8)
    b = req("b", range(9))
    assert pool.allocate(b, 1)
    with pytest.raises(ValueError, match="holds no blocks"):
        pool.allocate(b, 1, pool.match_prefix(b.all_ids)[0])


def test_pool_needs_a_usable_block():
    with pytest.raises(ValueError, match="null block"):
        BlockPool(num_blocks=1, block_size=BS)
