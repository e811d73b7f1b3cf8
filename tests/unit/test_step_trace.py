"""The engine's per-step trace (engine.step_trace): its counts add up to the run's tokens,
its times to the run's wall, and tracing changes no token."""

import random
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.engine import LLMEngine
from llamadist.engine.executor import LocalExecutor
from llamadist.engine.step_trace import StepTrace, read, step_counts, summarise
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint

MAX_SEQ = 64


def engine_for(path, ahead: bool) -> LLMEngine:
    """A budget of 12 tokens for 3 sequences: prompts are chunked and share steps with
    decodes, so every kind of step occurs."""
    ckpt = open_checkpoint(path)
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=3, dtype="float32",
                            max_batch_tokens=12)
    model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32, 1,
                         MAX_SEQ, runtime=runtime)
    return LLMEngine(LocalExecutor(model, ahead=ahead), ckpt.tokenizer(), runtime,
                     block_size=4, prefix_caching=False)


def run(engine: LLMEngine, prompts: list[list[int]], new: int) -> list[list[int]]:
    reqs, steps = engine.submit(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True),
                                stream_text=False)
    for _ in steps:
        pass
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("ahead", [False, True])
def test_trace_counts_add_up_to_the_workload(tiny_model, tmp_path, ahead):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(2, 20))] for _ in range(7)]
    new = 5
    plain = run(engine_for(tiny_model, ahead), prompts, new)
    engine = engine_for(tiny_model, ahead)
    engine.trace = trace = StepTrace()
    traced = run(engine, prompts, new)
    assert traced == plain  # tracing changes nothing the engine computes

    recs = trace.records
    assert recs and all(r.t_done is not None for r in recs)
    assert sum(r.prefill_tokens for r in recs) == sum(len(p) for p in prompts)
    assert sum(r.sampled for r in recs) == len(prompts) * new == engine.stats.generated_tokens
    # every request's first token comes from its prompt's last chunk, the rest from decodes
    assert sum(r.decode_seqs for r in recs) == len(prompts) * (new - 1)
    assert all(r.prefill_tokens + r.decode_seqs <= 12 for r in recs)  # the budget
    assert any(r.resumed_seqs for r in recs)  # prompts of up to 20 tokens were chunked
    assert all(r.longest_chunk <= 12 for r in recs)
    assert {r.kind for r in recs} == {"decode", "mixed", "prefill"}
    assert all(r.graph is False for r in recs)  # a CPU engine runs no CUDA graph
    # the steps' wall times tile the run: each from the previous step's tokens
    assert sum(r.wall_s for r in recs) == pytest.approx(recs[-1].t_done)
    assert all(r.wall_s >= 0 and r.host_s >= 0 and r.launch_s >= 0 for r in recs)

    trace.write(tmp_path / "t.jsonl")
    back = read(tmp_path / "t.jsonl")
    assert len(back) == len(recs) and back[0]["prefill_tokens"] == recs[0].prefill_tokens
    s = summarise(back)
    assert s == trace.summary()
    assert s["all"]["steps"] == len(recs)
    assert s["all"]["prefill_tokens"] == sum(len(p) for p in prompts)
    assert sum(s[k]["steps"] for k in ("decode_eager", "mixed", "prefill")) == len(recs)
    assert sum(s[k]["share"] for k in ("decode_eager", "mixed", "prefill")) == pytest.approx(1)


def test_a_one_token_prompt_chunk_is_prefill_and_a_fed_back_token_a_decode():
    req = SimpleNamespace(prompt_ids=[1, 2, 3])
    chunks = [SimpleNamespace(request=req, start=2, num_tokens=1, sample=True),  # prompt end
              SimpleNamespace(request=req, start=3, num_tokens=1, sample=True),  # a decode
              SimpleNamespace(request=req, start=0, num_tokens=2, sample=False)]
    # (prefill tokens, prefill seqs, decodes, sampled, KV tokens, resumed, longest chunk)
    assert step_counts(chunks) == (3, 2, 1, 2, 3 + 4 + 2, 1, 2)
    assert step_counts(chunks[1:2])[-2:] == (0, 1)  # a decode-only step's longest: 1


def test_times_follow_the_clock():
    """Two steps in flight at once (scheduled ahead): each step's wall time runs from the
    previous step's tokens to its own."""
    ticks = iter([10.0,                  # the trace begins
                  10.5,                  # step 0 launched (scheduled at 10.0, built 10.25)
                  11.0,                  # step 1 launched (scheduled at 10.75, built 10.9)
                  13.0,                  # step 0's tokens back (waited from 12.0)
                  14.5])                 # step 1's tokens back (waited from 14.0)
    trace = StepTrace(clock=lambda: next(ticks))
    req = SimpleNamespace(prompt_ids=[1] * 4)
    trace.launched(7, [SimpleNamespace(request=req, start=0, num_tokens=4, sample=True)],
                   10.0, 10.25, None)
    trace.launched(8, [SimpleNamespace(request=req, start=4, num_tokens=1, sample=True)],
                   10.75, 10.9, True)
    trace.collected(7, 12.0)
    trace.collected(8, 14.0)
    a, b = trace.records
    assert (a.kind, b.kind, b.graph) == ("prefill", "decode", True)
    assert (a.t_schedule, a.host_s, a.launch_s) == (0.0, 0.25, 0.25)
    assert (a.t_done, a.wait_s, a.wall_s) == (3.0, 1.0, 3.0)
    assert (b.t_done, b.wait_s, b.wall_s) == (4.5, 0.5, 1.5)
    s = trace.summary()
    assert s["decode_graph"]["steps"] == 1 and s["prefill"]["wall_s"] == 3.0
    assert s["all"]["run_s"] == 4.5


def test_aborted_steps_leave_the_trace():
    ticks = iter(range(100))
    trace = StepTrace(clock=lambda: float(next(ticks)))
    req = SimpleNamespace(prompt_ids=[1])
    trace.launched(0, [SimpleNamespace(request=req, start=1, num_tokens=1, sample=True)],
                   0.0, 0.0, None)
    trace.aborted()
    trace.collected(0, 0.0)  # nothing to collect any more
    assert trace.records == []


class _FakeEvent:
    """A device event at a given device time (s); ``synchronize`` counts the waits."""
    waits = 0

    def __init__(self, t: float):
        self.t = t

    def synchronize(self) -> None:
        _FakeEvent.waits += 1

    def elapsed_time(self, other: "_FakeEvent") -> float:  # ms, as torch.cuda.Event's
        return (other.t - self.t) * 1e3


def test_device_timeline_from_marks_read_only_at_the_end(tiny_model):
    """With a marker the engine marks each step before and after its launch; the trace
    reads the events only when written or summarised: each step's device time (first mark
    to second) and the device's idle time before it (the previous step's second mark to
    this one's first, never negative)."""
    times = iter([0.0, 1.0, 1.5, 3.0, 2.5, 4.0] + [5.0 + i for i in range(200)])
    marks = []
    _FakeEvent.waits = 0

    def marker():
        marks.append(_FakeEvent(next(times)))
        return marks[-1]

    engine = engine_for(tiny_model, False)
    engine.trace = trace = StepTrace(marker=marker)
    run(engine, [[5, 6, 7], [8, 9]], 3)
    recs = trace.records
    assert len(marks) == 2 * len(recs) and _FakeEvent.waits == 0  # nothing read yet
    assert all(r.device_s is None for r in recs)
    s = trace.summary()
    assert _FakeEvent.waits == len(recs)
    assert (recs[0].device_s, recs[0].idle_before_s) == (1.0, None)
    assert (recs[1].device_s, recs[1].idle_before_s) == (1.5, 0.5)
    assert (recs[2].device_s, recs[2].idle_before_s) == (1.5, 0.0)  # 2.5 before 3.0: 0
    assert s["all"]["device_ms"] == pytest.approx(1e3 * sum(r.device_s for r in recs)
                                                  / len(recs))
    assert StepTrace().mark() is None  # no marker: host times only
    unmarked = [dict(asdict(r), device_s=None, idle_before_s=None) for r in recs]
    assert "device_ms" not in summarise(unmarked)["all"]
