"""A request's own limits as a user meets them: stop strings (one string is one stop
string, an empty one is refused), and the context refusal's advice (no "lower
--max-new-tokens to 0"; a --max-seq-len below the model's context is named as the limit)."""

import pytest

from llamadist.cli.main import main
from llamadist.generation.generate import ContextLimitError, check_context
from llamadist.generation.sampling import SamplingParams


def test_one_stop_string_is_not_one_per_character():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["ab", "c"]).stop == ("ab", "c")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop=None).stop == ()


@pytest.mark.parametrize("stop", ["", ("a", ""), [None]])
def test_an_empty_stop_string_is_refused(stop):
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        SamplingParams(stop=stop)


def test_no_room_for_a_token_does_not_advise_zero_new_tokens():
    with pytest.raises(ContextLimitError) as info:
        check_context([[1, 2, 3]], 4, 3)
    assert "--max-new-tokens to 0" not in str(info.value)
    assert "shorten the prompt" in str(info.value)
    with pytest.raises(ContextLimitError, match="lower --max-new-tokens to 2 "):
        check_context([[1, 2, 3]], 4, 5)


def test_cli_names_max_seq_len_and_refuses_an_empty_stop(tiny_model, capsys):
    code = main(["generate", str(tiny_model), "--prompt", "hello", "--max-new-tokens", "4",
                 "--max-seq-len", "3"])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("llamadist: error:")]
    assert code == 2 and len(err) == 1
    assert "raise --max-seq-len (now 3" in err[0] and "--max-new-tokens to 0" not in err[0]
    code = main(["generate", str(tiny_model), "--prompt", "hello", "--max-new-tokens", "2",
                 "--stop", ""])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("llamadist: error:")]
    assert code == 2 and len(err) == 1 and "stop strings must be non-empty" in err[0]
