"""benchmarks/gpu_session.sh, the GPU measurements' script (run on a lent device, never in
CI): bash parses it, and each part is in all three of its lists (the header, the dispatch
and the usage line) and defined as a function, so a part written for a later device
session is not lost to a name missing from one list (device time is scarce)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_parses_it():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_part_is_in_its_three_lists_and_defined():
    text = SCRIPT.read_text()
    header = re.search(r"#   PART: (.*?)\(or stash\)", text, re.S).group(1)
    listed = set(re.sub(r"\s*#\s*", " ", header).split())
    dispatch = re.findall(r"^    ([\w|]+)\) (?:stash &&|mkdir)", text, re.M)
    dispatched = {p for line in dispatch for p in line.split("|")}
    usage = set(re.search(r'gpu_session\.sh" \\\s*"([\w|]+)"', text).group(1).split("|"))
    defined = set(re.findall(r"^(\w+)\(\) \{", text, re.M))
    assert listed == dispatched == usage, (listed ^ dispatched, dispatched ^ usage)
    assert dispatched <= defined, dispatched - defined
    assert {"fold35", "fold35b", "foldline35", "kp35"} <= dispatched
