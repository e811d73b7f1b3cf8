"""The OpenAI API of `llamadist serve` through the real `openai` client, against a real
server process on the tiny model (tests/serve/conftest.py)."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.serve.conftest import API_KEY, ROOT, http

import openai  # a test dependency: missing, the tests fail (they never skip)
PROMPTS = ["The quick brown fox", "1 2 3 4 5 6 7", "def main():", "Once upon a time",
           "Distributed inference splits", "hello world", "The lazy dog", "100 1000"]
MSG = [{"role": "user", "content": "Once upon a time there was"}]


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed by prometheus_client's own parser: {sample name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = http("GET", url + "/metrics")[1].decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_chat_whole_and_streamed_agree(client):
    whole = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12,
                                           temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_n(client, tiny_model):
    whole = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10,
                                      temperature=0, n=2, logprobs=0)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text == whole.choices[1].text  # greedy: n equal choices
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0, stream=True))
    assert streamed == whole.choices[0].text
    per_choice = [len(c.logprobs.tokens) for c in whole.choices]
    assert whole.usage.completion_tokens == sum(per_choice) and per_choice[0] > 0
    from llamadist.weights.checkpoint import open_checkpoint
    n_prompt = len(open_checkpoint(tiny_model).tokenizer().encode("The quick brown fox"))
    assert whole.usage.prompt_tokens == n_prompt  # the prompt counted once, not per choice


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="tiny", prompt="1 2 3 4 5 6 7", max_tokens=40,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    plain = [i for i in range(2, len(text) - 2) if text[i:i + 2].isascii()
             and text[i:i + 2].strip()]
    assert plain, f"no ASCII in {text!r} to stop at"
    stop = text[plain[0]:plain[0] + 2]
    cut = client.completions.create(model="tiny", prompt="1 2 3 4 5 6 7", max_tokens=40,
                                    temperature=0, stop=["\u2603 never", stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and full.choices[0].finish_reason == "length"


def test_seed_reproducibility(client):
    def draw(seed: int) -> str:
        return client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16,
                                              temperature=1.0, seed=seed,
                                              extra_body={"ignore_eos": True}
                                              ).choices[0].message.content
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_echo_logprobs_match_a_full_forward(client, tiny_model):
    """Prompt and generated tokens' logprobs, as evaluation harnesses read them, against
    transformers' full forward on the same weights."""
    from transformers import AutoModelForCausalLM
    from llamadist.weights.checkpoint import open_checkpoint
    tok = open_checkpoint(tiny_model).tokenizer()
    prompt = "Distributed inference splits a model across devices"
    ids = tok.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                  echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    gen = tok.encode(r.choices[0].text[len(prompt):], add_special_tokens=False)
    all_ids = ids + gen
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([all_ids])).logits[0], dim=-1)
    want = [ref[i - 1, all_ids[i]].item() for i in range(1, len(all_ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_eight_concurrent_requests_equal_generate(client, tiny_model):
    out = subprocess.run([sys.executable, "-m", "llamadist", "generate", str(tiny_model),
                          "--max-new-tokens", "16", "--json",
                          *[a for p in PROMPTS for a in ("--prompt", p)]],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    want = [json.loads(line)["text"] for line in out.stdout.splitlines()]

    def one(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, max_tokens=16,
                                         temperature=0).choices[0].text
    with ThreadPoolExecutor(8) as pool:  # 8 at once into a server of --max-batch 4
        got = list(pool.map(one, PROMPTS))
    assert got == want


def test_cancelled_stream_frees_its_blocks(client, tiny_server):
    before = metrics(tiny_server.url).get("llamadist_requests_finished_total{reason=cancelled}", 0)
    stream = client.completions.create(model="tiny", prompt="The quick brown fox",
                                       max_tokens=240, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client goes away mid-stream (at once: 240 tokens take far longer)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(tiny_server.url)
        if m["llamadist_kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m["llamadist_requests_finished_total{reason=cancelled}"] == before + 1
    assert m["llamadist_kv_blocks_used"] == 0 and m["llamadist_requests_running"] == 0


def test_health_metrics_models(client, tiny_server):
    assert http("GET", tiny_server.url + "/health") == (200, b'{"status":"ok"}')
    m0 = metrics(tiny_server.url)
    client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    m1 = metrics(tiny_server.url)
    assert m1["llamadist_generation_tokens_total"] == m0["llamadist_generation_tokens_total"] + 4
    assert m1["llamadist_prompt_tokens_total"] > m0["llamadist_prompt_tokens_total"]
    assert (m1["llamadist_time_to_first_token_seconds_count"]
            == m0["llamadist_time_to_first_token_seconds_count"] + 1)
    for name in ("llamadist_requests_waiting", "llamadist_kv_blocks_free",
                 "llamadist_preemptions_total", "llamadist_time_per_output_token_seconds_count",
                 "llamadist_stage_busy_seconds_total{device=cpu,layers=0:5,rank=0,replica=0,stage=0}",
                 "llamadist_kv_cache_usage", "process_resident_memory_bytes"):
        assert name in m1
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").max_model_len == 256
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")


def test_a_developer_turn_is_the_system_turn(client):
    """OpenAI's newer clients send the system prompt as role "developer"."""
    kw = dict(model="tiny", max_tokens=4, temperature=0, logprobs=True)
    as_system = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, *MSG], **kw)
    as_developer = client.chat.completions.create(
        messages=[{"role": "developer", "content": "Be brief."}, *MSG], **kw)
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_errors_api_key_model_queue(client, tiny_server):
    url = tiny_server.url + "/v1/chat/completions"
    body = {"messages": MSG, "max_tokens": 2}
    assert http("POST", url, body)[0] == 401
    assert http("POST", url, body, {"Authorization": "Bearer wrong"})[0] == 401
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=MSG, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10_000)
    # 13 choices never fit --max-queue 12: 400, not 429 (which the client would retry)
    with pytest.raises(openai.BadRequestError, match="more than the queue ever holds"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, n=13)
    stream = client.completions.create(model="tiny", prompt="hi", max_tokens=200, n=12,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # 12 choices queued or running: the queue is full for now
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    finally:
        stream.close()
    deadline = time.monotonic() + 30  # the closed stream's choices are cancelled
    while True:
        try:
            assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed stream's choices stayed queued"
            time.sleep(0.1)


def test_disconnected_whole_request_is_cancelled(tiny_server):
    """A non-streaming client that goes away: its choices are cancelled, blocks freed."""
    import http.client
    import json as js
    key = "llamadist_requests_finished_total{reason=cancelled}"
    done = "llamadist_requests_finished_total{reason=length}"
    m0 = metrics(tiny_server.url)
    before, before_done = m0.get(key, 0), m0.get(done, 0)
    conn = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=30)
    conn.request("POST", "/v1/completions", js.dumps({
        "model": "tiny", "prompt": "The quick brown fox", "max_tokens": 240, "n": 8,
        "temperature": 0, "ignore_eos": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    # gone as soon as its first choices run (a fixed wait let all 8 x 240 tokens finish
    # first on a fast machine; they take ~0.3 s here): the server sees the disconnect at
    # once (when it polled every 0.2 s, 1 run in 8 finished first)
    deadline = time.monotonic() + 20
    while metrics(tiny_server.url)["llamadist_requests_running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(tiny_server.url)
        if (m.get(key, 0) + m.get(done, 0) >= before + before_done + 8
                and m["llamadist_kv_blocks_used"] == 0):
            break
        time.sleep(0.1)
    # 8 choices at most 4 at once: at least the 4 not yet done were cancelled
    assert m[key] + m.get(done, 0) == before + before_done + 8 and m[key] >= before + 4
    assert m["llamadist_kv_blocks_used"] == 0
    assert m["llamadist_requests_running"] == 0 and m["llamadist_requests_waiting"] == 0


def test_penalties_reach_the_sampler(client):
    def run(**kw) -> str:
        return client.completions.create(model="tiny", prompt="The quick brown fox",
                                         max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True}, **kw).choices[0].text
    plain = run()
    assert run(presence_penalty=2.0) != plain and run(frequency_penalty=2.0) != plain
    assert run(presence_penalty=0.0, frequency_penalty=0.0) == plain


def test_clients_leaving_at_once_give_their_queue_places_back(tiny_server, client):
    """More streaming clients than --max-queue (12) leave right after sending: their places
    and blocks come back, so the server is not left answering 429 or full."""
    import http.client
    import json as js
    for _ in range(16):
        conn = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=30)
        conn.request("POST", "/v1/completions", js.dumps({
            "model": "tiny", "prompt": "The quick brown fox", "max_tokens": 200,
            "stream": True, "ignore_eos": True}),
            {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        conn.sock.shutdown(2)
        conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(tiny_server.url)
        if m["llamadist_kv_blocks_used"] == 0 and m["llamadist_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert m["llamadist_kv_blocks_used"] == 0 and m["llamadist_requests_running"] == 0
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=2, n=12)
    assert len(r.choices) == 12  # all 12 places free again


def test_a_taken_port_is_refused_before_loading(tiny_server, tiny_model):
    out = subprocess.run([sys.executable, "-m", "llamadist", "serve", str(tiny_model),
                          "--port", str(tiny_server.port)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert f"--port {tiny_server.port}: cannot listen there" in out.stderr
