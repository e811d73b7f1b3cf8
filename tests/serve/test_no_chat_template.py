"""A model without a chat template: /v1/chat/completions answers 400 pointing the HTTP
client at /v1/completions (it said "use `llamadist generate --prompt`", a CLI command)."""

import json
import shutil

import pytest

from llamadist.serve.openai_api import Frontend
from llamadist.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse
from llamadist.weights.checkpoint import open_checkpoint


def frontend(path) -> Frontend:
    tok = open_checkpoint(str(path)).tokenizer()
    return Frontend(None, tok, "m", 64, 1 << 20)   # no engine: only the job is built


def test_chat_without_a_template_points_at_completions(tiny_model, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model, folder)
    cfg = folder / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    assert data.pop("chat_template", None)   # the tiny model has one to remove
    cfg.write_text(json.dumps(data))
    front = frontend(folder)
    body = parse(ChatRequest, b'{"messages": [{"role": "user", "content": "hi"}]}')
    with pytest.raises(ApiError) as info:
        front.chat_job(body)
    assert info.value.status == 400 and info.value.param == "messages"
    assert "/v1/completions" in info.value.message and "llamadist generate" not in \
        info.value.message
    # the completions endpoint takes the same model
    job = front.completion_job(parse(CompletionRequest, b'{"prompt": "hi", "max_tokens": 2}'))
    assert job.kind == "completion"
    # and a model with a template still chats
    assert frontend(tiny_model).chat_job(body).kind == "chat"
