"""`llamadist chat` on a model whose context is shorter than chat's default reply length
(512 new tokens): every message was refused ("lower --max-new-tokens to ..."). The default
now shrinks to half the KV cache; a --max-new-tokens the user gave that leaves no room is
refused before the model loads; a message too long for the cache says it was not sent."""

import pytest

from llamadist.cli.chat import ChatSession
from llamadist.cli.jobs import chat_job, flag_given
from llamadist.cli.main import build_parser, main
from llamadist.generation.sampling import SamplingParams
from llamadist.weights.checkpoint import open_checkpoint


def job_for(model, *flags):
    args = build_parser().parse_args(["chat", str(model), *flags])
    args.argv = ["chat", str(model), *flags]
    ckpt = open_checkpoint(str(model))
    return chat_job(args, ckpt, ckpt.tokenizer())


def test_the_default_reply_fits_a_short_context(tiny_model, capsys):
    context = open_checkpoint(str(tiny_model)).config.max_position_embeddings
    assert context < 512   # the tiny model's: below chat's default reply length
    job = job_for(tiny_model)
    assert job.params.max_new_tokens == job.max_seq_len // 2
    assert "replies of at most" in capsys.readouterr().err
    job = job_for(tiny_model, "--max-seq-len", "64")
    assert (job.max_seq_len, job.params.max_new_tokens) == (64, 32)
    assert job_for(tiny_model, "--max-new-tokens", "20").params.max_new_tokens == 20


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--max-new-tokens=", "--max-new"])
def test_a_given_reply_length_that_leaves_no_room_is_refused(tiny_model, capsys, flag):
    argv = [flag + "300"] if flag.endswith("=") else [flag, "300"]
    assert main(["chat", str(tiny_model), *argv]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 300 leaves no room" in err and "below" in err


def test_flag_given_reads_the_command_line():
    class Args:
        argv = ["chat", "m", "--max-new", "3", "--", "--max-new-tokens"]
    assert flag_given(Args, "--max-new-tokens")
    Args.argv = ["chat", "m", "--max-seq-len", "3"]
    assert not flag_given(Args, "--max-new-tokens")


def test_a_message_too_long_is_not_sent(tiny_model, monkeypatch, capsys):
    tok = open_checkpoint(str(tiny_model)).tokenizer()
    lines = iter(["word " * 100, "hi"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    chat = ChatSession(None, tok.encode_chat, 32)
    ids = chat.next_prompt(SamplingParams(max_new_tokens=8))
    assert ids == tok.encode_chat([{"role": "user", "content": "hi"}])
    assert "this message was not sent" in capsys.readouterr().err
