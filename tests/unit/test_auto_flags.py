"""--auto chooses the grid and the split: a flag that says them was silently ignored
(`plan --auto --pp 2` printed the planner's tp=2 pp=1); it is now refused by name, on
`plan` and on the run commands, before any weight loads."""

import pytest

from llamadist.cli.main import main

CHOSEN = [["--pp", "2"], ["--tp", "2"], ["--dp", "2"], ["--cp", "2"], ["--ep", "2"],
          ["--strategy", "memory"], ["--boundaries", "0:2,2:5"]]


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("llamadist: error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flag", CHOSEN + [["--plot", "auto.png"]])
def test_plan_auto_refuses_what_it_chooses(flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "4", *flag]) == 2
    msg = one_error(capsys)
    assert f"drop {flag[0]}" in msg and "--auto" in msg
    assert not (tmp_path / "auto.png").exists()


@pytest.mark.parametrize("flag", CHOSEN)
def test_run_auto_refuses_what_it_chooses(flag, tiny_model, capsys):
    assert main(["generate", str(tiny_model), "--auto", "--prompt", "hi",
                 "--max-new-tokens", "2", *flag]) == 2
    assert f"drop {flag[0]}" in one_error(capsys)


def test_auto_alone_still_plans(capsys):
    assert main(["plan", "llama3-8b", "--auto", "--gpus", "2"]) == 0
    assert "why:" in capsys.readouterr().out
