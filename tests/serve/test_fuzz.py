"""A bounded fuzz of the HTTP front: a few hundred malformed or hostile requests (bad
JSON, wrong types, huge and negative numbers, 1 MB strings, unknown fields, invalid
UTF-8, deep nesting, wrong methods and paths) are each answered 4xx with an OpenAI error
body; then a valid request still succeeds."""

import json
import random
import socket
from http.client import HTTPResponse

from tests.serve.conftest import API_KEY, http

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MB = "hello world " * 87382  # 1 MiB of ordinary text
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

# (field, bad value): each alone makes a request invalid
COMMON = [
    ("temperature", v) for v in ("hot", [], {}, True, -0.5, 2.5, 1e308)] + [
    ("top_p", v) for v in (0, 1.5, -1, "1")] + [
    ("top_k", v) for v in (-2, 1.5, 2**40)] + [
    ("min_p", v) for v in (1, -0.1)] + [
    ("max_tokens", v) for v in (1.5, "10", True, -1, 2**70, 10**6)] + [
    ("n", v) for v in (0, 17, -1, "2")] + [
    ("seed", v) for v in (2**64, "1", 1.5, -2**64)] + [
    ("stop", v) for v in ([1], 123, ["x" * 300], [""], ["a"] * 17, {"a": 1}, MB)] + [
    ("presence_penalty", v) for v in (3, -3, "x")] + [
    ("frequency_penalty", 2.5), ("repetition_penalty", 0), ("repetition_penalty", -1),
    ("stream", "yes"), ("stream", 1), ("stream_options", {"include_usage": "y"}),
    ("stream_options", {"x": 1}), ("user", 5), ("user", MB), ("model", MB),
    ("model", "not-this-one"), ("model", 7), ("foo", 1), ("", None), ("ignore_eos", "no")]
CHAT_ONLY = [("messages", v) for v in (
    [], {}, "hi", None, [{"role": "wizard", "content": "x"}], [{"content": "x"}],
    [{"role": "user", "content": 5}], [{"role": "user", "content": "x", "extra": 1}],
    [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
    [{"role": "user", "content": MB}], [{"role": MB, "content": "x"}], [[]])] + [
    ("logprobs", "yes"), ("top_logprobs", 21), ("top_logprobs", -1),
    ("max_completion_tokens", 0), ("max_completion_tokens", "1"), ("echo", True)]
COMPLETION_ONLY = [("prompt", v) for v in (
    [], [-1], [10**9], [[1, 2]], None, 5, MB, [MB], {"a": 1}, [1, "a"])] + [
    ("logprobs", 21), ("logprobs", -1), ("logprobs", True), ("echo", "y"),
    ("suffix", "x"), ("messages", [{"role": "user", "content": "x"}])]
RAW = [b"", b"{", b"nul", b'{"messages": "\xff\xfe"}', b"\xff\xfe\xfd", b"[" * 100_000,
       b"[]", b"3", b'"x"', b'{"a": }', b"{" * 50_000 + b"}" * 50_000,
       json.dumps({**CHAT, "max_tokens": 1}).encode()[:-3], b'{"max_tokens": 1e999}',
       b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], '
       b'"temperature": NaN}']


def cases(rng: random.Random) -> list[tuple[str, str, bytes, dict]]:
    out = []
    for _ in range(240):
        chat = rng.random() < 0.5
        body = dict(CHAT if chat else COMPLETION)
        pool = COMMON + (CHAT_ONLY if chat else COMPLETION_ONLY)
        for field, value in rng.sample(pool, rng.randint(1, 3)):
            if field:
                body[field] = value
            else:
                body.pop("model")
                body.pop("messages" if chat else "prompt")  # a required field missing
        path = "/v1/chat/completions" if chat else "/v1/completions"
        out.append(("POST", path, json.dumps(body).encode(), AUTH))
    for raw in RAW:
        for path in ("/v1/chat/completions", "/v1/completions"):
            out.append(("POST", path, raw, AUTH))
    good = json.dumps(CHAT).encode()
    out += [("POST", "/v1/chat/completions", good, {}),                     # no key
            ("POST", "/v1/chat/completions", good, {"Authorization": "Bearer x" * 1000}),
            ("POST", "/v1/chat/completions", b"x" * (5 << 20), AUTH),         # over 4 MiB
            ("GET", "/v1/chat/completions", b"", AUTH), ("DELETE", "/v1/models", b"", AUTH),
            ("GET", "/v2/nothing", b"", AUTH), ("POST", "/health", good, AUTH),
            ("GET", "/v1/models", b"", {})]
    return out


def test_hostile_requests_get_4xx_and_the_server_keeps_serving(tiny_server):
    all_cases = cases(random.Random(0))
    assert len(all_cases) > 250
    for method, path, body, headers in all_cases:
        status, answer = http(method, tiny_server.url + path, body or None, headers)
        assert 400 <= status < 500, (method, path, body[:200], status, answer[:300])
        if path.startswith("/v1"):
            assert "message" in json.loads(answer)["error"], answer[:300]
    status, answer = http("POST", tiny_server.url + "/v1/chat/completions", CHAT, AUTH)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["role"] == "assistant"
    assert http("GET", tiny_server.url + "/health")[0] == 200


def test_a_request_the_queue_can_never_hold_is_400_not_429(tiny_server):
    """429 says retry later (the openai client retries it); 16 choices never fit 12."""
    body = {**COMPLETION, "prompt": ["a", "b", "c", "d"], "n": 4}
    status, answer = http("POST", tiny_server.url + "/v1/completions", body, AUTH)
    assert status == 400, answer
    assert "--max-queue 12" in json.loads(answer)["error"]["message"]


def raw_post(length: int, start: bytes) -> bytes:
    """A completion request's head declaring a body of ``length`` bytes, and ``start``."""
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {length}\r\n\r\n".encode() + start)


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(tiny_server):
    """A 1 GiB Content-Length is answered 413 at once: nothing of it is read or held."""
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=30) as s:
        s.sendall(raw_post(1 << 30, b'{"prompt": "'))
        answer = HTTPResponse(s)
        answer.begin()
        assert answer.status == 413
        assert "more than the limit" in json.loads(answer.read())["error"]["message"]


def test_a_client_gone_mid_body_is_no_app_failure(tiny_server):
    """A body cut short by the client's leaving: the request ends quietly (no "Exception
    in ASGI application" with a traceback in the server's log) and serving goes on."""
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=30) as s:
        s.sendall(raw_post(100, b'{"prompt"'))
    status, _ = http("POST", tiny_server.url + "/v1/completions", COMPLETION, AUTH)
    assert status == 200
    tiny_server.log.flush()
    log = open(tiny_server.log.name).read()
    assert "ClientDisconnect" not in log and "Exception in ASGI" not in log, log[-2000:]
