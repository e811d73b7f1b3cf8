"""A streamed response's per-step pieces, without a server: the text events made from
templates (responses.TextEvents) against the chunk dicts' JSON they stand for, an
EngineStream's ``take`` (every output that is here in one call), and JobStream's body
with its watcher for a client that leaves."""

import asyncio
import json
import pickle

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


class Released:
    def __init__(self):
        self.jobs = []

    def release(self, job) -> None:
        self.jobs.append(job)


def test_a_client_leaving_ends_the_stream_and_releases_its_job():
    """JobStream: the body runs in the request's task; an http.disconnect cancels it (its
    generator's cleanup runs), the response returns quietly and the job is released."""
    from llamadist.serve.app import JobStream

    async def run():
        left, sent, cleaned = asyncio.Event(), [], []
        never = asyncio.get_running_loop().create_future()

        async def body():
            try:
                yield b"data: one\n\n"
                await never  # waiting for the engine's next step
                yield b"data: two\n\n"
            finally:
                cleaned.append(True)

        async def receive():
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message.get("body") == b"data: one\n\n":
                left.set()  # the client goes away after the first event

        server, job = Released(), object()
        call = asyncio.ensure_future(JobStream(body(), job, server)({}, receive, send))
        await asyncio.wait({call}, timeout=10)
        ended = call.done()
        if not ended:  # (the test fails below; the task is not left behind)
            call.cancel()
        return ended and call.result(), sent, cleaned, server.jobs, job

    ended, sent, cleaned, released, job = asyncio.run(run())
    assert ended is None  # it returned by itself, quietly
    assert [m.get("body") for m in sent] == [None, b"data: one\n\n"]  # start, one event
    assert cleaned == [True] and released == [job]


def test_a_whole_stream_is_not_cut_by_its_own_end():
    from llamadist.serve.app import JobStream

    async def run():
        sent, done = [], asyncio.Event()

        async def body():
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0)

        async def receive():  # as uvicorn's: the response's end wakes it too
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        server, job = Released(), object()
        await JobStream(body(), job, server)({}, receive, send)
        await asyncio.sleep(0.01)  # the watcher had its chance to run
        return sent, server.jobs, job, asyncio.current_task().cancelling() \
            if hasattr(asyncio.current_task(), "cancelling") else 0

    sent, released, job, cancelling = asyncio.run(run())
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n",
                                                 b"data: 2\n\n", b""]
    assert released == [job] and cancelling == 0


@pytest.mark.parametrize("choices", [1, 2])
def test_a_shutdown_ends_open_streams_with_a_503(choices):
    """At the end of a shutdown's grace period (EngineClient.end_streams, scheduled by the
    HTTP process's SIGTERM) an open request is answered, not cut: its reader (one choice:
    ``steps``; several: ``outputs``) raises a 503 that says why, and its engine requests
    are cancelled."""
    from llamadist.serve.engine_client import EngineClient
    from llamadist.serve.openai_api import Frontend
    from llamadist.serve.protocol import ApiError
    from tests.serve.test_step_message import Conn

    async def run():
        conn = Conn()
        client = EngineClient(conn)
        client._loop = asyncio.get_running_loop()
        job = Job("completion", None, [Choice(i, [1]) for i in range(choices)], None)
        for i, c in enumerate(job.choices):
            c.stream = client._streams[f"h{i}"] = EngineStream(client, f"h{i}")
            c.stream._push(out(0))
        client.end_streams_later(0.01, "the server is shutting down")
        got = []
        with pytest.raises(ApiError) as info:
            async for _, o in Frontend(client, None, "m", 64, 10).outputs(job):
                got.append(o)
        return [pickle.loads(m) for m in conn.sent], got, info.value

    sent, got, err = asyncio.run(run())
    assert len(got) == choices  # what came before is read first
    assert err.status == 503 and err.message == "the server is shutting down"
    assert sorted(sent[0][1]) == [f"h{i}" for i in range(choices)] and sent[0][0] == "cancel"
