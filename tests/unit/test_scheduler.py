"""Scheduler: admission, chunked prefill under the token budget, preemption and resume,
refusal, prefix reuse and eviction, cancellation, and a randomized simulation checking
invariants every step. Pure Python: a fake model whose next token is a function of the
sequence so far, so every request's outputs must equal those of the request run alone."""

import random
from collections import defaultdict, deque

import pytest

from llamadist.engine.kv_blocks import NULL_BLOCK, BlockPool
from llamadist.engine.request import Request, RequestStatus
from llamadist.engine.scheduler import RequestTooLarge, Scheduler
from llamadist.generation.sampling import SamplingParams


def req(rid, prompt, max_new=4):
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new), seed=0)


def next_token(tokens) -> int:
    """The fake model: a deterministic function of the whole sequence so far."""
    return hash(tuple(tokens)) % 1000 + 1


def expected_outputs(prompt, max_new):
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(next_token(ids))
    return ids[len(prompt):]


def sampled_for(step):
    return {c.request.id: next_token(c.request.tokens(0, c.end)) for c in step.chunks
            if c.sample}


def run_step(s):
    step = s.schedule()
    s.update(step, sampled_for(step))
    return step


def shape(step):
    return [(c.request.id, c.start, c.num_tokens, c.sample) for c in step.chunks]


def make(num_blocks=64, block_size=4, max_batch=4, max_batch_tokens=64, max_seq_len=256,
         prefix_caching=True):
    pool = BlockPool(num_blocks, block_size, prefix_caching)
    return Scheduler(pool, max_batch, max_batch_tokens, max_seq_len, clock=lambda: 0.0)


# ---- admission ------------------------------------------------------------------------
def test_admission_is_fcfs_and_capped_by_max_batch():
    s = make(max_batch=2)
    for i in range(4):
        s.add(req(f"r{i}", range(10 * i + 1, 10 * i + 4), max_new=2 + i))
    assert shape(s.schedule()) == [("r0", 0, 3, True), ("r1", 0, 3, True)]
    assert (s.num_running, s.num_waiting) == (2, 2)
    s2 = make(max_batch=2)
    for i in range(4):
        s2.add(req(f"r{i}", range(10 * i + 1, 10 * i + 4), max_new=2 + i))
    order = []
    while s2.has_unfinished:
        step = run_step(s2)
        assert len(step.chunks) <= 2 and s2.num_running <= 2
        order += [c.request.id for c in step.chunks if c.start == 0]
    assert order == ["r0", "r1", "r2", "r3"]  # admitted in arrival order


def test_request_finishes_by_length_with_the_right_tokens_and_frees_blocks():
    s = make()
    r = req("a", range(1, 8), max_new=5)
    s.add(r)
    steps = 0
    while s.has_unfinished:
        run_step(s)
        steps += 1
    assert steps == 5  # one prefill step, then 4 decodes; the 5th token is never fed back
    assert r.status is RequestStatus.FINISHED and r.finish_reason == "length"
    assert r.output_ids == expected_outputs(range(1, 8), 5)
    assert r.num_computed == 7 + 4 and r.block_ids == [] and s.blocks_used == 0


def test_waiting_head_blocks_the_queue_no_overtaking():
    s = make(num_blocks=5, block_size=4, max_batch_tokens=64)  # 4 usable blocks
    s.add(req("big", range(1, 13), max_new=2))    # 3 blocks for its prompt
    s.add(req("big2", range(20, 32), max_new=2))  # 3 blocks: must wait
    s.add(req("small", [5], max_new=2))           # would fit, but must not overtake big2
    assert [c.request.id for c in s.schedule().chunks] == ["big"]


# ---- chunked prefill ------------------------------------------------------------------
def test_chunked_prefill_fills_the_leftover_budget_exactly():
    s = make(num_blocks=400, block_size=16, max_batch=4, max_batch_tokens=258,
             max_seq_len=2048)
    s.add(req("d1", range(1, 6), max_new=50))
    s.add(req("d2", range(7, 12), max_new=50))
    run_step(s)  # both prefilled; from now on each decodes one token per step
    s.add(req("long", range(1000, 2000), max_new=3))
    chunks = []
    for i in range(4):
        step = run_step(s)
        assert step.num_tokens == (258 if i < 3 else 2 + 232)  # the budget, exactly
        assert [c.request.id for c in step.chunks] == ["d1", "d2", "long"]
        assert all(c.num_tokens == 1 and c.sample for c in step.chunks[:2])
        chunks.append(step.chunks[2])
    assert [c.num_tokens for c in chunks] == [256, 256, 256, 232]
    assert [c.start for c in chunks] == [0, 256, 512, 768]
    assert [c.sample for c in chunks] == [False, False, False, True]
    assert s.get("long").output_ids == expected_outputs(range(1000, 2000), 1)


def test_chunked_prefill_alone_uses_the_whole_budget():
    s = make(num_blocks=400, block_size=16, max_batch_tokens=256, max_seq_len=2048)
    s.add(req("long", range(1000, 2000), max_new=3))
    sizes = [run_step(s).chunks[0].num_tokens for _ in range(4)]
    assert sizes == [256, 256, 256, 232]


def test_a_prefill_ahead_in_the_order_never_stalls_later_decodes():
    s = make(num_blocks=100, block_size=4, max_batch=4, max_batch_tokens=64)
    long = req("long", range(1000, 1200), max_new=2)
    s.add(long)
    first = s.schedule()  # long: 64 tokens, in flight (a pipeline keeps it going)
    s.add(req("d1", range(1, 6), max_new=20))
    s.add(req("d2", range(7, 12), max_new=20))
    second = s.schedule()  # long is in flight: d1 and d2 are admitted behind it
    assert shape(second) == [("d1", 0, 5, True), ("d2", 0, 5, True)]
    s.update(first, sampled_for(first))
    s.update(second, sampled_for(second))
    assert [r.id for r in s.running] == ["long", "d1", "d2"]
    assert shape(s.schedule()) == [("long", 64, 62, False), ("d1", 5, 1, True),
                                   ("d2", 5, 1, True)]


def test_budget_below_max_batch_is_refused():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Scheduler(BlockPool(8, 4), max_batch=8, max_batch_tokens=4, max_seq_len=64)


# ---- preemption -----------------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_when_blocks_run_out_and_resume_with_prompt_and_outputs(prefix_caching):
    # 6 usable blocks of 4: two requests of 8 + 12 tokens cannot both finish
    s = make(num_blocks=7, block_size=4, max_batch=2, max_batch_tokens=32, max_seq_len=64,
             prefix_caching=prefix_caching)
    a, b = req("a", range(1, 9), max_new=13), req("b", range(20, 28), max_new=13)
    c = req("c", range(40, 42), max_new=2)  # waits behind a and b (max_batch 2)
    for r in (a, b, c):
        s.add(r)
    resumed = None
    for _ in range(200):
        if not s.has_unfinished:
            break
        step = s.schedule()
        if step.preempted:
            assert step.preempted == [b]  # the most recently admitted
            assert b.status is RequestStatus.WAITING and b.num_computed == 0
            assert b.block_ids == [] and list(s.waiting) == [b, c] and b.output_ids
            assert [c.request for c in step.chunks] == [a]  # nothing admitted this step
            outputs_at_preemption = list(b.output_ids)
        for ch in step.chunks:
            if ch.request is b and resumed is None and b.num_preemptions:
                resumed = ch
                assert b.output_ids == outputs_at_preemption
        s.update(step, sampled_for(step))
    assert s.preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0
    # the resumed chunk recomputes prompt + outputs so far: from 0, or from the cache
    assert resumed is not None and resumed.end == 8 + len(outputs_at_preemption)
    assert resumed.sample
    if prefix_caching:
        assert resumed.start > 0 and resumed.start % 4 == 0
    else:
        assert resumed.start == 0
    for r, prompt, n in ((a, range(1, 9), 13), (b, range(20, 28), 13), (c, range(40, 42), 2)):
        assert r.finish_reason == "length" and r.output_ids == expected_outputs(prompt, n)
    assert s.blocks_used == 0


def test_running_request_preempts_itself_when_it_is_the_latest():
    s = make(num_blocks=4, block_size=4, max_batch=2, max_batch_tokens=32, max_seq_len=64,
             prefix_caching=False)  # 3 usable blocks
    a, b = req("a", range(1, 5), max_new=5), req("b", range(10, 14), max_new=5)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 1 block, b: 1 block, both sampled their first token
    run_step(s)  # a needs a 2nd block (gets it); b needs a 2nd: none left -> b itself
    assert b.status is RequestStatus.WAITING and b.num_preemptions == 1
    assert a.status is RequestStatus.RUNNING and len(a.block_ids) == 2


def test_a_step_that_preempts_admits_nobody():
    # 6 usable blocks of 4, budget 4: a holds 4 blocks, b 2; a's next token needs a 5th
    s = make(num_blocks=7, block_size=4, max_batch=2, max_batch_tokens=4, max_seq_len=64,
             prefix_caching=False)
    a, b = req("a", range(1, 17), max_new=8), req("b", range(20, 28), max_new=8)
    s.add(a)
    for _ in range(4):
        run_step(s)  # a: 16 prompt tokens in 4 chunks, first token sampled
    s.add(b)
    run_step(s)  # a decodes (5th block), b gets 3 tokens (its 1st block)
    step = None
    for _ in range(20):
        step = s.schedule()
        if step.preempted:
            break
        s.update(step, sampled_for(step))
    assert step.preempted == [b]
    assert s.blocks_free >= 1  # b's next chunk would fit, but it is not readmitted now
    assert [c.request for c in step.chunks] == [a] and list(s.waiting) == [b]


# ---- refusal --------------------------------------------------------------------------
def test_too_long_for_max_seq_len_is_refused_with_the_numbers():
    s = make(max_seq_len=100)
    with pytest.raises(RequestTooLarge) as e:
        s.add(req("x", range(90), max_new=20))
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for needle in ("110", "prompt 90", "max_new_tokens 20", "max_seq_len is 100",
                   "max_new_tokens to 10", "--max-seq-len"):
        assert needle in msg, (needle, msg)
    assert s.num_waiting == 0
    s.add(req("ok", range(90), max_new=10))  # exactly max_seq_len fits


def test_more_blocks_than_the_pool_is_refused_with_the_numbers():
    s = make(num_blocks=9, block_size=4, max_seq_len=1000)  # 8 usable blocks: 32 tokens
    with pytest.raises(RequestTooLarge) as e:
        s.add(req("x", range(30), max_new=4))  # 33 cached tokens: 9 blocks
    msg = str(e.value)
    for needle in ("9 KV blocks", "33 cached tokens", "only 8 usable blocks", "32 tokens",
                   "more memory"):
        assert needle in msg, (needle, msg)
    s.add(req("ok", range(30), max_new=3))  # 32 cached tokens: exactly the pool


def test_zero_new_tokens_finishes_at_once():
    s = make()
    r = req("z", [1, 2], max_new=0)
    s.add(r)
    assert r.finish_reason == "length" and not s.has_unfinished


# ---- prefix cache ---------------------------------------------------------------------
def test_shared_system_prompt_is_computed_once():
    s = make(num_blocks=32, block_size=4, max_batch_tokens=64)
    system = list(range(100, 112))  # 3 full blocks
    a = req("a", system + [1, 2, 3], max_new=2)
    s.add(a)
    assert shape(s.schedule()) == [("a", 0, 15, True)]
    s2 = make(num_blocks=32, block_size=4)
    a = req("a", system + [1, 2, 3], max_new=2)
    s2.add(a)
    run_step(s2)
    b = req("b", system + [7, 8, 9, 10, 11], max_new=2)
    s2.add(b)
    step = s2.schedule()
    assert shape(step) == [("a", 15, 1, True), ("b", 12, 5, True)]
    assert b.block_ids[:3] == a.block_ids[:3]
    assert (a.num_cached_prompt, b.num_cached_prompt) == (0, 12)
    s2.update(step, sampled_for(step))
    while s2.has_unfinished:
        run_step(s2)
    assert b.output_ids == expected_outputs(system + [7, 8, 9, 10, 11], 2)


def test_cached_prefix_survives_its_request_and_is_evicted_lru():
    s = make(num_blocks=9, block_size=4, max_batch_tokens=64, max_seq_len=64)  # 8 usable
    for rid, base in (("old", 100), ("new", 200)):
        s.add(req(rid, range(base, base + 9), max_new=1))  # 2 full blocks cached each
        run_step(s)
        assert not s.has_unfinished
    assert s.blocks_used == 0 and s.pool.num_cached == 4
    # a 21-token prompt needs 6 blocks: 4 clean ones, then the least recently freed
    # cached ones ("old", tail first)
    s.add(req("filler", range(500, 521), max_new=1))
    run_step(s)
    hit_old = req("old2", range(100, 109), max_new=1)
    hit_new = req("new2", range(200, 209), max_new=1)
    s.add(hit_new)
    run_step(s)
    s.add(hit_old)
    run_step(s)
    assert (hit_old.num_cached_prompt, hit_new.num_cached_prompt) == (0, 8)


# ---- cancellation and finish ------------------------------------------------------------
def test_cancel_frees_blocks_at_once_running_waiting_and_in_flight():
    s = make(num_blocks=16, block_size=4, max_batch=1)
    a, b = req("a", range(1, 10), max_new=8), req("b", range(20, 30), max_new=8)
    s.add(a)
    s.add(b)
    run_step(s)
    used = s.blocks_used
    assert used == 3 and s.num_waiting == 1
    assert s.cancel("b") and b.finish_reason == "cancelled" and s.num_waiting == 0
    step = s.schedule()  # a's decode in flight
    assert s.cancel("a")
    assert s.blocks_used == 0 and a.block_ids == [] and s.num_running == 0
    assert a.status is RequestStatus.FINISHED and a.finish_reason == "cancelled"
    s.update(step, sampled_for(step))  # the late result is ignored
    assert len(a.output_ids) == 1
    assert not s.cancel("a") and not s.cancel("nobody")


def test_finish_stop_frees_blocks_and_overrides_length_on_the_last_token():
    s = make()
    a, b = req("a", range(1, 6), max_new=10), req("b", range(7, 12), max_new=1)
    s.add(a)
    s.add(b)
    finished = s.update(step := s.schedule(), sampled_for(step))
    assert finished == [b] and b.finish_reason == "length"
    assert s.finish("b", "stop") and b.finish_reason == "stop"  # EOS as the last token
    assert s.finish("a", "stop") and a.finish_reason == "stop" and s.blocks_used == 0
    assert not s.finish("a", "stop")
    with pytest.raises(ValueError):
        s.finish("a", "bored")


def test_schedule_twice_before_update_never_schedules_a_request_twice():
    s = make()
    for i in range(3):
        s.add(req(f"r{i}", range(10 * i + 1, 10 * i + 5), max_new=4))
    first = s.schedule()
    second = s.schedule()
    assert len(first.chunks) == 3 and second.chunks == []
    s.update(first, sampled_for(first))
    assert len(s.schedule().chunks) == 3


def test_max_seqs_splits_the_running_requests_into_groups_that_take_turns():
    """A pipeline asks for a share of max_batch per step: each step takes the earliest
    requests not in flight, so the groups alternate, one per stage."""
    s = make(max_batch=5)
    for i in range(5):
        s.add(req(f"r{i}", range(10 * i + 1, 10 * i + 4), max_new=4))
    steps = [s.schedule(max_seqs=2) for _ in range(4)]
    ids = [[c.request.id for c in st.chunks] for st in steps]
    assert ids == [["r0", "r1"], ["r2", "r3"], ["r4"], []]
    s.update(steps[0], sampled_for(steps[0]))
    assert [c.request.id for c in s.schedule(max_seqs=2).chunks] == ["r0", "r1"]


def test_requeue_all_replays_running_requests_first_and_forgets_the_cache():
    """After a lost KV cache: the running requests wait again ahead of the queue, in
    admission order, with their outputs; nothing is held or cached; they recompute."""
    s = make(max_batch=2)
    for i in range(3):
        s.add(req(f"r{i}", range(10 * i + 1, 10 * i + 9), max_new=6))
    for _ in range(3):
        run_step(s)
    outputs = {r.id: list(r.output_ids) for r in s.running}
    assert sorted(outputs) == ["r0", "r1"] and all(outputs.values())
    with pytest.raises(RuntimeError, match="in flight"):
        s.schedule()
        s.requeue_all()
    s = make(max_batch=2)
    for i in range(3):
        s.add(req(f"r{i}", range(10 * i + 1, 10 * i + 9), max_new=6))
    for _ in range(3):
        run_step(s)
    assert s.requeue_all() == 2
    assert [r.id for r in s.waiting] == ["r0", "r1", "r2"] and not s.running
    assert s.blocks_used == 0 and s.pool.num_cached == 0
    assert all(r.num_computed == 0 for r in s.waiting)
    first = s.schedule()  # r0 and r1 recompute prompt + outputs from scratch
    assert [(c.request.id, c.start, c.num_tokens) for c in first.chunks] == \
        [(rid, 0, 8 + len(outputs[rid])) for rid in ("r0", "r1")]


# ---- randomized simulation ------------------------------------------------------------
def check_invariants(s, live, max_batch, max_batch_tokens, step, busy):
    pool = s.pool
    holders = defaultdict(list)
    for r in live:
        if r.status is not RequestStatus.RUNNING:
            assert r.block_ids == [], r.id  # waiting and finished requests hold nothing
        for b in r.block_ids:
            holders[b].append(r)
    for b in range(pool.num_blocks):
        n = len(holders.get(b, ()))
        assert pool.ref_count(b) == n, b  # ref counts equal references
        if n > 1:
            assert pool.is_cached(b), b  # shared only through the prefix cache
    assert NULL_BLOCK not in holders
    free = pool._clean + list(pool._evictable)
    assert len(set(free)) == len(free) == pool.num_free
    assert not set(free) & set(holders)  # every referenced block is allocated
    assert pool.num_used == len(holders)
    assert s.num_running <= max_batch and step.num_tokens <= max_batch_tokens
    for r in s.running:
        assert len(r.block_ids) * pool.block_size >= r.num_computed
    for c in step.chunks:
        r = c.request
        assert len(r.block_ids) * pool.block_size >= c.end
        if c.pending:  # its token is the one the request's step in flight samples
            assert c.sample and c.num_tokens == 1 and c.end == r.num_tokens + 1
        else:
            assert c.sample == (c.end == r.num_tokens)
    for r in s.running:  # decodes never stall: unscheduled only when out of blocks
        if r.num_tokens - r.num_computed == 1 and r not in busy:
            assert r.num_tokens > len(r.block_ids) * pool.block_size, r.id


@pytest.mark.parametrize("depth,prefix_caching,seed,ahead", [
    (1, True, 0, False), (1, False, 1, False), (2, True, 2, False), (3, True, 3, False),
    (1, True, 4, False), (2, True, 5, True), (2, False, 6, True), (3, True, 7, True)])
def test_random_simulation(depth, prefix_caching, seed, ahead):
    rng = random.Random(seed)
    bs, max_batch, budget = 4, 5, 12
    ticks = iter(range(10**9))
    s = Scheduler(BlockPool(13, bs, prefix_caching), max_batch, budget, max_seq_len=40,
                  clock=lambda: float(next(ticks)))
    systems = [[rng.randrange(1, 50) for _ in range(rng.choice([4, 8, 11]))] for _ in range(3)]
    pending = []
    for i in range(80):
        prompt = rng.choice(systems + [[]]) + [rng.randrange(1, 50)
                                              for _ in range(rng.randrange(1, 14))]
        max_new = rng.randrange(1, 40 - len(prompt) + 1)
        pending.append(req(f"q{i}", prompt, max_new))
    everyone = list(pending)
    chunks_of = defaultdict(list)  # request -> chunks since its last (re)admission
    in_flight = deque()
    ahead_chunks = 0  # chunks scheduled ahead
    for _ in range(5000):
        if not pending and not s.has_unfinished and not in_flight:
            break
        while pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        if rng.random() < 0.03 and s.has_unfinished:  # cancel anyone, even in flight
            victim = rng.choice([r for r in everyone if r.status is not RequestStatus.FINISHED
                                 and r.arrival_s is not None])
            s.cancel(victim.id)
        step = s.schedule(ahead=ahead and bool(in_flight))
        ahead_chunks += sum(c.pending for c in step.chunks)
        for r in step.preempted:
            chunks_of[r].append("preempted")
        for c in step.chunks:
            chunks_of[c.request].append(c)
        busy = {c.request for st in [*in_flight, step] for c in st.chunks}
        check_invariants(s, everyone, max_batch, budget, step, busy)
        if step:
            in_flight.append(step)
        if in_flight and (len(in_flight) >= depth or not step):
            done = in_flight.popleft()
            s.update(done, sampled_for(done))
            for c in done.chunks:  # the engine's stop check: EOS is any token = 7 mod 50
                r = c.request
                if c.sample and not r.finished and r.output_ids[-1] % 50 == 7:
                    s.finish(r.id, "stop")
    else:
        pytest.fail(f"the simulation did not finish: running {s.running}, waiting "
                    f"{list(s.waiting)}, pending {len(pending)}, in flight {len(in_flight)}")
    for r in everyone:
        assert r.status is RequestStatus.FINISHED and r.block_ids == []
        full = expected_outputs(r.prompt_ids, r.params.max_new_tokens)
        assert r.output_ids == full[:len(r.output_ids)]  # equal to the request run alone
        if r.finish_reason == "length":
            assert r.output_ids == full
        check_coverage(r, chunks_of[r], bs)
    assert s.blocks_used == 0 and s.num_running == s.num_waiting == 0
    reasons = {r.finish_reason for r in everyone}
    assert reasons == {"length", "stop", "cancelled"}
    assert (ahead_chunks > 100) == ahead, ahead_chunks
    # first come, first served: first admissions in arrival order
    first = sorted((r for r in everyone if r.first_scheduled_s is not None),
                   key=lambda r: r.first_scheduled_s)
    assert [int(r.id[1:]) for r in first] == sorted(int(r.id[1:]) for r in first)
    assert s.preemptions > 10


def check_coverage(r, events, bs):
    """Each (re)computation covers the tokens once, contiguously, from a block boundary
    (the cached prefix); a finished-by-length request's last one ends at its last fed
    token."""
    runs, cur = [], []
    for e in events:
        if e == "preempted":
            runs.append(cur)
            cur = []
        else:
            cur.append(e)
    runs.append(cur)
    for run in runs:
        if not run:
            continue
        assert run[0].start % bs == 0
        for prev, nxt in zip(run, run[1:]):
            assert nxt.start == prev.end, r.id
    last = [c for c in runs[-1]]
    if r.finish_reason == "length":
        assert last[-1].end == r.num_tokens - 1
