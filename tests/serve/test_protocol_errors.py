"""The 400 a bad field gets names the field as the client wrote it (not pydantic's union
branch such as ``prompt.str``) and what the field takes; a user or system message without
content is refused instead of reaching the model as an empty turn. No server needed:
``protocol.parse`` is what the HTTP process runs on every body."""

import json

import pytest

from llamadist.serve.protocol import (MAX_STOP, ApiError, ChatRequest, CompletionRequest,
                                      parse)


def refusal(kind, body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(kind, json.dumps(body).encode())
    assert info.value.status == 400
    assert info.value.message.startswith(f"{info.value.param}: ")
    return info.value


@pytest.mark.parametrize("role", ["user", "system"])
def test_a_user_or_system_turn_needs_content(role):
    err = refusal(ChatRequest, {"messages": [{"role": role}]})
    assert err.param == "messages.0.content"
    assert role in err.message
    err = refusal(ChatRequest, {"messages": [{"role": "user", "content": "hi"},
                                             {"role": role, "content": None}]})
    assert err.param == "messages.1.content"


def test_an_assistant_turn_may_have_null_content():
    req = parse(ChatRequest, json.dumps({"messages": [
        {"role": "assistant", "content": None}, {"role": "user", "content": "hi"}]}).encode())
    assert [m.text() for m in req.messages] == ["", "hi"]


@pytest.mark.parametrize("kind, body, param, says", [
    (CompletionRequest, {"prompt": [[1, 2], [3]]}, "prompt", "list of token ids"),
    (CompletionRequest, {"prompt": 5}, "prompt", "list of 1 to 64 strings"),
    (CompletionRequest, {"prompt": []}, "prompt", "at least 1 item"),
    (CompletionRequest, {"prompt": [3, -1]}, "prompt.1", "greater than or equal to 0"),
    (CompletionRequest, {"prompt": "hi", "stop": 5}, "stop", f"at most {MAX_STOP} strings"),
    (CompletionRequest, {"prompt": "hi", "stop": ["a"] * (MAX_STOP + 1)}, "stop",
     f"at most {MAX_STOP} items"),
    (ChatRequest, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     "text parts"),
    (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages.0.content.0.type", "'text'"),
    # an unknown field keeps its own name, at the top, nested, and inside a union's branch
    (CompletionRequest, {"prompt": "hi", "foo": 1}, "foo", "Extra inputs"),
    (ChatRequest, {"messages": [{"role": "user", "content": "x", "extra": 1}]},
     "messages.0.extra", "Extra inputs"),
    (ChatRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "x": 1}]}]}, "messages.0.content.0.x", "Extra inputs"),
])
def test_a_union_field_is_named_as_written(kind, body, param, says):
    err = refusal(kind, body)
    assert err.param == param
    assert says in err.message
    assert "str" not in err.param and "[" not in err.param


@pytest.mark.parametrize("kind, body, param", [
    (CompletionRequest, '{"prompt": "\\ud800"}', "prompt"),
    (CompletionRequest, '{"prompt": ["a", "b\\udc00"]}', "prompt.1"),
    (ChatRequest, '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    (ChatRequest, '{"messages": [{"role": "user", "content": [{"type": "text", '
                  '"text": "\\udc00"}]}]}', "messages.0.content.0.text"),
    (ChatRequest, '{"messages": [{"role": "user", "content": "x", "\\ud800": 1}]}',
     "messages.0"),
])
def test_a_lone_surrogate_is_no_text(kind, body, param):
    """Valid JSON, but no Unicode text: the tokenizer raised on it (a 500)."""
    with pytest.raises(ApiError) as info:
        parse(kind, body.encode())
    assert (info.value.status, info.value.param) == (400, param)
    assert "surrogate" in info.value.message
    json.dumps(info.value.body(), ensure_ascii=False).encode()  # the answer itself encodes


def test_an_integer_past_python_s_digit_limit_is_bad_json():
    """json.loads raises a plain ValueError past 4 300 digits (not a JSONDecodeError)."""
    for body in ('{"prompt": "hi", "max_tokens": %s}', '{"prompt": [%s]}'):
        with pytest.raises(ApiError) as info:
            parse(CompletionRequest, (body % ("9" * 5000)).encode())
        assert info.value.status == 400 and "not valid JSON" in info.value.message


def test_max_tokens_zero_only_scores_a_prompt():
    """0 new tokens means something only as echo + logprobs (scoring a text)."""
    assert refusal(ChatRequest, {"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 0}).param == "max_tokens"
    assert "echo" in refusal(CompletionRequest, {"prompt": "hi", "max_tokens": 0}).message
    parse(CompletionRequest, json.dumps({"prompt": "hi", "max_tokens": 0, "echo": True,
                                         "logprobs": 1}).encode())


def test_stream_options_only_with_a_stream():
    for kind, body in ((ChatRequest, {"messages": [{"role": "user", "content": "hi"}]}),
                       (CompletionRequest, {"prompt": "hi"})):
        opts = {"stream_options": {"include_usage": True}}
        assert refusal(kind, {**body, **opts}).param == "stream_options"
        parse(kind, json.dumps({**body, **opts, "stream": True}).encode())


def test_the_deepest_body_json_reads_is_answered_400():
    """As deep as json.loads goes: the surrogate walk must not recurse past the limit."""
    depth = 600  # json.loads: one frame a level; a recursive walk took two
    with pytest.raises(ApiError) as info:
        parse(CompletionRequest, ('{"prompt": ' + "[" * depth + "]" * depth + "}").encode())
    assert (info.value.status, info.value.param) == (400, "prompt")
