"""One check on the real SmolLM2 checkpoint: its chat template, its tokenizer and a
sensible greedy answer through the openai client, streamed."""

import pytest

from tests.serve.conftest import ServerProcess

import openai  # a test dependency: missing, the tests fail (they never skip)


@pytest.mark.slow
def test_smollm2_answers_through_the_api(smollm2, tmp_path):
    server = ServerProcess(smollm2, "--max-seq-len", "512", "--max-batch", "2",
                           log_path=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        [model] = [m.id for m in client.models.list()]
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0, stream=True)
        reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        assert server.stop() == 0
    assert "Paris" in reply, reply
