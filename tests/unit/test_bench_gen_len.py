"""bench --gen-len 1: the prefill samples the only token and no decode step runs, so the
report's decode time per step is 0 (it printed the finish's few microseconds as
"decode 0.18 ms/step" next to "0.0 tokens/s")."""

import json

from llamadist.cli.main import main


def report(capsys, model, gen_len: int) -> dict:
    assert main(["bench", str(model), "--batch", "1", "--prompt-len", "4", "--gen-len",
                 str(gen_len), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_one_new_token_has_no_decode_step(tiny_model, capsys):
    one = report(capsys, tiny_model, 1)
    assert one["generated_tokens"] == 1
    assert one["decode_ms_per_step"] == 0.0 and one["decode_tokens_per_s"] == 0.0
    three = report(capsys, tiny_model, 3)
    assert three["generated_tokens"] == 3 and three["decode_ms_per_step"] > 0
