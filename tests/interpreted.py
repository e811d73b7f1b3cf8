"""Interpreted Triton cases run as subprocesses (``python -m tests.MODULE ARGS`` with
TRITON_INTERPRET=1, which must be set before triton is imported). A test module starts
all of its runs at once in a module fixture and each test waits for its own: each run is
one core's work, so on CI's two cores they take about half the time they take one after
another (as tests/unit/test_triton_compile.py does with its compiles)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_env(interpret: bool) -> dict[str, str]:
    """This process's environment for a subprocess that imports this checkout (its root
    first on PYTHONPATH), under Triton's interpreter or without it (TRITON_INTERPRET set
    to 1 or removed: it must be decided before triton is imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class Run:
    """One started ``python -m tests.MODULE ARGS``; its output goes to files (no pipe to
    fill while no test reads it yet)."""

    def __init__(self, folder: Path, name: str, module: str, *args: str):
        env = repo_env(interpret=True)
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", f"tests.{module}", *args],
                                         cwd=ROOT, env=env, stdout=out, stderr=err)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for the run (killed past ``timeout`` s from now) -> its exit status and
        output, as subprocess.run gives them."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                           self.out.read_text(), self.err.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_all(folder: Path, module: str, runs: dict[str, tuple[str, ...]]) -> dict[str, Run]:
    """{name: args} -> {name: Run}, every run started now."""
    return {name: Run(folder, name, module, *args) for name, args in runs.items()}
