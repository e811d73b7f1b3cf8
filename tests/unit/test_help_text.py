"""--help says what the code does: every shape `bench --shape` accepts is listed."""

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
