"""`plan`'s defaults as the README states them: without --devices it plans every device
here, in the dtype those devices get (bfloat16 when every one is a GPU); `--auto --gpus N`
plans N imagined GPUs in bfloat16, not in the CPU's float32."""

import json

import llamadist.planning.devices as devmod
from llamadist.cli.main import main

GIB = 1 << 30


def test_auto_gpus_plans_in_bfloat16(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devmod, "_cuda_inventory", lambda: [])   # a machine without GPUs
    path = tmp_path / "auto.json"
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "2", "--save", str(path)]) == 0
    assert json.loads(path.read_text())["dtype"] == "bfloat16"
    # an explicit --dtype still wins
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "2", "--dtype", "float32",
                 "--save", str(path)]) == 0
    assert json.loads(path.read_text())["dtype"] == "float32"
    capsys.readouterr()


def test_plan_without_devices_plans_the_gpus_here(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devmod, "_cuda_inventory",
                        lambda: [("NVIDIA H100 80GB HBM3", 80 * GIB)] * 2)
    path = tmp_path / "plan.json"
    assert main(["plan", "llama3-8b", "--save", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert [s["device"] for s in saved["stages"]] == ["cuda:0", "cuda:1"]
    assert saved["dtype"] == "bfloat16"
    capsys.readouterr()


def test_plan_without_devices_on_a_cpu_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devmod, "_cuda_inventory", lambda: [])
    path = tmp_path / "plan.json"
    assert main(["plan", "smollm2-135m", "--save", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert [s["device"] for s in saved["stages"]] == ["cpu"]
    assert saved["dtype"] == "float32"
    capsys.readouterr()


def test_a_plan_file_for_gpus_is_costed_in_bfloat16(tmp_path, monkeypatch, capsys):
    """`plan MODEL --plan FILE` without --devices plans the file's devices: GPUs in
    bfloat16 (it took the CPU's float32 and doubled every stage's weights)."""
    monkeypatch.setattr(devmod, "_cuda_inventory", lambda: [])
    first, again = tmp_path / "gpus.json", tmp_path / "again.json"
    assert main(["plan", "llama3-8b", "--devices", "cuda:0,cuda:1", "--max-memory",
                 "80GB,80GB", "--save", str(first)]) == 0
    assert main(["plan", "llama3-8b", "--plan", str(first), "--max-memory", "80GB,80GB",
                 "--save", str(again)]) == 0
    saved = json.loads(again.read_text())
    assert saved["dtype"] == "bfloat16"
    assert [s["device"] for s in saved["stages"]] == ["cuda:0", "cuda:1"]
    capsys.readouterr()
