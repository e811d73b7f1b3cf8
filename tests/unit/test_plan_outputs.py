"""`plan --save/--plot` to a path that cannot be written is refused first, naming the flag
and the missing folder (it was an OSError's bare "[Errno 2] ..." after the planning)."""

import pytest

from llamadist.cli.main import main


@pytest.mark.parametrize("flags", [["--devices", "cpu"], ["--auto", "--gpus", "2"]])
@pytest.mark.parametrize("flag", ["--save", "--plot"])
def test_an_unwritable_output_is_refused_by_name(tmp_path, capsys, flags, flag):
    missing = tmp_path / "no-such-folder" / "out.file"
    assert main(["plan", "llama3-8b", *flags, flag, str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"llamadist: error: {flag} {missing}")
    assert str(missing.parent) in err[0] and "does not exist" in err[0]
    assert main(["plan", "llama3-8b", *flags, flag, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not missing.parent.exists()


def test_fit_bits_is_suggested_for_memory_only(capsys):
    """`plan --auto --gpus 2 --nodes 3` is a device count the nodes cannot share: the
    --fit-bits hint (it was appended to every auto-planning error) does not belong there."""
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "2", "--nodes", "3"]) == 2
    err = capsys.readouterr().err
    assert "spread evenly over 3 nodes" in err and "--fit-bits" not in err
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "1", "--gpu-memory", "1GB"]) == 2
    assert "--fit-bits finds the weight format" in capsys.readouterr().err
