"""--quantize per device: an entry that names no device of the run (cuda=int8 on a CPU
run, a typo) was silently ignored; it is refused by name. `perplexity --fit-bits` printed
the formats it chose but scored the float model; it now loads them, as generate does."""

import json

import pytest

from llamadist.cli.jobs import check_quantize_devices
from llamadist.cli.main import main


@pytest.mark.parametrize("spec, devices", [
    ("cuda=int8", ("cpu",)), ("foo=int4", ("cpu", "cpu")), ("cuda:1=int4", ("cuda:0", "cpu")),
    ("cpu:1=int8", ("cpu", "cpu")), ("cpu=int8,cuda=int4", ("cpu",))])
def test_an_entry_for_no_device_of_the_run_is_refused(spec, devices):
    with pytest.raises(ValueError, match="is no device of this run"):
        check_quantize_devices(spec, devices)


@pytest.mark.parametrize("spec, devices", [
    (None, ("cpu",)), ("int8", ("cpu",)), ("cpu=int8", ("cpu", "cpu")),
    ("cuda:0=int4,cpu=int8", ("cuda:0", "cpu")), ("cuda:1=int4", ("cuda", "cuda")),
    ("cuda=int4,cpu=native", ("cuda:0", "cuda:1", "cpu"))])
def test_entries_for_the_runs_devices_pass(spec, devices):
    check_quantize_devices(spec, devices)


def test_generate_refuses_before_loading(tiny_model, capsys):
    assert main(["generate", str(tiny_model), "--prompt", "hi", "--max-new-tokens", "2",
                 "--quantize", "cuda=int8"]) == 2
    assert "cuda is no device of this run (cpu)" in capsys.readouterr().err


def perplexity(capsys, model, text, *flags) -> dict:
    assert main(["perplexity", str(model), "--text", str(text), "--ctx", "32", "--chunks",
                 "1", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_perplexity_fit_bits_scores_the_formats_it_chose(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    fit = perplexity(capsys, tiny_model, text, "--fit-bits", "--max-memory", "1MB")
    assert fit["quantize"].split("=")[-1] in ("int8", "int4")   # 1 MB: it does not fit
    same = perplexity(capsys, tiny_model, text, "--quantize", fit["quantize"])
    plain = perplexity(capsys, tiny_model, text)
    assert plain["quantize"] is None
    assert fit["ppl"] == same["ppl"] and fit["ppl"] != plain["ppl"]
