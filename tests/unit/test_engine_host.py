"""The engine's host path without a model (issue 13): a scripted executor gives each
request fixed tokens, so the engine's own work is checked: text made once at the end for
requests nobody streams (stream_text=False) equals the streamed text, stop strings still
cut it at the same place, the step's columns equal those of the per-sequence SeqWorks,
and a sequence holds exactly the blocks its scheduled tokens need."""

import random

import numpy as np
import pytest
import torch

from llamadist.config import RuntimeConfig, named_shape
from llamadist.engine.engine import LLMEngine
from llamadist.engine.kv_blocks import cdiv
from llamadist.generation.generate import _held_back
from llamadist.generation.sampling import SamplingParams
from llamadist.generation.tokenizer import load_hf_tokenizer
from llamadist.runtime.step_columns import StepColumns
from llamadist.runtime.step_work import SampleSpec, SeqWork, sample_step
from tests.tiny import make_tokenizer

TEXTS = ["Hello world, this is a test of the engine.",
         "café naïve 日本語 — ünïcödé bytes split over tokens 🙂 and more text after it",
         "one two three STOP four five six", "x = [1, 2, 3]\nprint(x)  # STOP here? no: ST"]


class ScriptedExecutor:
    """The executor interface without a model: the k-th token of request ``rid`` is
    ``script[rid][k]`` (its position among the request's outputs, SampleSpec.step)."""

    depth, blocking, kv_path, kv_dtype = 1, True, None, "float32"

    def __init__(self, script: dict[str, list[int]], ahead: bool, sampler: bool = False):
        self.config = named_shape("smollm2-135m")
        self.devices, self.ahead, self.script = ["cpu"], ahead, script
        self.sampler = sampler  # through sample_step: logits that put the scripted token first
        self._out: list[list[int]] = []

    def init_paged(self, num_blocks, block_size):
        pass

    def launch(self, work):
        cols = work.columns
        if not cols.samples.any():
            self._out.append([])
            return
        tail = cols.tail()
        rows = np.flatnonzero(cols.samples).tolist()
        want = [self.script[tail.request_ids[i]][k] for i, k in zip(rows, tail.steps)]
        if self.sampler:
            logits = torch.zeros(cols.num_seqs + len(cols.score_ids), self.config.vocab_size)
            logits[rows, want] = 100.0
            want = sample_step(logits, work).tolist()
        self._out.append(want)

    def collect(self):
        return self._out.pop(0)

    def idle(self):
        pass

    def reset(self):
        self._out.clear()

    def close(self):
        pass


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_hf_tokenizer(folder)


def engine_of(tok, script, ahead=True, max_batch=4, block_size=4, num_blocks=None,
              sampler=False):
    runtime = RuntimeConfig(max_seq_len=160, max_batch=max_batch, max_batch_tokens=64)
    return LLMEngine(ScriptedExecutor(script, ahead, sampler), tok, runtime,
                     block_size=block_size, num_blocks=num_blocks)


def run(tok, params, stream_text, ahead=True, cancel_at=None, **kw):
    """Every TEXTS entry (four times over) as a request's scripted outputs; -> requests,
    outputs per id."""
    script = {f"r{i}": tok.encode((t + " ") * 4, add_special_tokens=False)
              for i, t in enumerate(TEXTS)}
    engine = engine_of(tok, script, ahead, **kw)
    reqs = [engine.add_request(tok.encode("a prompt of a few words"), params, rid,
                               stream_text=stream_text) for rid in script]
    outs: dict[str, list] = {rid: [] for rid in script}
    steps = 0
    while engine.has_unfinished:
        for o in engine.step():
            outs[o.request_id].append(o)
        steps += 1
        if steps == cancel_at:
            engine.cancel("r1")
    return reqs, outs


@pytest.mark.parametrize("ahead", [False, True])
def test_text_made_at_the_end_equals_the_streamed_text(tok, ahead):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    streamed, souts = run(tok, params, True, ahead)
    lazy, louts = run(tok, params, False, ahead)
    for s, z in zip(streamed, lazy):
        assert z.output_ids == s.output_ids and len(z.output_ids) == 40
        assert z.text == s.text == tok.decode(s.output_ids)
        assert "".join(o.text for o in souts[s.id]) == s.text
        # nobody streams it: every output but the last carries no text, the last all of it
        assert [o.text for o in louts[z.id][:-1]] == [""] * 39
        assert louts[z.id][-1].text == z.text and louts[z.id][-1].finished
        assert z.decoder is None and s.decoder is not None
        assert [o.token_id for o in louts[z.id]] == [o.token_id for o in souts[s.id]]


@pytest.mark.parametrize("ahead", [False, True])
def test_stop_strings_cut_where_they_did_without_a_stream(tok, ahead):
    params = SamplingParams(max_new_tokens=60, ignore_eos=True, stop=("STOP", "日本"))
    streamed, souts = run(tok, params, True, ahead)
    lazy, louts = run(tok, params, False, ahead)
    stopped = 0
    for i, (s, z) in enumerate(zip(streamed, lazy)):
        full = tok.decode(tok.encode((TEXTS[i] + " ") * 4, add_special_tokens=False)[:60])
        cuts = [full.find(x) for x in params.stop if x in full]
        want = full[:min(cuts)] if cuts else full
        assert s.text == z.text == want, i
        assert s.finish_reason == z.finish_reason == ("stop" if cuts else "length")
        assert z.output_ids == s.output_ids
        stopped += bool(cuts)
        for outs in (souts[s.id], louts[z.id]):  # text needed each step: streamed either way
            assert "".join(o.text for o in outs) == want
            assert "STOP" not in "".join(o.text for o in outs)
    assert stopped == 3  # (the last text's trailing "ST" is held back, then released)


def test_a_cancelled_request_keeps_its_text_so_far(tok):
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    streamed, _ = run(tok, params, True, cancel_at=8)
    lazy, _ = run(tok, params, False, cancel_at=8)
    s, z = streamed[1], lazy[1]
    assert s.finish_reason == z.finish_reason == "cancelled"
    assert 0 < len(z.output_ids) < 40 and z.output_ids == s.output_ids
    assert z.text == s.text and z.text == TEXTS[1][:len(z.text)] and len(z.text) > 5


def test_eos_ends_a_lazy_request_without_its_token(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    engine = engine_of(tok, {"a": ids[:5] + [eos] + ids[5:]})
    req = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=30), "a",
                             stream_text=False)
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert req.finish_reason == "stop" and req.output_ids == ids[:5]
    assert req.text == outs[-1].text == tok.decode(ids[:5])


def reference_seqs(engine, step, prev):
    """The step as SeqWork objects, as the engine built it before StepWork.of_rows."""
    prev_rows = {rid: i for i, rid in enumerate(prev.sampled_ids)} if prev else {}
    seqs = []
    for c in step.chunks:
        req = c.request
        spec = None
        if c.sample:
            seen = tuple(req.all_ids) if req.params.repetition_penalty != 1.0 else ()
            outs = tuple(req.output_ids) if req.params.counts_outputs else ()
            spec = SampleSpec(req.params, req.seed, len(req.output_ids) + c.pending, seen, outs)
        seqs.append(SeqWork(req.id, tuple(c.token_ids), tuple(req.block_ids), c.start, spec,
                            *engine._score(req, c.start, c.end),
                            prev_index=prev_rows[req.id] if c.pending else -1))
    return seqs


@pytest.mark.parametrize("ahead", [False, True])
def test_step_columns_equal_the_per_sequence_work(tok, ahead):
    """Prefill chunks, decodes, pending decodes, penalties, logprobs and prompt scores:
    the engine's columns are StepColumns.from_seqs of the SeqWorks it used to make, and
    every scheduled chunk's request holds exactly the blocks its tokens need."""
    rng = random.Random(3)
    script = {f"r{i}": [rng.randrange(3, 380) for _ in range(20)] for i in range(6)}
    engine = engine_of(tok, script, ahead, max_batch=4, block_size=4, sampler=True)
    kinds = [SamplingParams(max_new_tokens=12, ignore_eos=True),
             SamplingParams(max_new_tokens=9, ignore_eos=True, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=10, ignore_eos=True, presence_penalty=0.5,
                            logprobs=2),
             SamplingParams(max_new_tokens=7, ignore_eos=True, prompt_logprobs=1)]
    for i, rid in enumerate(script):
        prompt = [rng.randrange(3, 380) for _ in range(rng.randrange(3, 40))]
        engine.add_request(prompt, kinds[i % len(kinds)], rid)
    build, checked = engine._work, []

    def work(step, prev):
        got = build(step, prev)
        want = reference_seqs(engine, step, prev)
        cols, ref = got.columns, StepColumns.from_seqs(want, got.block_size)
        for name in ("token_ids", "starts", "query_lens", "block_start", "block_ids",
                     "prev_index", "samples", "logprobs", "score_top", "score_start",
                     "score_ids"):
            assert np.array_equal(getattr(cols, name), getattr(ref, name)), name
        assert cols.tail() == ref.tail()
        assert got.seqs == want and got.sampled_ids == [s.request_id for s in want
                                                        if s.sample is not None]
        for c in step.chunks:  # a new block exactly when a chunk crosses into one
            assert len(c.request.block_ids) == cdiv(c.end, 4)
        checked.append((len(want), sum(c.pending for c in step.chunks)))
        return got
    engine._work = work
    reqs = [engine.get(rid) for rid in script]
    while engine.has_unfinished:
        engine.step()
    for req in reqs:  # the sampler drew the scripted tokens; logprobs came back
        assert req.output_ids == script[req.id][:req.params.max_new_tokens]
        if req.params.prompt_logprobs is not None:
            assert len(req.prompt_logprobs) == len(req.prompt_ids)
            assert all(e is not None for e in req.prompt_logprobs[1:])
    assert sum(n for n, _ in checked) > 40
    assert bool(sum(p for _, p in checked)) == ahead
    assert engine.gauges()["kv_blocks_used"] == 0


def test_held_back_tail_equals_comparing_every_length():
    def reference(text, safe, stop):
        for k in range(min(len(stop) - 1, safe), 0, -1):
            if text[safe - k:safe] == stop[:k]:
                return safe - k
        return safe
    rng = random.Random(0)
    held = 0
    for _ in range(20000):
        text = "".join(rng.choice("ab<|") for _ in range(rng.randrange(0, 12)))
        stop = "".join(rng.choice("ab<|") for _ in range(rng.randrange(0, 6)))
        safe = rng.randrange(0, len(text) + 1)
        assert _held_back(text, safe, stop) == reference(text, safe, stop), (text, safe, stop)
        held += reference(text, safe, stop) != safe
    assert held > 1000  # the cases held something back


def test_llm_run_without_a_callback_detokenizes_at_the_end(tiny_model):
    from llamadist.api import LLM
    llm = LLM(str(tiny_model), max_batch=2, max_seq_len=64)
    prompts = [llm.encode("The quick brown fox"), llm.encode("hello")]
    quiet, _ = llm.run(prompts, max_new_tokens=12, ignore_eos=True)
    seen: dict[int, list[str]] = {0: [], 1: []}
    loud, _ = llm.run(prompts, on_output=lambda i, o: seen[i].append(o.text),
                      max_new_tokens=12, ignore_eos=True)
    for i, (q, s) in enumerate(zip(quiet, loud)):
        assert q.output_ids == s.output_ids and len(q.output_ids) == 12
        assert q.text == s.text == llm.tokenizer.decode(q.output_ids) and q.text
        assert q.decoder is None and s.decoder is not None  # the lazy path was taken
        assert "".join(seen[i]) == s.text and len([t for t in seen[i] if t]) > 1


class CapturingExecutor(ScriptedExecutor):
    """Says that a decode-only step of a batch size not launched before would capture
    CUDA graphs (as LocalExecutor on a GPU; each size its own bucket here)."""

    def __init__(self, script, ahead):
        super().__init__(script, ahead)
        self.seen, self.launched = set(), []

    def captures(self, num_seqs):
        return None if num_seqs in self.seen else num_seqs

    def launch(self, work):
        if len(work.columns.token_ids) == work.num_seqs:  # decode-only: captured now
            self.seen.add(work.num_seqs)
        self.launched.append(work.num_seqs)
        super().launch(work)


def test_a_first_token_is_not_held_behind_a_graph_capture(tok):
    """With steps scheduled ahead, the decode step after a prefill is launched before the
    prefill's token is read: where that launch first captures graphs (seconds), the engine
    hands out the prefill's token first, then launches it; later decodes go ahead."""
    script = {"r0": tok.encode("one two three four five six", add_special_tokens=False)}
    executor = CapturingExecutor(script, ahead=True)
    engine = LLMEngine(executor, tok, RuntimeConfig(max_seq_len=160, max_batch=4,
                                                    max_batch_tokens=64), block_size=4)
    req = engine.add_request(tok.encode("a prompt"), SamplingParams(max_new_tokens=6,
                                                                   ignore_eos=True), "r0")
    assert [o.token_id for o in engine.step()] == script["r0"][:1]
    assert executor.launched == [1] and not engine.replicas[0].in_flight  # prefill only
    engine.step()  # the capturing decode, and (captured now) the next one ahead of it
    assert executor.launched == [1, 1, 1] and len(engine.replicas[0].in_flight) == 1
    while engine.has_unfinished:
        engine.step()
    assert req.output_ids == script["r0"][:6]


def test_a_bucket_is_held_back_once(tok):
    """A request with a penalty never goes ahead, so the steps scheduled ahead are smaller
    than the ones scheduled after a wait, and their bucket is captured only when one of
    them launches: each bucket is held back once, then launched (and captured), and the
    steps after it go ahead again."""
    script = {f"r{i}": tok.encode("one two three four five six seven eight",
                                  add_special_tokens=False) for i in range(3)}
    executor = CapturingExecutor(script, ahead=True)
    engine = LLMEngine(executor, tok, RuntimeConfig(max_seq_len=160, max_batch=4,
                                                    max_batch_tokens=64), block_size=4)
    plain = SamplingParams(max_new_tokens=8, ignore_eos=True)
    reqs = [engine.add_request(tok.encode("a prompt"), plain, "r0"),
            engine.add_request(tok.encode("a prompt"), plain, "r1"),
            engine.add_request(tok.encode("a prompt"),
                               SamplingParams(max_new_tokens=8, ignore_eos=True,
                                              repetition_penalty=1.2), "r2")]
    ahead = 0
    while engine.has_unfinished:
        engine.step()
        ahead += len(engine.replicas[0].in_flight) > 0  # a step left in flight: went ahead
    # the steps ahead hold r0 and r1 only (size 2): held back once, then launched
    assert sorted(b for _, b in engine._held_back) == [2]
    assert ahead >= 4  # and later steps went ahead again
    assert [r.output_ids for r in reqs] == [script[f"r{i}"][:8] for i in range(3)]
