"""A plan's per-stage weight formats are what a run loads: `plan --fit-bits --save` on a
tiny random checkpoint, then `generate --plan` and `LLM(plan=...)` on the CPU, whose int8
stages hold GGUF Q8_0 blocks (the CPU's --quantize int8)."""

from __future__ import annotations

import json

import pytest

from llamadist.kernels.quant import QuantizedTensor
from llamadist.planning.devices import parse_devices
from llamadist.planning.plan import Plan
from llamadist.planning.profile import profile
from llamadist.planning.strategies import make_plan
from llamadist.weights.checkpoint import open_checkpoint
from tests.tiny import make_tiny_model

SEQ = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("fitbits") / "gqa", "gqa_tied")


@pytest.fixture(scope="module")
def plan_file(tiny, tmp_path_factory):
    """A CPU budget between the int8 and the float32 model's needs: --fit-bits picks int8."""
    from llamadist.cli.main import main
    prof = profile(open_checkpoint(tiny).config, dtype="float32", seq_len=SEQ)
    cpu = parse_devices("cpu", "1GB")

    def need(fmt):
        p = make_plan(prof, cpu, None, batch_size=1, max_seq_len=SEQ, formats=[fmt])
        return p.stages[0].memory_bytes
    assert need("int8") < need(None)
    budget = int((need("int8") + need(None)) / 2 / 0.9)   # 10% headroom
    path = tmp_path_factory.mktemp("plan") / "p.json"
    assert main(["plan", str(tiny), "--devices", "cpu", "--max-memory", str(budget),
                 "--max-seq-len", str(SEQ), "--fit-bits", "--save", str(path)]) == 0
    assert Plan.load(path).stages[0].weight_format == "int8"
    return path


def _quantized(llm) -> dict[str, str]:
    return {name: m.weight.type_name for s in llm.engine.stages
            for name, m in s.model.named_modules()
            if isinstance(getattr(m, "weight", None), QuantizedTensor)}


def test_llm_with_the_plan_loads_its_formats(tiny, plan_file):
    from llamadist.api import LLM
    llm = LLM(str(tiny), plan=str(plan_file), max_seq_len=SEQ, warmup=False)
    assert llm.runtime.quantize == "cpu=int8"
    q = _quantized(llm)
    layers = open_checkpoint(tiny).config.num_layers
    assert q and set(q.values()) == {"Q8_0"}
    assert {n.split(".")[2] for n in q} == {str(i) for i in range(layers)}  # every layer
    assert not any("embed" in n or "lm_head" in n for n in q)
    plain = LLM(str(tiny), devices="cpu", max_seq_len=SEQ, warmup=False)
    assert not _quantized(plain)


def _generate(capsys, *flags) -> list[int]:
    from llamadist.cli.main import main
    assert main(["generate", *flags, "--prompt", "The quick brown", "--max-new-tokens", "6",
                 "--json", "--max-seq-len", str(SEQ)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]


def test_the_run_commands_job_takes_the_plans_formats(tiny, plan_file):
    """generate, bench and serve build their Job (runtime and layout) the same way."""
    from llamadist.cli.jobs import JOBS
    from llamadist.cli.main import build_parser
    ckpt = open_checkpoint(tiny)
    for kind, extra in (("generate", ["--prompt", "hi", "--max-new-tokens", "4"]),
                        ("bench", ["--batch", "1", "--prompt-len", "8", "--gen-len", "4"])):
        args = build_parser().parse_args([kind, str(tiny), "--plan", str(plan_file),
                                          "--max-seq-len", str(SEQ), *extra])
        job = JOBS[kind](args, ckpt, ckpt.tokenizer())
        assert job.runtime.quantize == "cpu=int8", kind
        assert [s.weight_format for s in job.layout.plan.stages] == ["int8"], kind


def test_generate_with_the_plan_runs_as_quantize_int8(tiny, plan_file, capsys):
    planned = _generate(capsys, str(tiny), "--plan", str(plan_file))
    assert planned == _generate(capsys, str(tiny), "--devices", "cpu", "--quantize", "int8")
    # the same format given twice is fine; a different one is refused, naming both
    assert planned == _generate(capsys, str(tiny), "--plan", str(plan_file), "--quantize",
                                "int8")
    from llamadist.cli.main import main
    assert main(["generate", str(tiny), "--plan", str(plan_file), "--quantize", "int4",
                 "--prompt", "x", "--max-new-tokens", "4", "--max-seq-len", str(SEQ)]) != 0
    err = capsys.readouterr().err
    assert "gives stage 0 (cpu) weights int8, but --quantize int4 gives int4" in err

