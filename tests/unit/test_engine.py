"""The engine loop: every request's tokens equal that request run alone, whatever arrives
when, however few sequences may run at once, when blocks run out, with shared prefixes."""

import itertools

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.engine import LLMEngine
from llamadist.engine.executor import LocalExecutor
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint

MAX_SEQ = 96
PROMPTS = ["The quick brown fox", "1 2 3 4 5 6 7", "def main():", "Once upon a time, in a",
           "hello", "A B C D E F G H I J K L"]
SYSTEM = "You are a helpful assistant who answers briefly and well. "


def engine_for(path, stages: int = 1, max_batch: int = 3, num_blocks: int | None = None,
               block_size: int = 4, budget: int | None = None,
               ahead: bool = False) -> LLMEngine:
    """``ahead``: decodes scheduled before the step in flight is collected (what the
    engine does on GPUs), forced on the CPU."""
    ckpt = open_checkpoint(path)
    n = ckpt.config.num_layers
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=max_batch, dtype="float32",
                            max_batch_tokens=budget or 2048)
    model = Engine.build(ckpt, [range(a, b) for a, b in zip(cuts, cuts[1:])], ["cpu"] * stages,
                         torch.float32, 1, MAX_SEQ, runtime=runtime)
    return LLMEngine(LocalExecutor(model, ahead=ahead), ckpt.tokenizer(), runtime,
                     num_blocks=num_blocks, block_size=block_size)


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each prompt's tokens through the static one-request path (the reference)."""
    ckpt = open_checkpoint(tiny_model)
    tok = ckpt.tokenizer()
    model = Engine.load(str(tiny_model), max_seq_len=MAX_SEQ)

    def run(prompt: str, params: SamplingParams) -> list[int]:
        return generate(model, tok, [tok.encode(prompt)], params)[0].token_ids
    return run


def drive(engine: LLMEngine, arrivals: dict[int, list[tuple[str, str, SamplingParams]]]
          ) -> dict[str, list[int]]:
    """Add requests at the given step numbers, run until all finish; tokens per id."""
    tok = engine.tokenizer
    step, out = 0, {}
    while arrivals or engine.has_unfinished:
        for rid, text, params in arrivals.pop(step, []):
            out[rid] = engine.add_request(tok.encode(text), params, rid)
        engine.step()
        step += 1
        assert step < 2000, "the engine stopped making progress"
    return {rid: r.output_ids for rid, r in out.items()}


GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("ahead", [False, True])
def test_staggered_arrivals_give_each_request_its_tokens_alone(tiny_model, alone, ahead):
    engine = engine_for(tiny_model, ahead=ahead, max_batch=2)
    arrivals = {0: [("a", PROMPTS[0], GREEDY), ("b", PROMPTS[1], GREEDY)],
                3: [("c", PROMPTS[2], GREEDY)], 4: [("d", PROMPTS[3], GREEDY)],
                9: [("e", PROMPTS[4], GREEDY), ("f", PROMPTS[5], GREEDY)]}
    texts = {rid: t for v in arrivals.values() for rid, t, _ in v}
    pending, schedule = [], engine.scheduler.schedule

    def counted(*args, **kw):  # how many decodes went ahead of their step in flight
        step = schedule(*args, **kw)
        pending.extend(c for c in step.chunks if c.pending)
        return step
    engine.scheduler.schedule = counted
    got = drive(engine, arrivals)
    assert bool(pending) == ahead and (not ahead or len(pending) > 20)
    for rid, text in texts.items():
        assert got[rid] == alone(text, GREEDY), rid
    assert engine.gauges()["kv_blocks_used"] == 0  # every block released


def test_warmup_steps_leave_no_trace(tiny_model, alone):
    """The warm-up's dummy decode steps (every bucket, rows on the null block, nothing
    sampled) change no request's tokens and hold no block."""
    engine = engine_for(tiny_model, max_batch=3)
    assert engine.warmup() == 0.0  # CPU only: nothing to capture
    assert engine.warmup(force=True) > 0
    assert engine.gauges()["kv_blocks_used"] == 0 and engine.stats.steps == 0
    got = drive(engine, {0: [("a", PROMPTS[0], GREEDY), ("b", PROMPTS[1], GREEDY)]})
    assert got == {"a": alone(PROMPTS[0], GREEDY), "b": alone(PROMPTS[1], GREEDY)}


def test_warmup_of_given_executors_only(tiny_model):
    """A restarted replica's executor is warmed up before it joins (cli.front): every
    bucket's step goes through it, none through the engine's own, and the engine's
    warm-up time does not count it."""
    engine = engine_for(tiny_model, max_batch=3)
    own = engine.replicas[0].executor

    class Recording:
        devices = ["cuda:0"]  # what warm-up filters on

        def __init__(self):
            self.sizes: list[int] = []
            self.idled = False  # told nothing is in flight once the steps are collected

        def launch(self, work):
            self.sizes.append(len(work.seqs))

        def collect(self):
            return None

        def idle(self):
            self.idled = True
    fresh = Recording()
    own_launch = own.launch
    own.launch = lambda *a, **k: pytest.fail("the engine's executor was warmed up")
    try:
        assert engine.warmup(executors=[fresh]) >= 0.0
    finally:
        own.launch = own_launch
    assert fresh.sizes == [1, 2, 3] and fresh.idled and engine.warmup_s == 0.0
    assert engine.warmup(executors=[Recording()]) >= 0.0 and engine.stats.steps == 0


@pytest.mark.parametrize("ahead", [False, True])
def test_preemption_under_a_small_block_budget(tiny_model, alone, ahead):
    # 12 usable blocks of 4 slots: three 10-token prompts growing to 30 tokens cannot all
    # stay resident, so requests are preempted and recomputed.
    engine = engine_for(tiny_model, ahead=ahead, max_batch=3, num_blocks=13, budget=16)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    arrivals = {0: [(str(i), PROMPTS[i], params) for i in range(3)]}
    got = drive(engine, arrivals)
    assert engine.scheduler.preemptions > 0
    for i in range(3):
        assert got[str(i)] == alone(PROMPTS[i], params)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_every_stage_count_in_one_process(tiny_model, alone, stages):
    """1, 2 and 4 stages (3 is below) in one process, staggered and capped at 2 at once."""
    engine = engine_for(tiny_model, stages=stages, max_batch=2, budget=16)
    got = drive(engine, {0: [("a", PROMPTS[0], GREEDY), ("b", PROMPTS[1], GREEDY)],
                         2: [("c", PROMPTS[2], GREEDY)]})
    assert got == {rid: alone(PROMPTS[i], GREEDY) for i, rid in enumerate("abc")}


@pytest.mark.parametrize("ahead", [False, True])
def test_chunked_prefill_over_stages_and_shared_prefix(tiny_model, alone, ahead):
    engine = engine_for(tiny_model, ahead=ahead, stages=3, max_batch=4, budget=8)
    prompts = [SYSTEM + p for p in PROMPTS[:4]]
    got = drive(engine, {0: [("0", prompts[0], GREEDY)],
                         2: [(str(i), prompts[i], GREEDY) for i in range(1, 4)]})
    for i, p in enumerate(prompts):
        assert got[str(i)] == alone(p, GREEDY)
    assert engine.stats.cached_prompt_tokens > 0  # later requests reused the system prompt


def test_seeded_sampling_equals_alone(tiny_model, alone):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=1234,
                            ignore_eos=True)
    engine = engine_for(tiny_model, max_batch=2, budget=6)
    got = drive(engine, {0: [(str(i), PROMPTS[i], params) for i in range(2)],
                         1: [(str(i), PROMPTS[i], params) for i in range(2, 5)]})
    for i in range(5):
        assert got[str(i)] == alone(PROMPTS[i], params)


@pytest.mark.parametrize("ahead", [False, True])
def test_cancel_frees_blocks_and_others_continue(tiny_model, alone, ahead):
    engine = engine_for(tiny_model, ahead=ahead, max_batch=2)
    tok = engine.tokenizer
    a = engine.add_request(tok.encode(PROMPTS[0]), GREEDY, "a")
    b = engine.add_request(tok.encode(PROMPTS[1]), GREEDY, "b")
    for _ in range(3):
        engine.step()
    used = engine.gauges()["kv_blocks_used"]
    assert engine.cancel("a") and a.finish_reason == "cancelled"
    assert engine.gauges()["kv_blocks_used"] < used
    while engine.has_unfinished:
        engine.step()
    assert b.output_ids == alone(PROMPTS[1], GREEDY)
    assert not engine.cancel("a")


@pytest.mark.parametrize("ahead", [False, True])
def test_stop_string_and_text(tiny_model, alone, ahead):
    full = alone(PROMPTS[0], GREEDY)
    text = open_checkpoint(tiny_model).tokenizer().decode(full)
    # 3 printable characters from the middle (fails, rather than skips, if there are none)
    mid = next(i for i in range(len(text) // 2, len(text) - 2)
               if text[i:i + 3].strip() and text[i:i + 3].isprintable())
    stop = text[mid:mid + 3]
    engine = engine_for(tiny_model, ahead=ahead)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,))
    req = engine.add_request(engine.tokenizer.encode(PROMPTS[0]), params, "s")
    streamed = ""
    while engine.has_unfinished:
        for out in engine.step():
            streamed += out.text
    assert req.finish_reason == "stop"
    assert streamed == req.text == text[:text.find(stop)]


@pytest.mark.parametrize("ahead", [False, True])
def test_interleaved_submits_keep_their_outputs_and_cleanup(tiny_model, alone, ahead):
    """Two submit() iterators consumed in turn: each gets all of its own outputs (whoever
    stepped); closing one early cancels its unfinished request and frees its blocks."""
    engine = engine_for(tiny_model, ahead=ahead, max_batch=4)
    tok = engine.tokenizer
    (a,), it_a = engine.submit([tok.encode(PROMPTS[0])], GREEDY)
    (b,), it_b = engine.submit([tok.encode(PROMPTS[1])], GREEDY)
    seen_a, seen_b = [], []
    for step_a, step_b in itertools.zip_longest(it_a, it_b, fillvalue=[]):
        seen_a += [o.token_id for _, o in step_a]
        seen_b += [o.token_id for _, o in step_b]
    assert seen_a == a.output_ids == alone(PROMPTS[0], GREEDY)
    assert seen_b == b.output_ids == alone(PROMPTS[1], GREEDY)
    (c,), it_c = engine.submit([tok.encode(PROMPTS[2])], GREEDY)
    next(it_c)
    it_c.close()
    assert c.finish_reason == "cancelled" and engine.gauges()["kv_blocks_used"] == 0


@pytest.mark.parametrize("ahead", [False, True])
def test_eos_on_the_last_allowed_token_is_stop(tiny_model, alone, ahead):
    """A token that is EOS and also the max_new_tokens-th: "stop", and not in the text."""
    ref = alone(PROMPTS[3], GREEDY)
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])  # its first appearance
    engine = engine_for(tiny_model, ahead=ahead)
    engine.eos = {ref[k]}
    req = engine.add_request(engine.tokenizer.encode(PROMPTS[3]),
                             SamplingParams(max_new_tokens=k + 1), "e")
    while engine.has_unfinished:
        engine.step()
    assert req.finish_reason == "stop" and req.output_ids == ref[:k]


@pytest.mark.parametrize("ahead", [False, True])
def test_seeded_sampling_survives_preemption(tiny_model, alone, ahead):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    engine = engine_for(tiny_model, ahead=ahead, max_batch=3, num_blocks=13, budget=16)
    got = drive(engine, {0: [(str(i), PROMPTS[i], params) for i in range(3)]})
    assert engine.scheduler.preemptions > 0
    for i in range(3):
        assert got[str(i)] == alone(PROMPTS[i], params)


def test_a_penalised_request_beside_a_plain_one(tiny_model, alone):
    """Only the row that asks for a repetition penalty gets it, as when alone."""
    pen = SamplingParams(max_new_tokens=12, repetition_penalty=3.0, ignore_eos=True)
    engine = engine_for(tiny_model, max_batch=2)
    got = drive(engine, {0: [("p", PROMPTS[0], pen), ("g", PROMPTS[1], GREEDY)]})
    assert got["p"] == alone(PROMPTS[0], pen) != alone(PROMPTS[0], GREEDY)
    assert got["g"] == alone(PROMPTS[1], GREEDY)


def test_a_request_too_large_is_refused_with_numbers(tiny_model):
    engine = engine_for(tiny_model)
    with pytest.raises(ValueError, match=str(MAX_SEQ)):
        engine.add_request([1] * 90, SamplingParams(max_new_tokens=20))


def test_a_token_id_outside_the_vocabulary_is_refused(tiny_model):
    engine = engine_for(tiny_model)
    vocab = engine.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside"):
            engine.add_request([1, bad, 2], SamplingParams(max_new_tokens=2))
    assert not engine.has_unfinished  # nothing was queued


def test_cli_prompts_file_with_max_batch_each_equal_alone(smollm2, tmp_path, capsys):
    """Eight prompts through `generate --max-batch 3`: at most three run at once, the
    others join as earlier ones finish, and each gets the tokens it gets alone."""
    import json

    from llamadist.cli import main
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):",
               "The three primary colors are", "Once upon a time", "1, 2, 3, 4,",
               "My favourite food is", "The sun rises in the"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    common = ["--max-new-tokens", "8", "--json"]
    assert main(["generate", str(smollm2), "--prompts-file", str(f), "--max-batch", "3",
                 *common]) == 0
    together = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    # the reference: each prompt alone through the static path (another implementation)
    static = Engine.load(str(smollm2), max_seq_len=256)
    tok = open_checkpoint(smollm2).tokenizer()
    alone = [generate(static, tok, [tok.encode(p)], SamplingParams(max_new_tokens=8))[0].token_ids
             for p in prompts]
    assert together == alone and all(alone)


class DiesAt:
    """An executor that fails at its ``at``-th launch, as a lost worker would."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.launches = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, work):
        self.launches += 1
        if self.launches == self.at:
            raise RuntimeError("lost the worker")
        self.inner.launch(work)


@pytest.mark.parametrize("ahead", [False, True])
def test_a_lost_executor_is_replaced_and_its_requests_replay(tiny_model, alone, ahead):
    """The executor dies mid-generation; a new one takes its place, every request is
    recomputed from its prompt and the tokens it already streamed, and each ends with the
    tokens and text of a run without the failure (greedy and seeded)."""
    engine = engine_for(tiny_model, ahead=ahead, max_batch=2)
    engine.replicas[0].executor = DiesAt(engine.replicas[0].executor, at=7)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    tok = engine.tokenizer
    asked = {"a": (PROMPTS[0], GREEDY), "b": (PROMPTS[1], seeded), "c": (PROMPTS[2], GREEDY)}
    reqs = {rid: engine.add_request(tok.encode(p), sp, rid) for rid, (p, sp) in asked.items()}
    streamed = {rid: [] for rid in asked}
    replayed = None
    while engine.has_unfinished:
        try:
            outs = engine.step()
        except RuntimeError as e:
            assert "lost the worker" in str(e) and replayed is None
            fresh = engine_for(tiny_model).replicas[0].executor.model
            replayed = engine.replace_executor(0, LocalExecutor(fresh, ahead=ahead))
            continue
        for out in outs:
            streamed[out.request_id].append(out.token_id)
    assert replayed == 2 and engine.stats.recoveries == 1  # two were running
    for rid, (prompt, params) in asked.items():
        want = alone(prompt, params)
        assert reqs[rid].output_ids == want == streamed[rid], rid  # nothing lost or repeated
        assert reqs[rid].text == tok.decode(want)
    assert engine.gauges()["kv_blocks_used"] == 0


class InterruptedCollect:
    """An executor whose ``at``-th collect is interrupted (Ctrl-C while waiting)."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.collects = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def collect(self):
        self.collects += 1
        if self.collects == self.at:
            raise KeyboardInterrupt
        return self.inner.collect()


def test_an_interrupted_step_with_one_scheduled_ahead_resumes_exactly(tiny_model, alone):
    """Two steps in flight (one scheduled ahead), the wait for the first interrupted: both
    are aborted, the executor forgets their results, and stepping on gives every request
    its tokens alone (the next collect is not handed a stale step's tokens)."""
    engine = engine_for(tiny_model, ahead=True, max_batch=2)
    engine.replicas[0].executor = InterruptedCollect(engine.replicas[0].executor, at=5)
    tok = engine.tokenizer
    reqs = [engine.add_request(tok.encode(PROMPTS[i]), GREEDY, str(i)) for i in range(2)]
    interrupted = False
    while engine.has_unfinished:
        try:
            engine.step()
        except KeyboardInterrupt:
            interrupted = True
            assert not engine.replicas[0].in_flight
    assert interrupted
    for i, r in enumerate(reqs):
        assert r.output_ids == alone(PROMPTS[i], GREEDY)


def test_a_lost_replica_s_requests_move_to_the_live_one(tiny_model, alone):
    """Two data-parallel replicas; one dies mid-generation: its requests (running and
    waiting) move to the other at once and end as without the failure."""
    ckpt = open_checkpoint(tiny_model)
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=2, dtype="float32",
                            max_batch_tokens=2048)

    def replica():
        model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32,
                             1, MAX_SEQ, runtime=runtime)
        return LocalExecutor(model)
    engine = LLMEngine([replica(), DiesAt(replica(), at=4)], ckpt.tokenizer(), runtime,
                       block_size=4)
    tok = engine.tokenizer
    reqs = [engine.add_request(tok.encode(PROMPTS[i]), GREEDY, str(i)) for i in range(5)]
    assert {id(engine._where[r.id]) for r in reqs} == {id(r) for r in engine.replicas}
    moved = None
    while engine.has_unfinished:
        try:
            engine.step()
        except RuntimeError as e:
            assert "lost the worker" in str(e) and moved is None
            moved = engine.fail_over(1)
    assert moved >= 2 and len(engine.replicas) == 1
    for i, r in enumerate(reqs):
        assert r.output_ids == alone(PROMPTS[i], GREEDY), i
    assert engine.gauges()["kv_blocks_used"] == 0 and engine.gauges()["waiting"] == 0


class Numbered:
    """A local executor with the replica number a front's RankExecutor has."""

    def __init__(self, inner, replica: int):
        self.inner, self.replica = inner, replica

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_drained_replica_hands_over_its_requests_without_losing_a_token(tiny_model, alone):
    """Drain replica 1 (a step in flight, the next scheduled ahead) mid-generation: it launches
    no new step, its requests move to replica 0 once its steps are collected, every
    request's tokens equal its run alone; undrained, it takes new requests again."""
    ckpt = open_checkpoint(tiny_model)
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=2, dtype="float32",
                            max_batch_tokens=2048)

    def replica(k: int, ahead: bool):
        model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32,
                             1, MAX_SEQ, runtime=runtime)
        return Numbered(LocalExecutor(model, ahead=ahead), k)
    engine = LLMEngine([replica(0, False), replica(1, True)], ckpt.tokenizer(), runtime, block_size=4)
    tok = engine.tokenizer
    reqs = [engine.add_request(tok.encode(PROMPTS[i]), GREEDY, str(i)) for i in range(5)]
    for _ in range(6):
        engine.step()
    drained = engine.replicas[1]
    assert drained.in_flight and drained.scheduler.num_running  # mid-generation
    with pytest.raises(LookupError):
        engine.drain(7)
    engine.drain(1)
    with pytest.raises(RuntimeError, match="only one serving"):
        engine.drain(0)
    assert engine.replica_states()[1]["state"] == "draining"
    steps = drained.steps
    while engine.has_unfinished:
        engine.step()
    assert drained.steps == steps and engine.replica_states()[1] == {"state": "drained",
                                                                       "steps": steps}
    for i, r in enumerate(reqs):
        assert r.output_ids == alone(PROMPTS[i], GREEDY), i
    late = engine.add_request(tok.encode(PROMPTS[5]), GREEDY, "late")
    assert engine._where["late"] is engine.replicas[0]  # drained: no new request
    engine.undrain(1)
    again = engine.add_request(tok.encode(PROMPTS[4]), GREEDY, "again")
    assert engine._where["again"] is drained
    while engine.has_unfinished:
        engine.step()
    assert late.output_ids == alone(PROMPTS[5], GREEDY) and drained.steps > steps
    assert again.output_ids == alone(PROMPTS[4], GREEDY)
    assert engine.gauges()["kv_blocks_used"] == 0


def _fails(*args):
    raise RuntimeError("the transfer broke")


@pytest.mark.parametrize("kv", ["migrate", "replay", "export-fails", "import-fails",
                                "other-layout"])
def test_a_drained_replica_s_requests_migrate_with_their_kv(tiny_model, alone, kv):
    """Drain replica 1 mid-generation: with kv=migrate its running requests take their KV
    blocks to replica 0 and decode on there with no prompt token computed again; with
    kv=replay, when the export or the import fails, or when replica 0 splits its layers
    otherwise (a re-planned replica), they are recomputed. Either way every request's
    tokens equal its run alone."""
    ckpt = open_checkpoint(tiny_model)
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=4, dtype="float32",
                            max_batch_tokens=2048)

    def replica(k: int):
        model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32,
                             1, MAX_SEQ, runtime=runtime)
        return Numbered(LocalExecutor(model), k)
    engine = LLMEngine([replica(0), replica(1)], ckpt.tokenizer(), runtime, block_size=4)
    tok = engine.tokenizer
    reqs = [engine.add_request(tok.encode(PROMPTS[i]), GREEDY, str(i)) for i in range(4)]
    for _ in range(5):
        engine.step()
    drained = engine.replicas[1]
    assert drained.scheduler.num_running >= 1  # mid-generation
    with pytest.raises(ValueError, match="kv must be"):
        engine.drain(1, kv="teleport")
    if kv == "export-fails":
        drained.executor.export_kv = _fails
    if kv == "import-fails":
        engine.replicas[0].executor.import_kv = _fails
    tried = []
    if kv == "other-layout":  # no export is even tried: it could not be imported
        drained.executor.kv_layout = ((0, 1), (1, 2))
        drained.executor.export_kv = lambda *a: tried.append(a) or _fails()
    engine.drain(1, kv="replay" if kv == "replay" else "migrate")
    while drained.in_flight:  # its step in flight is collected before anything moves
        engine.step()
    running = drained.scheduler.num_running
    computed = engine.stats.prompt_tokens
    engine.poll()  # the move
    st = engine.stats
    if kv == "migrate":
        assert (st.migrated_requests, st.drain_replayed) == (running, 0)
        assert st.migrated_blocks >= running and st.migrated_bytes > 0
        assert not drained.scheduler.has_unfinished
    else:
        assert (st.migrated_requests, st.drain_replayed) == (0, running)
    assert not tried
    while engine.has_unfinished:
        engine.step()
    # migrated: no prompt token was computed again (a replay prefills prompt + outputs)
    assert (engine.stats.prompt_tokens == computed) == (kv == "migrate")
    for i, r in enumerate(reqs):
        assert r.output_ids == alone(PROMPTS[i], GREEDY), i
    assert engine.gauges()["kv_blocks_used"] == 0
