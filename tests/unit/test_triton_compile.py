"""Every Triton kernel of llamadist compiled for CUDA sm_90 (the H200) by Triton's real
compiler on the CPU, no GPU needed (tests/triton_compile_cases.py, in a subprocess
without TRITON_INTERPRET). The interpreted tests run the kernels' Python and never
type-check it: the routed MoE kernel's ``_x_part``, two returns of different shapes
under a constexpr ``if``, passed them all and failed to compile on the H200. Here each
kernel's launch wrapper compiles its real launches (constexprs, specialization) down to
the cubin, and each block's shared memory must fit. Skipped without triton."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interpreted import repo_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")


def _start(group: str, nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.triton_compile_cases", group],
                            cwd=ROOT, env=repo_env(interpret=False), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# distinct compiles each group's cases make (a case lost would lower the count)
EXPECTED = {"moe_routed": 33, "paged": 24, "decode": 14, "wquant": 87, "eager_fused": 30}


@pytest.fixture(scope="module")
def compiles():
    """Every group's compile started at once (each is one core's work: on CI's two cores
    the groups take about half the time they take one after another). The longest group
    (the most compiles) sets the wall time: the others run niced, so it keeps a core of
    its own and they share what is left (on two cores ~10 s sooner)."""
    longest = max(EXPECTED, key=EXPECTED.get)
    procs = {group: _start(group, nice=0 if group == longest else 10)
             for group in [*EXPECTED, "selftest"]}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("group", list(EXPECTED))
def test_every_kernel_compiles_for_sm90(group, compiles):
    proc = _finish(compiles[group])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{EXPECTED[group]} compiled, 0 failed" in proc.stdout, proc.stdout[-2000:]


def test_compile_check_catches_what_the_interpreter_runs(compiles):
    """The harness itself: a helper whose constexpr branches return two shapes (the
    H200's error) and a loop-carried variable changing type both fail to compile."""
    proc = _finish(compiles["selftest"])
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "2 compiled, 2 failed" in proc.stdout
    assert "Return type mismatch" in proc.stdout or "Inconsistent return" in proc.stdout
    assert "Loop-carried variable acc" in proc.stdout
