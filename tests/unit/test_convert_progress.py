"""`llamadist convert` draws its progress bar only on a terminal: into a log (stderr not a
tty) every redraw of the bar was written, 270 of them for SmolLM2."""

import llamadist.weights.gguf as gguf
from llamadist.cli.main import main


def test_no_bar_into_a_log(tmp_path, monkeypatch, capsys):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    seen = {}

    def fake_convert(path, out, dtype="float32", progress=True):
        seen.update(path=str(path), progress=progress)
        return out
    monkeypatch.setattr(gguf, "convert_gguf_to_hf", fake_convert)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    assert seen == {"path": str(src), "progress": False}   # capsys: stderr is no tty
    assert "wrote" in capsys.readouterr().out
