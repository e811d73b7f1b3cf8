"""LLM.generate / stream / encode take a text or a chat history; anything else (token ids,
a dict, an empty list) is a TypeError that says what a prompt is and where token ids go,
not a chat-template error about an 'int object'."""

import pytest

from llamadist import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), max_seq_len=64, max_batch=2)


@pytest.mark.parametrize("prompt, says", [
    ([1, 2, 3], "a list of token ids"), ([], "an empty list"), ({"role": "user"}, "dict"),
    (7, "int")])
def test_a_prompt_that_is_neither_text_nor_chat_is_refused(llm, prompt, says):
    for call in (lambda: llm.encode(prompt), lambda: llm.generate([prompt], max_new_tokens=2),
                 lambda: list(llm.stream(prompt, max_new_tokens=2))):
        with pytest.raises(TypeError) as info:
            call()
        assert says in str(info.value) and "llm.run" in str(info.value)


def test_text_chat_and_token_ids_through_run_still_work(llm):
    ids = llm.encode("hello")
    assert ids and all(isinstance(t, int) for t in ids)
    assert llm.encode([{"role": "user", "content": "hello"}])
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    via_text = llm.generate("hello", params)[0]
    reqs, _ = llm.run([ids], params)
    assert reqs[0].output_ids == via_text.token_ids and len(via_text.token_ids) == 2


def test_chat_with_a_string_is_one_user_message(llm, monkeypatch):
    sent = []
    monkeypatch.setattr(llm, "stream_ids", lambda ids, *a, **k: sent.append(ids) or iter(["x"]))
    assert llm.chat("hello", max_new_tokens=2) == "x"
    assert sent == [llm.tokenizer.encode_chat([{"role": "user", "content": "hello"}])]
    assert sent[0] != llm.tokenizer.encode("hello")
