"""Bits per stage in planning: each stage's --quantize format counted in its real bytes
(planning.profile.layer_bytes), so the memory strategy fits more layers on a small
device, a model that did not fit now does, and the plan records each stage's format."""

from __future__ import annotations

import pytest

from llamadist.config import named_shape
from llamadist.kernels import wquant
from llamadist.planning.devices import parse_devices
from llamadist.planning.plan import Plan
from llamadist.planning.profile import layer_bytes, profile, quantized_matrix_bytes
from llamadist.planning.strategies import make_plan
from llamadist.planning.units import PlanningError

CFG = named_shape("llama3-8b")
PROF = profile(CFG, dtype="bfloat16", seq_len=1024)


def test_bytes_match_what_the_loader_stores():
    import torch
    for n, k in [(40, 300), (64, 256)]:
        w = torch.randn(n, k)
        for fmt in ("int8", "int4", "fp8", "int4-g32", "int4-g64", "int4-g256"):
            assert quantized_matrix_bytes(n, k, fmt, "cuda") == wquant.quantize(w, fmt).nbytes
        for fmt in ("int8", "int4", "int4-g32"):
            if k % 32 == 0:
                assert (quantized_matrix_bytes(n, k, fmt, "cpu")
                        == wquant.to_gguf_blocks(w, fmt).nbytes)
    row = PROF.layers[0]
    # Llama-3-8B: 218 M weights a layer in its linears, ~416 MiB in bf16
    int4 = layer_bytes(row, "int4", "cuda", 2)
    int8 = layer_bytes(row, "int8", "cuda", 2)
    assert 0.27 < int4 / row.weight_bytes < 0.29 and 0.5 < int8 / row.weight_bytes < 0.51


def _plan(formats, budgets="4GiB,20GiB", strategy="memory"):
    specs = parse_devices("cuda:0,cuda:1", budgets, check_available=False)
    return make_plan(PROF, specs, strategy=strategy, batch_size=1, max_seq_len=1024,
                     config=CFG, formats=formats)


def test_memory_strategy_fits_more_layers_on_a_small_device_with_int4():
    dense = _plan(None)
    small = _plan(["int4", None])
    assert small.stages[0].num_layers > dense.stages[0].num_layers
    assert small.stages[0].weight_format == "int4" and small.stages[1].weight_format is None
    per_layer = layer_bytes(PROF.layers[0], "int4", "cuda", 2)
    embed = PROF.embed.weight_bytes
    assert small.stages[0].weight_bytes == embed + per_layer * small.stages[0].num_layers
    # the field survives the plan file
    assert Plan.from_json(small.to_json()).stages[0].weight_format == "int4"


def test_a_model_too_big_for_two_small_gpus_fits_in_int4():
    with pytest.raises(PlanningError, match="needs .* more"):
        _plan(None, "5GiB,5GiB")
    fit = _plan(["int4", "int4"], "5GiB,5GiB")
    assert sum(s.num_layers for s in fit.stages) == 32
    assert all(s.weight_bytes + s.kv_bytes <= 5 * 2 ** 30 for s in fit.stages)


def test_plan_command_notes_the_bytes_saved(capsys):
    from llamadist.cli.main import main
    assert main(["plan", "llama3-8b", "--devices", "cuda:0,cpu", "--max-memory",
                 "10GiB,64GiB", "--dtype", "bfloat16", "--quantize", "cuda:0=int4,cpu=int8",
                 "--max-seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "weights int4 on cuda: 117.02 MiB per decoder layer instead of 416.02 MiB" in out
    assert "weights int8 on cpu: 221.02 MiB" in out


def test_int4_group_formats_in_plans():
    """int4-gN: its scale and offset bytes per group, kept in the plan file; a CPU stage
    plans int4-g32 (GGUF Q4_1) and refuses another group."""
    from llamadist.planning.plan import format_problem
    row = PROF.layers[0]
    extra = sum(8 * n * (k // 32 - k // 128) for n, k in row.linear_shapes)
    assert layer_bytes(row, "int4-g32", "cuda", 2) - layer_bytes(row, "int4", "cuda", 2) == extra
    assert layer_bytes(row, "int4-g128", "cuda", 2) == layer_bytes(row, "int4", "cuda", 2)
    fit = _plan(["int4-g32", "int4-g64"], "5GiB,5GiB")
    assert [s.weight_format for s in Plan.from_json(fit.to_json()).stages] == [
        "int4-g32", "int4-g64"]
    assert format_problem("int4-g32", "cpu") is None
    assert "int4-g128 does not run on cpu" in format_problem("int4-g128", "cpu")
    assert "unknown weight format 'int4-g48'" in format_problem("int4-g48", "cuda:0")


def test_plan_counts_a_quantized_head_on_the_last_stage(capsys):
    """--quantize-head: `plan` counts the last stage's head in its format (Llama-3-8B's
    bf16 head 1.05 GB, 0.53 GB in int8); without --quantize it is refused."""
    import json

    from llamadist.cli.main import main
    args = ["plan", "llama3-8b", "--devices", "cuda:0,cuda:1", "--max-memory", "40GiB,40GiB",
            "--quantize", "int8", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--quantize-head"]) == 0
    head = json.loads(capsys.readouterr().out)
    first, last = (s["weight_bytes"] for s in plain["stages"])
    assert head["stages"][0]["weight_bytes"] == first
    v, d = CFG.vocab_size, CFG.hidden_size
    assert last - head["stages"][1]["weight_bytes"] == 2 * v * d - (v * d + 4 * v)
    assert main(args[:-3] + ["--json", "--quantize-head"]) == 2
    assert "--quantize-head quantizes the head" in capsys.readouterr().err


def test_auto_and_fit_bits_count_a_quantized_head(capsys):
    """`plan --auto --quantize int8 --quantize-head` costs the head in int8 (the weights it
    reports are smaller by the head's saving); under --fit-bits (formats chosen later) a
    tied head is counted as its own copy as stored: an upper bound."""
    import json

    from llamadist.cli.main import main
    from llamadist.planning.profile import planned_head
    args = ["plan", "llama3-8b", "--auto", "--gpus", "1", "--gpu-memory", "40GiB",
            "--quantize", "int8", "--json"]
    outs = []
    for extra in ([], ["--quantize-head"]):
        assert main(args + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] != outs[1]
    tied = profile(named_shape("smollm2-135m"), dtype="float32", seq_len=256)
    later = planned_head(tied, True, chosen_later=True)
    assert tied.tied_bytes > 0 and later.tied_bytes == 0
    assert later.head.weight_bytes == tied.head.weight_bytes
    assert planned_head(tied, False, ["int8"]) is tied
    json.loads(outs[1])  # (valid JSON)
