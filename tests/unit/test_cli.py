"""The CLI end to end on a tiny model: JSON output, streaming, chat, bench."""

import json
import subprocess
import sys

from llamadist.cli import main


def test_generate_json(capsys, tiny_model):
    code = main(["generate", str(tiny_model), "--prompt", "The quick brown fox", "--prompt",
                 "1 2 3", "--max-new-tokens", "8", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"prompt_token_ids", "token_ids", "text", "stats"}
        assert 0 < len(row["token_ids"]) <= 8
        assert row["stats"]["prefill_s"] > 0


def test_generate_streams_same_text_as_json(capsys, tiny_model):
    args = ["generate", str(tiny_model), "--prompt", "Once upon a time", "--max-new-tokens", "12"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert streamed == row["text"] + "\n"


def test_split_generate_matches_unsplit(capsys, tiny_model):
    base = ["generate", str(tiny_model), "--prompt", "Distributed inference", "--max-new-tokens",
            "10", "--json"]
    main(base)
    one = json.loads(capsys.readouterr().out)["token_ids"]
    main(base + ["--devices", "cpu,cpu,cpu", "--boundaries", "0:1,1:3,3:5"])
    three = json.loads(capsys.readouterr().out)["token_ids"]
    assert one == three


def test_chat_session_via_python_m(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "llamadist", "chat", str(tiny_model),
                           "--max-new-tokens", "5"], input="hello\n/reset\nagain\n/quit\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "history cleared" in proc.stderr


def test_chat_exits_cleanly_on_eof(tiny_model):
    proc = subprocess.run([sys.executable, "-m", "llamadist", "chat", str(tiny_model),
                           "--max-new-tokens", "3"], input="hi\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_bench_json(capsys, tiny_model):
    assert main(["bench", str(tiny_model), "--batch", "2", "--prompt-len", "16", "--gen-len", "4",
                 "--devices", "cpu,cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["batch"] == 2 and len(rep["stages"]) == 2
    assert all(s["compute_s"] > 0 for s in rep["stages"])


def test_plan_save_then_generate_with_plan(capsys, tiny_model, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["plan", str(tiny_model), "--devices", "cpu,cpu", "--strategy", "compute",
                 "--device-speed", "1,3", "--save", str(plan)]) == 0
    capsys.readouterr()
    base = ["generate", str(tiny_model), "--prompt", "The quick brown fox", "--max-new-tokens",
            "8", "--json"]
    assert main(base + ["--plan", str(plan)]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    assert planned["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]


def test_sharded_safetensors_checkpoint(capsys, tiny_model, tmp_path):
    """A checkpoint saved in several shards with an index loads to the same tokens."""
    import torch
    from transformers import LlamaForCausalLM
    import shutil
    out = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).save_pretrained(
        out, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, out / f)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    base = ["--prompt", "Once upon a time", "--max-new-tokens", "8", "--json"]
    assert main(["generate", str(out)] + base) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert main(["generate", str(tiny_model)] + base) == 0
    assert sharded["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]


def test_analyze_json(capsys, tiny_model):
    assert main(["analyze", str(tiny_model), "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["layers"] and len(prof["layers"]) == 5
