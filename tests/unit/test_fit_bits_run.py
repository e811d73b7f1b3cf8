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



# ---- --fit-bits on the run commands (issue 16): planned as `plan --fit-bits` plans ----
def _need(tiny, fmt, stages=1) -> int:
    """Bytes the most loaded of ``stages`` even CPU stages needs with its layers in ``fmt``."""
    prof = profile(open_checkpoint(tiny).config, dtype="float32", seq_len=SEQ)
    cpus = parse_devices(",".join(["cpu"] * stages), ",".join(["1GB"] * stages))
    p = make_plan(prof, cpus, "uniform", batch_size=1, max_seq_len=SEQ, formats=[fmt] * stages)
    return max(s.memory_bytes for s in p.stages)


def _budget(tiny, low, high, stages=1) -> str:
    """A budget per CPU stage between the needs in ``low`` and ``high`` formats (after the
    planner's 10% headroom): what forces exactly format ``low``."""
    a, b = _need(tiny, low, stages), _need(tiny, high, stages)
    assert a < b
    return ",".join([str(int((a + b) / 2 / 0.9))] * stages)


def _report(text: str) -> list[str]:
    """The per-stage format lines and the totals line of a --fit-bits report."""
    return [line for line in text.splitlines()
            if line.startswith(("stage ", "bits:")) and ("bits:" in line or "): " in line)]


@pytest.fixture
def loaded(monkeypatch):
    """The LLM each run command loads in this process, kept for a look at its weights."""
    import llamadist.cli.run as run
    seen = []
    real = run.load_llm

    def keep(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(run, "load_llm", keep)
    return seen


@pytest.mark.parametrize("fmt,higher,blocks", [("int8", None, "Q8_0"), ("int4", "int8", "Q4_1")])
def test_generate_fit_bits_runs_the_formats_plan_prints(tiny, capsys, loaded, fmt, higher,
                                                        blocks):
    """A CPU budget that fits ``fmt`` but not the next less aggressive format: `generate
    --fit-bits` starts, says the stage formats `plan --fit-bits` prints, loads them and
    produces tokens."""
    from llamadist.cli.main import main
    flags = ["--devices", "cpu", "--max-memory", _budget(tiny, fmt, higher),
             "--max-seq-len", str(SEQ), "--fit-bits"]
    assert main(["plan", str(tiny), *flags]) == 0
    planned = _report(capsys.readouterr().out)
    assert len(planned) == 2 and f"): {fmt}, " in planned[0], planned
    assert main(["generate", str(tiny), *flags, "--prompt", "The quick brown",
                 "--max-new-tokens", "6", "--json"]) == 0
    out, err = capsys.readouterr()
    assert _report(err) == planned
    assert len(json.loads(out.strip().splitlines()[-1])["token_ids"]) == 6
    q = _quantized(loaded[-1])
    layers = open_checkpoint(tiny).config.num_layers
    assert set(q.values()) == {blocks}
    assert {n.split(".")[2] for n in q} == {str(i) for i in range(layers)}


def test_auto_fit_bits_runs_the_format_plan_auto_prints(tiny, capsys, loaded):
    from llamadist.cli.main import main
    flags = ["--devices", "cpu", "--max-memory", _budget(tiny, "int8", None),
             "--max-seq-len", str(SEQ), "--fit-bits", "--auto"]
    assert main(["plan", str(tiny), *flags]) == 0
    bits = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bits:")]
    assert len(bits) == 1 and "every decoder layer in int8" in bits[0]
    assert main(["generate", str(tiny), *flags, "--prompt", "The quick brown",
                 "--max-new-tokens", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert bits[0] in err.splitlines() and "auto layout:" in err
    assert len(json.loads(out.strip().splitlines()[-1])["token_ids"]) == 4
    assert set(_quantized(loaded[-1]).values()) == {"Q8_0"}
    # the model fits: nothing is quantized, and the run says so
    assert main(["generate", str(tiny), "--devices", "cpu", "--max-memory", "1GB",
                 "--max-seq-len", str(SEQ), "--fit-bits", "--auto", "--prompt", "x",
                 "--max-new-tokens", "2"]) == 0
    assert "bits: the model fits in float32; no layer quantized" in capsys.readouterr().err
    assert not _quantized(loaded[-1])


def test_every_run_command_takes_fit_bits(tiny):
    """generate, chat, bench and serve build their Job with the chosen formats, in one
    process and over processes (one format for every stage, as `plan --pp 2` chooses)."""
    from llamadist.cli.jobs import JOBS
    from llamadist.cli.main import build_parser
    ckpt = open_checkpoint(tiny)
    one = ["--devices", "cpu", "--max-memory", _budget(tiny, "int8", None)]
    two = ["--devices", "cpu", "--pp", "2", "--max-memory", _budget(tiny, "int8", None, 2)]
    extra = {"generate": ["--prompt", "hi", "--max-new-tokens", "4"], "chat": [],
             "bench": ["--batch", "1", "--prompt-len", "8", "--gen-len", "4"],
             "serve": ["--port", "0", "--max-batch", "1"]}
    for kind, rest in extra.items():
        for where, want in ((one, "cpu=int8"), (two, "int8")):
            args = build_parser().parse_args([kind, str(tiny), *where, "--fit-bits",
                                              "--max-seq-len", str(SEQ), *rest])
            job = JOBS[kind](args, ckpt, ckpt.tokenizer())
            assert job.runtime.quantize == want, (kind, where)
            assert set(job.layout.stage_formats) == {"int8"}, kind
        for auto in ([], ["--auto"]):   # a conflict is refused, as plan refuses it
            args = build_parser().parse_args([kind, str(tiny), *one, *auto, "--fit-bits",
                                              "--quantize", "int4", "--max-seq-len",
                                              str(SEQ), *rest])
            with pytest.raises(ValueError, match="--fit-bits chooses .*weight format: drop "
                                                 "--quantize int4"):
                JOBS[kind](args, ckpt, ckpt.tokenizer())


def test_fit_bits_refusals(tiny, capsys):
    from llamadist.cli.main import main
    small = str(_need(tiny, "int4") // 2)   # not even int4 fits
    base = ["--devices", "cpu", "--max-memory", small, "--max-seq-len", str(SEQ), "--fit-bits",
            "--prompt", "x", "--max-new-tokens", "2"]
    assert main(["generate", str(tiny), *base]) == 2
    err = capsys.readouterr().err
    assert "even with every decoder layer in int4" in err and "--max-memory" in err
    assert main(["generate", str(tiny), *base, "--auto"]) == 2
    assert "even with every decoder layer in int4" in capsys.readouterr().err
    assert main(["generate", str(tiny), "--devices", "cpu", "--fit-bits", "--quantize", "int8",
                 "--prompt", "x"]) == 2
    assert "--fit-bits chooses each device's weight format: drop --quantize int8" in \
        capsys.readouterr().err
    assert main(["bench", "--shape", "smollm2-135m", "--fit-bits"]) == 2
    assert "drop --fit-bits" in capsys.readouterr().err


def test_fit_bits_with_a_plan_file_chooses_again_for_this_run(tiny, plan_file):
    """As `plan --plan FILE --fit-bits`: the file's stages, the formats chosen again for
    this run's budget (the file's int8 is not kept where the model fits in float32)."""
    from llamadist.cli.jobs import JOBS
    from llamadist.cli.main import build_parser
    ckpt = open_checkpoint(tiny)
    for budget, want in (("1GB", None), (_budget(tiny, "int4", "int8"), "cpu=int4")):
        args = build_parser().parse_args(["generate", str(tiny), "--plan", str(plan_file),
                                          "--fit-bits", "--max-memory", budget, "--prompt",
                                          "hi", "--max-new-tokens", "4", "--max-seq-len",
                                          str(SEQ)])
        job = JOBS["generate"](args, ckpt, ckpt.tokenizer())
        assert job.runtime.quantize == want, budget
        assert job.layout.bounds == ",".join(f"{s.start}:{s.end}"
                                             for s in Plan.load(plan_file).stages)


def test_bench_fit_bits_runs_in_the_chosen_format(tiny, capsys, loaded):
    from llamadist.cli.main import main
    assert main(["bench", str(tiny), "--devices", "cpu", "--max-memory",
                 _budget(tiny, "int4", "int8"), "--max-seq-len", str(SEQ), "--fit-bits",
                 "--batch", "1", "--prompt-len", "8", "--gen-len", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["generated_tokens"] == 4
    assert any(line.startswith("stage 0 (cpu") and "): int4, " in line
               for line in err.splitlines())
    assert set(_quantized(loaded[-1]).values()) == {"Q4_1"}
