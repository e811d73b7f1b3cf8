"""Bits per stage chosen to meet a budget (planning.bits, `plan --fit-bits`): the least
aggressive format per device that fits, slow devices and few layers first, a refusal with
the numbers when int4 is not enough, and the choice round-trips through the plan file."""

from __future__ import annotations

import json

import pytest

from llamadist.config import QUANTIZE_FORMATS, ConfigError, named_shape, quantize_for
from llamadist.planning.bits import LADDER, choose_bits, quantize_spec
from llamadist.planning.checks import plan_problems
from llamadist.planning.devices import parse_devices
from llamadist.planning.layout import Layout, layout_quantize
from llamadist.planning.plan import KIND_FORMATS, Plan
from llamadist.planning.profile import layer_bytes, profile
from llamadist.planning.strategies import make_plan
from llamadist.planning.units import PlanningError

KW = dict(batch_size=1, max_seq_len=4096)


def _choose(shape, devices, budgets, dtype="bfloat16", speeds=None, strategy=None):
    prof = profile(named_shape(shape), dtype=dtype, seq_len=4096)
    specs = parse_devices(devices, budgets, speeds)
    return prof, specs, choose_bits(prof, specs, strategy, **KW)


def test_kind_formats_agree_with_what_a_run_accepts():
    for kind, dev in (("cuda", "cuda:0"), ("cpu", "cpu")):
        for fmt in QUANTIZE_FORMATS:  # int4-gN too: a CPU takes int4-g32 only
            if fmt in KIND_FORMATS[kind]:
                assert quantize_for(fmt, dev) == fmt
            else:
                with pytest.raises(ConfigError):
                    quantize_for(fmt, dev)
        assert all(f in KIND_FORMATS[kind] for f in LADDER if f)


def test_a_model_that_fits_is_not_quantized():
    prof, specs, c = _choose("llama3-8b", "cuda:0", "80GB")
    assert c.formats == (None,) and quantize_spec(c.plan) is None
    assert c.plan == make_plan(prof, specs, None, **KW)


def test_70b_on_one_h200_is_quantized_to_fit():
    prof, specs, c = _choose("llama3-70b", "cuda:0", "141GB")
    assert plan_problems(make_plan(prof, specs, None, **KW))      # bf16 does not fit
    assert c.formats[0] in ("int8", "int4") and not plan_problems(c.plan)
    assert c.formats == ("int8",)                                 # the least aggressive
    assert c.plan.stages[0].memory_bytes <= 141e9 * 0.9


def test_8b_on_a_24gb_gpu_and_the_cpu_quantizes_only_the_cpu_and_few_layers():
    # float32 is the dtype of a GPU + CPU run: 32 GB of weights for 24 GB + 12 GB
    prof, specs, c = _choose("llama3-8b", "cuda:0,cpu", "24GB,12GB", dtype="float32")
    assert plan_problems(make_plan(prof, specs, None, **KW))
    assert c.formats == (None, "int8")
    gpu, cpu = c.plan.stages
    # the fewest layers quantized: one more layer would not fit the GPU's budget
    assert make_plan(prof, specs, "custom", boundaries=f"0:{gpu.end + 1},{gpu.end + 1}:32",
                     formats=c.formats, **KW).stages[0].shortfall_bytes > 0
    assert quantize_spec(c.plan) == "cuda:0=none,cpu=int8"


def test_the_slower_of_two_devices_is_quantized_first():
    prof, specs, c = _choose("llama3-8b", "cuda:0,cuda:1", "9GB,9GB", speeds="1,0.2")
    assert c.formats == (None, "int8")
    _, _, swapped = _choose("llama3-8b", "cuda:0,cuda:1", "9GB,9GB", speeds="0.2,1")
    assert swapped.formats == ("int8", None)


def test_int8_on_two_devices_comes_before_int4_on_one():
    _, _, c = _choose("llama3-8b", "cuda:0,cuda:1", "6.5GB,6.5GB")
    assert c.formats == ("int8", "int8")


def test_refuses_with_the_numbers_when_int4_does_not_fit():
    with pytest.raises(PlanningError, match=r"even with every decoder layer in int4 .*"
                       r"needs [\d.]+ GiB more .*budget 30000000000 bytes"):
        _choose("llama3-70b", "cuda:0", "30GB")


def test_the_plan_file_keeps_the_formats_and_refuses_bad_ones(tmp_path):
    _, _, c = _choose("llama3-8b", "cuda:0,cpu", "24GB,12GB", dtype="float32")
    back = Plan.load(c.plan.save(tmp_path / "p.json"))
    assert back == c.plan and back.stages[1].weight_format == "int8"
    d = c.plan.to_dict()
    d["stages"][1]["weight_format"] = "fp8"
    with pytest.raises(PlanningError, match=r"stages\[1\].weight_format.*fp8 does not run on "
                       r"cpu \(cpu runs int8, int4, int4-g32\)"):
        Plan.from_dict(d, "p.json")
    d["stages"][1]["weight_format"] = "int9"
    with pytest.raises(PlanningError, match="unknown weight format 'int9'"):
        Plan.from_dict(d, "p.json")


def test_layout_quantize_turns_plan_formats_into_a_run_quantize():
    _, _, c = _choose("llama3-8b", "cuda:0,cpu", "24GB,12GB", dtype="float32")
    one = Layout(tuple(s.layers for s in c.plan.stages), c.plan.devices, plan=c.plan)
    assert layout_quantize(one, None) == "cuda:0=none,cpu=int8"
    assert layout_quantize(one, "int4") == "int4"           # already checked against the plan
    assert layout_quantize(Layout(one.layer_ranges, one.devices), None) is None  # no plan
    over = Layout(one.layer_ranges, ("cuda", "cuda"), processes=2, plan=c.plan)
    with pytest.raises(PlanningError, match="one process only"):
        layout_quantize(over, None)
    shared = Layout(one.layer_ranges, ("cpu", "cpu"), plan=c.plan)
    with pytest.raises(PlanningError, match="two stages on cpu different weight formats"):
        layout_quantize(shared, None)
    # a process handed the layout as JSON (no plan) loads the formats its front planned
    again = Layout.from_json(one.to_json())
    assert again.plan is None and again.stage_formats == (None, "int8")
    assert layout_quantize(again, None) == "cuda:0=none,cpu=int8"
    auto = Layout(one.layer_ranges, ("cuda", "cuda"), processes=2, weight_formats=("int4",) * 2)
    assert layout_quantize(Layout.from_json(auto.to_json()), None) == "int4"
    assert Layout.from_json(Layout(one.layer_ranges, one.devices).to_json()).stage_formats == ()


def test_plan_fit_bits_command(tmp_path, capsys):
    from llamadist.cli.main import main
    path = tmp_path / "p.json"
    assert main(["plan", "llama3-70b", "--devices", "cuda:0", "--max-memory", "141GB",
                 "--max-seq-len", "4096", "--fit-bits", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    prof = profile(named_shape("llama3-70b"), seq_len=4096)
    saved = prof.layers[0].weight_bytes - layer_bytes(prof.layers[0], "int8", "cuda", 2)
    from llamadist.planning.units import format_bytes
    assert f"int8, {format_bytes(prof.layers[0].weight_bytes - saved)} per decoder layer" in out
    assert f"({format_bytes(saved)} saved per layer" in out
    assert "80 of 80 decoder layers quantized" in out
    assert json.loads(path.read_text())["stages"][0]["weight_format"] == "int8"
    # without --fit-bits the same request fails and says what would fix it
    assert main(["plan", "llama3-70b", "--devices", "cuda:0", "--max-memory", "141GB",
                 "--max-seq-len", "4096"]) != 0
    assert "--fit-bits chooses weight formats" in capsys.readouterr().err
    assert main(["plan", "llama3-70b", "--devices", "cuda:0", "--max-memory", "141GB",
                 "--fit-bits", "--quantize", "int4"]) != 0
    assert "--fit-bits chooses each device's weight format: drop --quantize int4" in \
        capsys.readouterr().err


def test_plan_auto_fit_bits_command(tmp_path, capsys):
    from llamadist.cli.main import main
    path = tmp_path / "a.json"
    assert main(["plan", "llama3-70b", "--auto", "--devices", "cuda:0", "--max-memory",
                 "141GB", "--max-seq-len", "4096", "--fit-bits", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bits: it does not fit in bfloat16; every decoder layer in int8" in out
    assert Plan.load(path).stages[0].weight_format == "int8"
    assert main(["plan", "llama3-8b", "--auto", "--devices", "cuda:0", "--max-memory",
                 "80GB", "--fit-bits"]) == 0
    assert "bits: the model fits in bfloat16; no layer quantized" in capsys.readouterr().out


def test_stages_over_processes_get_one_format(capsys):
    from llamadist.cli.main import main
    _, _, apart = _choose("llama3-8b", "cuda:0,cuda:1", "9GB,9GB", speeds="1,0.2")
    assert apart.formats == (None, "int8")               # in one process: the slow one only
    assert main(["plan", "llama3-8b", "--devices", "cuda", "--pp", "2", "--max-memory",
                 "9GB,9GB", "--device-speed", "1,0.2", "--fit-bits"]) == 0
    out = capsys.readouterr().out
    stages = [line for line in out.splitlines() if line.startswith("stage ") and "(" in line]
    assert len(stages) == 2 and all("): int8, " in line for line in stages)
    assert "32 of 32 decoder layers quantized" in out


def test_plan_of_a_saved_plan_keeps_its_formats(tmp_path, capsys):
    from llamadist.cli.main import main
    path = tmp_path / "p.json"
    flags = ["--devices", "cuda:0,cpu", "--max-memory", "24GB,12GB", "--max-seq-len", "4096"]
    assert main(["plan", "llama3-8b", *flags, "--fit-bits", "--save", str(path)]) == 0
    capsys.readouterr()
    assert main(["plan", "llama3-8b", *flags, "--plan", str(path), "--json"]) == 0
    again = Plan.from_json(capsys.readouterr().out)
    assert [s.weight_format for s in again.stages] == [None, "int8"]
    assert again.boundaries == Plan.load(path).boundaries


def test_plan_auto_that_does_not_fit_points_to_fit_bits(capsys):
    from llamadist.cli.main import main
    assert main(["plan", "llama3-70b", "--auto", "--devices", "cuda:0", "--max-memory",
                 "141GB"]) != 0
    assert "--fit-bits finds the weight format" in capsys.readouterr().err


def test_quantized_profile_counts_the_larger_kind():
    from llamadist.planning.profile import quantized_profile
    prof = profile(named_shape("llama3-8b"), dtype="bfloat16", seq_len=1024)
    both = quantized_profile(prof, "int4", ["cuda", "cpu"])
    row, q = prof.layers[0], both.layers[0]
    gpu, cpu = (layer_bytes(row, "int4", k, 2) for k in ("cuda", "cpu"))
    assert gpu != cpu and q.weight_bytes == max(gpu, cpu)
    assert row.weight_bytes - q.weight_bytes == row.active_weight_bytes - q.active_weight_bytes
    assert both.embed == prof.embed and both.head == prof.head     # not quantized
    assert quantized_profile(prof, None) is prof


def test_auto_counts_the_quantize_format(tmp_path, capsys):
    """--auto with --quantize FMT plans the weights as the run loads them (it planned the
    float model and refused what fits quantized); a per-device spec, or a format a device
    cannot run, is refused by name."""
    import argparse

    from llamadist.cli.layout import auto_layout
    from llamadist.cli.main import main
    from llamadist.config import RuntimeConfig
    flags = ["plan", "llama3-70b", "--auto", "--devices", "cuda:0", "--max-memory", "141GB",
             "--max-seq-len", "4096"]
    assert main(flags) != 0
    path = tmp_path / "a.json"
    assert main([*flags, "--quantize", "int4", "--save", str(path)]) == 0
    assert {s.weight_format for s in Plan.load(path).stages} == {"int4"}
    capsys.readouterr()
    assert main([*flags, "--quantize", "cuda:0=int4"]) != 0
    assert "one weight format for every device" in capsys.readouterr().err
    # the run commands' --auto (cli.layout): Llama-3-8B on a 20 GB CPU fits in int8 only
    config = named_shape("llama3-8b")
    args = argparse.Namespace(devices="cpu", max_memory="20GB", device_speed=None)
    with pytest.raises(PlanningError):
        auto_layout(config, args, RuntimeConfig(), 1024, 1)
    layout = auto_layout(config, args, RuntimeConfig(quantize="int8"), 1024, 1)
    assert layout.pp == 1 and layout.processes == 1
    with pytest.raises(PlanningError, match="fp8 does not run on cpu"):
        auto_layout(config, args, RuntimeConfig(quantize="fp8"), 1024, 1)
