"""A quantized checkpoint planned in the bytes a run holds it in (issue 16): `--weights
native` counts each GGUF tensor in its own format (as stored on a CPU stage; the decoder
linears' int8 / int4 conversion on a GPU stage), `--weights float32` in float. `plan`, a
run's memory check, `--auto` and `--fit-bits` all count the same bytes."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch

from llamadist.cli import main
from llamadist.cli.layout import held_weights
from llamadist.cli.plan import plan_and_text
from llamadist.config import RuntimeConfig
from llamadist.kernels.quant_ref import FORMATS
from llamadist.kernels.wquant import from_gguf
from llamadist.planning.bits import auto_bits_note, auto_profile, choose_bits
from llamadist.planning.devices import parse_devices
from llamadist.planning.profile import layer_bytes, native_profile, profile
from llamadist.planning.units import format_bytes
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint
from llamadist.weights.gguf import hf_name
from llamadist.weights.loader import gguf_packed_bytes
from tests.quant_blocks import random_blocks


@functools.cache
def gguf_tensors(path: str) -> tuple[tuple[str, str, tuple[int, ...], int], ...]:
    """(name, type name, shape, bytes) of each tensor of a GGUF file, from gguf's own
    reader (not ours); read once a file: GGUFReader parses every metadata field, ~4 s for
    SmolLM2's vocabulary on CI's cores."""
    return tuple((t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes))
                 for t in gguf.GGUFReader(path).tensors)


def file_weight_bytes(path) -> int:
    """The bytes of every llama tensor of a GGUF file, read from the file's own index."""
    return sum(n_bytes for name, _, _, n_bytes in gguf_tensors(str(path)) if hf_name(name))


def cpu_plan(model, budget="20GB", weights="native", seq=256, **kw):
    ckpt = open_checkpoint(model)
    held = held_weights(str(model), weights, ckpt)
    dtype = RuntimeConfig(weights=weights).dtype_for("cpu")
    return plan_and_text(ckpt.config, "cpu", budget, None, None, None, None, 1, seq, dtype,
                         False, None, None, 0.1, 1, held=held, **kw)


def test_smollm2_native_planned_at_its_file_bytes(smollm2):
    plan, text = cpu_plan(smollm2)
    want = file_weight_bytes(smollm2)
    assert plan.stages[0].weight_bytes == want
    assert format_bytes(want) in text
    floats = cpu_plan(smollm2, weights="float32")[0]
    config = open_checkpoint(smollm2).config
    assert floats.stages[0].weight_bytes == profile(config, "float32").total_weight_bytes
    assert floats.stages[0].weight_bytes > 5 * want


def test_smollm2_auto_and_fit_bits_count_the_same_bytes(smollm2):
    ckpt = open_checkpoint(smollm2)
    held = held_weights(str(smollm2), "native", ckpt)
    prof = native_profile(profile(ckpt.config, "float32", seq_len=256), held)
    auto, fmt = auto_profile(prof, None, ["cpu"])
    assert fmt is None and auto.total_weight_bytes == file_weight_bytes(smollm2)
    # 300 MB: the float32 model (~513 MiB) would not fit, its stored blocks do, unquantized
    specs = parse_devices("cpu", "300MB")
    chosen = choose_bits(prof, specs, batch_size=1, max_seq_len=256)
    assert chosen.formats == (None,)
    assert chosen.plan.stages[0].weight_bytes == file_weight_bytes(smollm2)
    note = auto_bits_note(prof, None, ["cpu"])
    assert "fits as --weights native holds it; no layer quantized" in note, note
    # int4 on a CPU is Q4_1 again: the note weighs it against the layer as stored
    row = prof.layers[0]
    base, q = (layer_bytes(row, f, "cpu", prof.bytes_per_param) for f in (None, "int4"))
    assert base == q < row.weight_bytes / 5
    int4 = auto_bits_note(prof, "int4", ["cpu"])
    assert f"instead of {format_bytes(base)} ({format_bytes(0)} saved per layer" in int4, int4


def test_smollm2_generate_fits_300mb_and_a_small_budget_is_refused(smollm2, capsys):
    assert main(["generate", "smollm2-135m", "--max-memory", "300MB", "--prompt", "Hi",
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", "smollm2-135m", "--max-memory", "80MB", "--prompt", "Hi",
                 "--max-new-tokens", "3"]) != 0
    err = capsys.readouterr().err
    assert "does not fit" in err and "iB short" in err, err
    assert f"weights {format_bytes(file_weight_bytes(smollm2))}" in err, err


def test_tiny_q8_gguf_planned_at_what_a_cpu_stage_loads(tmp_path, monkeypatch):
    from tests.unit import test_gguf
    q8 = {leaf: gguf.GGMLQuantizationType.Q8_0 for leaf in test_gguf.LAYER_TYPES[0]}
    monkeypatch.setattr(test_gguf, "LAYER_TYPES", [q8] * test_gguf.LAYERS)
    path = tmp_path / "q8.gguf"
    test_gguf.write_tiny_gguf(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == "Q8_0"
    plan = cpu_plan(path, seq=64)[0]
    stage = build_stage(open_checkpoint(path), range(test_gguf.LAYERS), "cpu", torch.float32,
                        1, 64, runtime=RuntimeConfig(weights="native"))
    assert plan.stages[0].weight_bytes == stage.stats.load.bytes
    floats = cpu_plan(path, weights="float32", seq=64)[0]
    assert floats.stages[0].weight_bytes > 3 * plan.stages[0].weight_bytes


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gpu_conversion_bytes_match_from_gguf(name):
    qtype = next(t for t, f in FORMATS.items() if f[0] == name)
    n, k = 8, 512
    blocks = torch.from_numpy(random_blocks(qtype, n, k, np.random.default_rng(0)))
    assert gguf_packed_bytes(qtype, n, k) == from_gguf(blocks, qtype, (n, k)).nbytes


def test_smollm2_gpu_stage_counts_the_int_conversion_and_bf16_rest(smollm2):
    """On a GPU stage the decoder linears' blocks become int8 / int4 codes and scales
    (from_gguf, whose bytes the test above checks) and the rest dequantizes to bf16."""
    from llamadist.weights.loader import LAYER_LINEAR
    ckpt = open_checkpoint(smollm2)
    held = held_weights(str(smollm2), "native", ckpt)
    plan = plan_and_text(ckpt.config, "cuda:0", "10GB", None, None, None, None, 1, 256,
                         "bfloat16", False, None, None, 0.1, 1, held=held)[0]
    blocks = {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}
    want = 0
    for gguf_name, type_name, shape, _ in gguf_tensors(str(smollm2)):
        name = hf_name(gguf_name)
        if name is None:
            continue
        k, n = shape if len(shape) == 2 else (shape[0], 1)
        if LAYER_LINEAR.search(name) and type_name in blocks:
            want += gguf_packed_bytes(int(gguf.GGMLQuantizationType[type_name]), n, k)
        else:
            want += n * k * 2
    assert plan.stages[0].weight_bytes == want
    assert file_weight_bytes(smollm2) < want < profile(ckpt.config, "bfloat16").total_weight_bytes


def test_analyze_shows_the_bytes_a_run_holds(smollm2, capsys):
    assert main(["analyze", "smollm2-135m", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert format_bytes(file_weight_bytes(smollm2)) in total, out


def test_python_api_plans_the_held_bytes_too(smollm2):
    """LLM(...) plans as the CLI does: the GGUF's blocks fit 300 MB (float32 would not),
    and 80 MB is refused with the stored weights' size."""
    from llamadist.api import LLM
    from llamadist.planning.units import PlanningError
    llm = LLM(str(smollm2), max_memory="300MB", max_seq_len=256)
    assert llm.layout.plan.stages[0].weight_bytes == file_weight_bytes(smollm2)
    with pytest.raises(PlanningError, match=f"weights {format_bytes(file_weight_bytes(smollm2))}"):
        LLM(str(smollm2), max_memory="80MB", max_seq_len=256)
