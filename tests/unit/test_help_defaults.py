"""--help says what the flags do and what their defaults are (the parser's own and the
code's)."""

from __future__ import annotations

import argparse

import pytest

from llamadist import config as config_mod
from llamadist.cli.main import build_parser
from llamadist.config import RuntimeConfig


def subparser(cmd: str) -> argparse.ArgumentParser:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices[cmd]


def option(cmd: str, flag: str) -> argparse.Action:
    return next(a for a in subparser(cmd)._actions if flag in a.option_strings)


@pytest.mark.parametrize("gpu", [True, False])
def test_devices_help_names_the_default_the_code_takes(monkeypatch, gpu):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    text = option("generate", "--devices").help
    default = config_mod.default_devices()
    assert default == ("cuda:0" if gpu else "cpu")
    said = text.split("default: ")[1]
    assert (said.startswith(f"{default} when a GPU is present") if gpu
            else f"else {default}" in said), text
    assert "(default: cpu)" not in text


def test_timeout_help_says_a_lost_rank_is_handled_by_on_failure():
    text = " ".join(option("generate", "--timeout").help.split())
    assert "every process exits" not in text and "--on-failure" in text
    assert f"default {RuntimeConfig().timeout:.0f}" in text
    assert "restart" in option("generate", "--on-failure").choices


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_sampling_flags_have_help_with_the_parser_default(cmd):
    flags = ["--max-new-tokens", "--top-k", "--top-p", "--min-p", "--repetition-penalty",
             "--seed"]
    for flag in flags:
        act = option(cmd, flag)
        assert act.help, f"{cmd} {flag} has no help"
        if act.default is not None:
            assert f"default {act.default}" in act.help, (flag, act.help)


def test_chat_help_says_its_default_and_the_halving():
    act = option("chat", "--max-new-tokens")
    assert act.default == 512 and "default 512" in act.help and "half the KV cache" in act.help
    assert "half" not in option("generate", "--max-new-tokens").help
