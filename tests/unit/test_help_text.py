"""--help says what the code does: every shape `bench --shape` accepts is listed; and the
command line's own exits (a closed pipe)."""

import pytest

from llamadist.cli.main import main
from llamadist.config import NAMED_SHAPES


def test_bench_help_lists_every_named_shape(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    shape_help = text.split("--shape SHAPE")[-1].split("--stages")[0]  # the option, not the usage
    for name in NAMED_SHAPES:
        assert name in shape_help, name


def test_a_reader_that_leaves_is_no_error(monkeypatch, capsys):
    """`llamadist generate ... | head`: the closed pipe ends the command quietly (141, as a
    writer killed by SIGPIPE), not with "llamadist: error: [Errno 32] Broken pipe"."""
    from llamadist.cli.main import COMMANDS

    def closed_pipe(_args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setitem(COMMANDS, "analyze", closed_pipe)
    assert main(["analyze", "smollm2-135m"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, names, meant", [
    (["generate", "m", "--max_new_tokens", "3"], "llamadist generate", "--max-new-tokens"),
    (["plan", "m", "--device-sped", "1"], "llamadist plan", "--device-speed"),
    (["serve", "m", "--bogus"], "llamadist serve", None)])
def test_an_unknown_flag_is_named_with_its_command(capsys, argv, names, meant):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llamadist: error: {names}: unrecognized arguments: {argv[2]}")
    assert f"see {names} --help" in err
    assert (f"did you mean {meant}?" in err) if meant else ("did you mean" not in err)
