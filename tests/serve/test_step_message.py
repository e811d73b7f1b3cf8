"""The engine's per-step message to the HTTP process (serve.engine_host's module
docstring), without a model: EngineHost's sink packs a step's outputs, the bytes are
unpickled and EngineClient's dispatch turns them into each stream's outputs. A stream
whose text the engine makes, one whose text the client makes from its token ids
(StreamText, checked against the engine's own text_delta), a whole response sent only
its last output, logprobs, finishes, a cancel and an engine error."""

import asyncio
import pickle
from types import SimpleNamespace

import pytest

from llamadist.engine.async_engine import END
from llamadist.engine.engine import RequestOutput
from llamadist.generation.generate import text_delta
from llamadist.generation.params import TokenLogprob
from llamadist.generation.tokenizer import IncrementalDecoder
from llamadist.serve.engine_client import EngineClient, EngineStream, StreamText
from llamadist.serve.engine_host import EngineHost
from llamadist.weights.checkpoint import open_checkpoint

TEXT = "héllo wörld, 日本語 and an emoji 🙂 in the middle of it"


@pytest.fixture(scope="module")
def tok(tiny_model):
    return open_checkpoint(tiny_model).tokenizer()


class Conn:
    """The engine's end of the connection: what was sent."""

    def __init__(self):
        self.sent: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


class Metrics:
    def __init__(self):
        self.observed = []

    def observe(self, req) -> None:
        self.observed.append(req)


def engine_side():
    conn, metrics = Conn(), Metrics()
    return EngineHost(SimpleNamespace(), metrics, conn), conn, metrics


def engine_stream(rid: str, ids: list[int], text: str = "", prompt_lps=None):
    """What the sink reads of an engine stream: its id and (at the finish) its request."""
    req = SimpleNamespace(output_ids=list(ids), text=text, prompt_logprobs=prompt_lps,
                          finish_reason=None)
    return SimpleNamespace(request_id=rid, request=req)


def read_all(client: EngineClient, msgs: list[tuple], rids: list[str]) -> dict:
    """Every stream's outputs (or the error it raised) after ``msgs`` are dispatched."""
    async def main():
        client._loop = asyncio.get_running_loop()
        for m in msgs:
            client._dispatch(m)
        got = {}
        for rid in rids:
            s = streams[rid]
            outs = []
            try:
                async for out in s:
                    outs.append(out)
            except RuntimeError as e:
                outs.append(e)
            got[rid] = (outs, s.request)
        return got
    streams = dict(client._streams)
    return asyncio.run(main())


def byte_token(tok, b: int) -> int:
    """The id of the byte-level token of one byte (GPT-2's byte-to-character map)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + \
        list(range(0xAE, 0x100))
    char = chr(b) if b in keep else chr(256 + sorted(set(range(256)) - set(keep)).index(b))
    return tok.backend.token_to_id(char)


def test_round_trip_streamed_ids_and_whole(tok):
    # a lone continuation byte in the middle: U+FFFD, held back while it ends the text
    ids = tok.encode(TEXT[:20]) + [byte_token(tok, 0x80)] + tok.encode(TEXT[20:])
    whole = tok.decode(ids)
    assert "\ufffd" in whole and whole.replace("\ufffd", "") == TEXT
    host, conn, metrics = engine_side()
    host._quiet.add("whole")  # submitted with stream False and no logprobs
    client = EngineClient(None, tokenizer=tok)
    for rid in ("text", "ids", "whole"):
        client._streams[rid] = EngineStream(client, rid)
    client._streams["ids"].text = StreamText(tok)
    streams = {rid: engine_stream(rid, ids, whole) for rid in ("text", "ids", "whole")}
    # the engine's own deltas for the stream whose text it makes
    dec, emitted, engine_deltas = IncrementalDecoder(tok), 0, []
    for k in range(1, len(ids) + 1):
        _, d, _ = text_delta(tok, ids[:k], (), emitted, k == len(ids), dec)
        emitted += len(d)
        engine_deltas.append(d)
    for k, tid in enumerate(ids):
        last = k == len(ids) - 1
        reason = "length" if last else None
        host._sink([
            (streams["text"], RequestOutput("text", tid, engine_deltas[k], last, reason)),
            (streams["ids"], RequestOutput("ids", tid, whole if last else "", last, reason)),
            (streams["whole"], RequestOutput("whole", tid, whole if last else "", last, reason)),
        ])
    msgs = [pickle.loads(b) for b in conn.sent]
    assert len(msgs) == len(ids)
    for m in msgs[:-1]:  # the whole response is sent nothing before its end
        assert m[0] == "step" and m[1] == ["text", "ids"] and m[4] == [] and m[5] == []
    assert msgs[-1][1] == ["text", "ids", "whole"]
    assert [f[:2] for f in msgs[-1][5]] == [(0, "length"), (1, "length"), (2, "length")]
    assert "whole" not in host._quiet and len(metrics.observed) == 3
    got = read_all(client, msgs, ["text", "ids", "whole"])
    for rid in ("text", "ids"):
        outs, req = got[rid]
        assert [o.token_id for o in outs] == ids
        assert "".join(o.text for o in outs) == whole
        assert [o.finished for o in outs] == [False] * (len(ids) - 1) + [True]
        assert outs[-1].finish_reason == "length" and req.output_ids == ids
    # the client's deltas are the engine's, step by step (an unfinished character held)
    assert [o.text for o in got["ids"][0]] == engine_deltas
    outs, req = got["whole"]
    assert len(outs) == 1 and outs[0].finished and outs[0].text == whole
    assert req.output_ids == ids and req.finish_reason == "length"
    assert client._streams == {}


def test_whole_response_with_stop_strings_gets_its_whole_text(tok):
    """A whole response with stop strings is detokenized every step in the engine (its
    outputs carry deltas); sent only its last output, that one carries the whole text."""
    host, conn, _ = engine_side()
    host._quiet.add("w")
    s = engine_stream("w", [5, 6, 7], text="abc")
    host._sink([(s, RequestOutput("w", 5, "ab", False, None))])
    host._sink([(s, RequestOutput("w", 6, "c", True, "stop"))])
    assert len(conn.sent) == 1
    msg = pickle.loads(conn.sent[0])
    assert msg[1:4] == (["w"], [6], ["abc"]) and msg[5][0][1] == "stop"


def test_logprobs_only_where_present_and_whole_with_logprobs_not_quiet(tok):
    host, conn, _ = engine_side()
    lp = TokenLogprob(9, -0.5, ((9, -0.5), (3, -1.5)))
    a, b = engine_stream("a", [9]), engine_stream("b", [4], prompt_lps=[None, lp])
    host._sink([(a, RequestOutput("a", 4, "x", False, None)),
                (b, RequestOutput("b", 9, "", False, None, lp))])
    host._sink([(b, RequestOutput("b", 4, "yz", True, "stop", lp))])
    m1, m2 = (pickle.loads(d) for d in conn.sent)
    assert m1[4] == [(1, lp)] and m2[4] == [(0, lp)]
    assert m2[5] == [(0, "stop", [4], [None, lp])]
    client = EngineClient(None)
    for rid in ("a", "b"):
        client._streams[rid] = EngineStream(client, rid)
    client._streams["a"]._done = True  # read only b's
    got = read_all(client, [m1, m2], ["b"])
    outs, req = got["b"]
    assert [o.logprobs for o in outs] == [lp, lp]
    assert [o.text for o in outs] == ["", "yz"] and outs[-1].finish_reason == "stop"
    assert req.prompt_logprobs == [None, lp]
    assert client._streams["a"].pending == 1 and client._streams["a"]._items[0].logprobs is None


def test_cancel_and_error_end_the_streams(tok):
    host, conn, metrics = engine_side()
    host._quiet.add("c")
    c, e = engine_stream("c", [1]), engine_stream("e", [2])
    host._sink([(c, END), (e, RuntimeError("a worker died"))])
    msg = pickle.loads(conn.sent[0])
    assert msg[1] == [] and msg[6] == [("c", None), ("e", "a worker died")]
    assert host._quiet == set() and metrics.observed == [c.request]
    client = EngineClient(None)
    for rid in ("c", "e"):
        client._streams[rid] = EngineStream(client, rid)
    got = read_all(client, [msg], ["c", "e"])
    assert got["c"] == ([], None)
    (err,), req = got["e"]
    assert isinstance(err, RuntimeError) and "a worker died" in str(err) and req is None


def test_submit_modes(tok):
    """stream True: text made by the engine; "ids": by the client (the engine, as for a
    whole response, at the end); False without logprobs: quiet until its end."""
    calls = []

    class Engine:
        def submit(self, ids, params, rid, sink, stream_text):
            calls.append((rid, stream_text))
            return SimpleNamespace(request_id=rid)

    conn = Conn()
    host = EngineHost(Engine(), Metrics(), conn)
    plain, lps = SimpleNamespace(logprobs=None), SimpleNamespace(logprobs=2)
    host._handle(("submit", [(1, [("t", [1], plain, True), ("i", [1], plain, "ids"),
                                  ("w", [1], plain, False), ("l", [1], lps, False)])]))
    assert calls == [("t", True), ("i", False), ("w", False), ("l", False)]
    assert host._quiet == {"w"}
    assert pickle.loads(conn.sent[-1]) == ("replies", [(1, True, None)])


def test_client_makes_text_only_for_streams_without_stop_strings(tok):
    """submit's items: "ids" for a stream without stop strings when the client has the
    tokenizer; the stream's own flag otherwise."""
    sent = []

    class Pipe:
        def send_bytes(self, data):
            sent.append(pickle.loads(data))

    async def main(client, stream_text, params):
        client._loop = asyncio.get_running_loop()
        before = len(sent)
        task = asyncio.ensure_future(client.submit([([1, 2], params)], stream_text))
        while len(sent) == before:  # the submit leaves at the loop's next turn
            await asyncio.sleep(0)
        (key, _), = sent[-1][1]
        client._dispatch(("replies", [(key, True, None)]))
        return (await task)[0]

    plain, stops = SimpleNamespace(stop=()), SimpleNamespace(stop=("###",))
    cases = [(tok, True, plain, "ids"), (tok, True, stops, True), (tok, False, plain, False),
             (None, True, plain, True)]
    for tokenizer, stream_text, params, mode in cases:
        s = asyncio.run(main(EngineClient(Pipe(), tokenizer=tokenizer), stream_text, params))
        assert sent[-1][1][0][1][0][3] == mode
        assert (s.text is not None) == (mode == "ids")


def test_a_sink_stream_has_no_reader():
    """A stream whose outputs go to a sink (the EngineHost's) makes no queue; reading it
    is refused plainly instead of failing on the missing queue."""
    from llamadist.engine.async_engine import RequestStream
    s = RequestStream(None, "r", sink=lambda pairs: None)
    assert s._items is None
    with pytest.raises(TypeError, match="sink"):
        next(s)

    async def read():
        async for _ in s:
            pass
    with pytest.raises(TypeError, match="sink"):
        asyncio.run(read())


def test_the_submits_of_one_loop_turn_go_in_one_message():
    """Jobs submitted in one turn of the HTTP process's loop (a wave of new requests)
    reach the engine in one message and are answered in one: each job queued or refused
    on its own; a job cancelled before its message left is sent before its cancel."""
    sent = []

    class Pipe:
        def send_bytes(self, data):
            sent.append(pickle.loads(data))

    class Engine:  # refuses the prompt [9]; fails on [8]
        def submit(self, ids, params, rid, sink, stream_text):
            if ids == [9]:
                raise ValueError("too long")
            if ids == [8]:
                raise KeyError("a bug")
            return SimpleNamespace(request_id=rid, cancel=lambda: None)

    host_conn = Conn()
    host = EngineHost(Engine(), Metrics(), host_conn)
    params = SimpleNamespace(stop=(), logprobs=None)

    async def main():
        client = EngineClient(Pipe())
        client._loop = asyncio.get_running_loop()
        jobs = [asyncio.ensure_future(client.submit([(ids, params)])) for ids in
                ([1], [9], [8], [2])]
        while not sent:
            await asyncio.sleep(0)
        assert len(sent) == 1 and [len(items) for _, items in sent[0][1]] == [1, 1, 1, 1]
        host._handle(sent[0])
        (reply,) = host_conn.sent
        client._dispatch(pickle.loads(reply))
        got = await asyncio.gather(*jobs, return_exceptions=True)
        assert [type(g) for g in got] == [list, ValueError, RuntimeError, list]
        assert "too long" in str(got[1]) and "a bug" in str(got[2])
        # cancelled before the flush: the submit goes first, then the cancel
        sent.clear()
        job = asyncio.ensure_future(client.submit([([3], params)]))
        await asyncio.sleep(0)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert [m[0] for m in sent] == ["submit", "cancel"]
        assert sent[1][1] == [sent[0][1][0][1][0][0]]
        # a job the message cannot carry (not picklable): every job of its turn is
        # answered (503), none waits for good
        sent.clear()
        bad = SimpleNamespace(stop=(), logprobs=None, f=lambda: 0)
        jobs = [asyncio.ensure_future(client.submit([(ids, p)])) for ids, p in
                (([1], params), ([2], bad))]
        got = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 5)
        assert [type(g) for g in got] == [RuntimeError, RuntimeError] and not sent

    asyncio.run(main())
