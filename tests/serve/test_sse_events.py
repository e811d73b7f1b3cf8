"""A streamed response's per-step pieces, without a server: the text events made from
templates (responses.TextEvents) against the chunk dicts' JSON they stand for, and an
EngineStream's ``take`` (every output that is here in one call)."""

import asyncio
import json

import pytest

from llamadist.generation.params import TokenLogprob
from llamadist.serve import responses
from llamadist.serve.engine_client import _END, EngineStream, StepOutput
from llamadist.serve.openai_api import Choice, Job, sse

TEXTS = ["", "a", " the", 'quote " and \\ back', "line\nbreak\ttab\r", "héllo wörld",
         "日本語", "🙂 emoji", "\x00\x1f control", "\ufffd", "</script>", "data: [DONE]\n\n",
         "\x00slot\x00"]


def dict_event(job: Job, model: str, c: Choice, text: str, lp, reason) -> str:
    return sse(responses.chunk(job, model, responses.delta_choice(job, None, c, text, lp,
                                                                  reason)))


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("model", ["tiny", 'odd "name" \\ é'])
def test_text_events_equal_the_chunk_json(kind, model):
    choices = [Choice(i, [1, 2, 3]) for i in (0, 1, 7)]
    job = Job(kind, None, choices, None)
    events = responses.TextEvents(job, model)
    for c in choices:
        for text in TEXTS:
            got = events.event(c, text, None, None)
            assert got == dict_event(job, model, c, text, None, None), (c.index, text)
            parsed = json.loads(got[len("data: "):])
            part = parsed["choices"][0]
            assert (part["delta"]["content"] if kind == "chat" else part["text"]) == text
            assert parsed["id"] == job.object_id and parsed["model"] == model


def test_text_events_leave_finishes_and_logprobs_to_the_dicts():
    c = Choice(0, [1])
    job = Job("completion", None, [c], 2)
    events = responses.TextEvents(job, "m")
    assert events.event(c, "x", None, "length") is None
    assert events.event(c, "x", TokenLogprob(5, -0.5, [(5, -0.5)]), None) is None
    # an output without its logprob in a job that asks for them: the same JSON
    assert events.event(c, "x", None, None) == dict_event(job, "m", c, "x", None, None)


class Client:
    _loop = None


def out(i: int, finished: bool = False) -> StepOutput:
    return StepOutput("h0", i, f"t{i}", finished, "length" if finished else None)


def test_take_returns_every_output_here_then_the_end():
    async def run():
        client = Client()
        client._loop = asyncio.get_running_loop()
        s = EngineStream(client, "h0")
        waiting = asyncio.ensure_future(s.take())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing here yet: it waits
        s._push(out(0))
        s._push(out(1))
        first = await waiting
        for i in range(2, 5):
            s._push(out(i, finished=i == 4))
        s._push(_END)
        second = await s.take()
        third = await s.take()
        return first, second, third

    first, second, third = asyncio.run(run())
    assert [o.token_id for o in first] == [0, 1]
    assert [o.token_id for o in second] == [2, 3, 4] and second[-1].finished
    assert third == []


def test_take_raises_the_engine_error_after_the_outputs_before_it():
    async def run():
        client = Client()
        client._loop = asyncio.get_running_loop()
        s = EngineStream(client, "h0")
        s._push(out(0))
        s._push(RuntimeError("the engine failed"))
        got = await s.take()
        with pytest.raises(RuntimeError, match="the engine failed"):
            await s.take()
        return got, await s.take()

    got, after = asyncio.run(run())
    assert [o.token_id for o in got] == [0] and after == []
