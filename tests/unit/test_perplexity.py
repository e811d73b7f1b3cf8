"""`llamadist perplexity`: windows, scoring and the +/- as llama.cpp's llama-perplexity, the
tiny model's value from transformers' logits, and SmolLM2 Q4_1 native against its
dequantized float32 run."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from llamadist.cli.main import main
from llamadist.generation.perplexity import PerplexityMeter, make_windows
from tests.tiny import CORPUS

README = Path(__file__).resolve().parents[2] / "README.md"


def run_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_windows_drop_the_tail_and_take_bos():
    ids = list(range(10, 31))  # 21 tokens: two windows of 8, 5 left over
    assert make_windows(ids, 8, None) == [ids[0:8], ids[8:16]]
    assert make_windows(ids, 8, 1) == [[1] + ids[1:8], [1] + ids[9:16]]
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(ids[:5], 8, None)
    with pytest.raises(ValueError, match="at least 4"):
        make_windows(ids, 2, None)


def test_meter_scores_the_second_half_with_the_standard_error():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 11, generator=g)
    wins = torch.randint(0, 11, (3, 8), generator=g)
    m = PerplexityMeter(8)
    m.add(logits[:2], wins[:2])
    m.add(logits[2:], wins[2:])
    r = m.result()
    # by hand: rows 4..6 predict tokens 5..7 of each window
    lp = torch.log_softmax(logits.double(), -1)[:, 4:7]
    nll = -lp.gather(-1, wins[:, 5:8].unsqueeze(-1)).flatten()
    assert r.tokens == 9 and r.windows == 3
    assert math.isclose(r.ppl, math.exp(nll.mean().item()), rel_tol=1e-6)
    assert math.isclose(r.ppl_err, nll.std().item() / 3 * r.ppl, rel_tol=1e-5)


def test_tiny_perplexity_equals_transformers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from llamadist.weights.checkpoint import open_checkpoint
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS[:15]))
    got = run_json(["perplexity", str(tiny_model), "--text", str(text), "--ctx", "32",
                    "--batch", "2", "--json"])
    tok = open_checkpoint(tiny_model).tokenizer()
    ids = tok.encode(text.read_text(), add_special_tokens=False)
    wins = torch.tensor([ids[s:s + 32] for s in range(0, len(ids) - 31, 32)])
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(hf(wins).logits.double(), -1)[:, 16:31]
    nll = -lp.gather(-1, wins[:, 17:].unsqueeze(-1)).flatten()
    assert got["windows"] == wins.shape[0] >= 3 and got["tokens_scored"] == nll.numel()
    assert math.isclose(got["ppl"], math.exp(nll.mean().item()), rel_tol=1e-4)
    assert math.isclose(got["ppl_err"], got["ppl"] * nll.std().item() / nll.numel() ** 0.5,
                        rel_tol=1e-3)


def test_smollm2_q4_1_native_within_1pct_of_float32(smollm2, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(README.read_text()[:4000])
    args = ["perplexity", str(smollm2), "--text", str(text), "--ctx", "64", "--chunks", "6",
            "--batch", "3", "--json"]
    native = run_json(args)
    dense = run_json(args + ["--weights", "float32"])
    assert native["weights"] == "native" and dense["weights"] == "float32"
    assert native["tokens_scored"] == dense["tokens_scored"] == 6 * 31
    assert 1 < native["ppl"] < 1000
    assert abs(native["ppl"] / dense["ppl"] - 1) <= 0.01, (native["ppl"], dense["ppl"])


def test_perplexity_refuses_a_context_above_the_model(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    assert main(["perplexity", str(tiny_model), "--text", str(text), "--ctx", "4096"]) == 2
    assert "above the model's context" in capsys.readouterr().err
    assert main(["perplexity", str(tiny_model), "--text", str(tmp_path / "no.txt")]) == 2
