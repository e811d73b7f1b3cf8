"""The engine on its own thread: requests from other threads and from asyncio tasks, each
equal to itself alone; cancellation; refusal; an engine failure reaches every reader."""

import asyncio
import threading
import time
from dataclasses import replace

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.async_engine import AsyncEngine
from llamadist.engine.engine import LLMEngine
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint

PROMPTS = ["The quick brown fox", "1 2 3 4 5 6 7", "def main():", "Once upon a time"]
PARAMS = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, ignore_eos=True)


@pytest.fixture
def setup(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    tok = ckpt.tokenizer()
    runtime = RuntimeConfig(max_seq_len=64, max_batch=2, dtype="float32")
    model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cpu"], torch.float32, 1, 64,
                         runtime=runtime, static_cache=False)
    engine = AsyncEngine(LLMEngine(model, tok, runtime, block_size=8))
    static = Engine.load(str(tiny_model), max_seq_len=64)
    alone = {p: generate(static, tok, [tok.encode(p)], PARAMS)[0].token_ids for p in PROMPTS}
    yield engine, tok, alone
    engine.shutdown()


def test_requests_from_threads_each_equal_alone(setup):
    engine, tok, alone = setup
    got = {}

    def client(i: int) -> None:
        time.sleep(0.01 * i)  # staggered arrivals, while others run
        got[PROMPTS[i]] = [o.token_id for o in engine.submit(tok.encode(PROMPTS[i]), PARAMS)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone


def test_asyncio_streams_and_text(setup):
    engine, tok, alone = setup

    async def one(p: str) -> tuple[list[int], str]:
        ids, text = [], ""
        async for out in engine.submit(tok.encode(p), PARAMS):
            ids.append(out.token_id)
            text += out.text
        return ids, text

    async def main():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    results = asyncio.run(main())
    for p, (ids, text) in zip(PROMPTS, results):
        assert ids == alone[p] and text == tok.decode(ids)


def test_text_made_at_the_end_when_not_streamed(setup):
    """stream_text=False (the server's responses that do not stream): every output before
    the last has no text, the last has it all, equal to the streamed text; with a stop
    string the text is still made every step, so the stop cuts it where it would."""
    engine, tok, alone = setup
    streamed = "".join(o.text for o in engine.submit(tok.encode(PROMPTS[0]), PARAMS))
    outs = list(engine.submit(tok.encode(PROMPTS[0]), PARAMS, stream_text=False))
    assert [o.token_id for o in outs] == alone[PROMPTS[0]]
    assert all(o.text == "" for o in outs[:-1]) and outs[-1].text == streamed != ""
    stop = streamed[len(streamed) // 2:][:2]
    cut = replace(PARAMS, stop=(stop,))
    assert "".join(o.text for o in engine.submit(tok.encode(PROMPTS[0]), cut,
                                                  stream_text=False)) == \
        "".join(o.text for o in engine.submit(tok.encode(PROMPTS[0]), cut)) == \
        streamed[:streamed.index(stop)]


def test_cancel_ends_the_stream_and_frees_blocks(setup):
    engine, tok, _ = setup
    stream = engine.submit(tok.encode(PROMPTS[0]), SamplingParams(max_new_tokens=40,
                                                                  ignore_eos=True))
    first = next(stream)
    stream.cancel()
    rest = list(stream)
    assert first.token_id is not None and len(rest) < 39
    engine.shutdown()
    assert stream.request.finish_reason == "cancelled"
    assert engine.engine.gauges()["kv_blocks_used"] == 0


def test_too_large_refused_in_the_caller(setup):
    engine, tok, _ = setup
    with pytest.raises(ValueError, match="max_seq_len is 64"):
        engine.submit([1] * 60, SamplingParams(max_new_tokens=10))


def test_an_engine_failure_reaches_the_reader(setup, monkeypatch):
    engine, tok, _ = setup

    def broken():
        raise RuntimeError("device lost")
    monkeypatch.setattr(engine.engine, "step", broken)
    stream = engine.submit(tok.encode(PROMPTS[0]), PARAMS)
    with pytest.raises(RuntimeError, match="device lost"):
        list(stream)
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(tok.encode(PROMPTS[1]), PARAMS)
