"""Issue 13's cold start, host side: Inductor's compile workers are killed when the CLI is
done instead of waited for (llamadist/runtime/compile_workers.py), and the compiler's
import runs in a background thread beside the weight load (runtime/compiled_layer.py).

A CUDA compile wakes Inductor's worker pool (a sidecar process that imports torch, then
forks its workers); on the CPU the same call starts the same pool, so the tests wake it
as compile_fx does for CUDA inputs and then run the real CLI in that process. They assert
on the process tree and on how the sidecar ended (killed, not waited for), not on
timings."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamadist.runtime import compiled_layer
from llamadist.runtime.compile_workers import children

ROOT = Path(__file__).resolve().parents[2]

# Wake Inductor's pool (argv[2] "ready": wait until its workers are forked and answer;
# "starting": at once, the sidecar still importing torch), then the CLI's generate.
CLI = """
import json, sys
import torch._inductor.async_compile as ac
from llamadist.runtime.compile_workers import children
ac.AsyncCompile.wakeup()
pool = ac.AsyncCompile.process_pool()
if sys.argv[2] == "ready":
    ac.AsyncCompile.wait_pool_ready(timeout=500)
workers = children(pool.process.pid)
from llamadist.cli.main import main
code = main(["generate", sys.argv[1], "--devices", "cpu", "--prompt", "Hello",
             "--max-new-tokens", "3", "--json"])
print(json.dumps({"code": code, "sidecar": pool.process.pid, "workers": workers,
                  "returncode": pool.process.returncode}))
"""


def _compile_processes(parent: int) -> list[int]:
    """Live processes started as Inductor compile workers of ``parent`` (the sidecar's
    command line names its parent; its forked workers keep that command line)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if (any(b"compile_worker" in a for a in argv) and f"--parent={parent}".encode() in argv
                and state != b"Z"):
            out.append(int(name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("when", ["starting", "ready"])
def test_cli_exit_kills_the_compile_workers(tiny_model, when):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_COMPILE_THREADS="2",
               OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", CLI, str(tiny_model), when], cwd=ROOT, env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    gen, report = rows[0], rows[-1]
    assert report["code"] == 0 and len(gen["token_ids"]) == 3
    # killed (SIGKILL) by the CLI, not asked to shut down and waited for
    assert report["returncode"] == -signal.SIGKILL
    if when == "ready":
        assert report["workers"], "the pool's workers were forked before the CLI ran"
    # no sidecar nor worker outlives the CLI (a SIGKILLed one may take a moment to go)
    deadline = time.monotonic() + 5
    while _compile_processes(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _compile_processes(p.pid) == []
    # the time to first token since the process started, for the GPU session's profile
    stats = gen["stats"]
    assert 0 < stats["first_token_since_start_s"] <= stats["done_since_start_s"]


def test_children_lists_this_process_children():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert p.pid in children(os.getpid())
        assert children(p.pid) == []
    finally:
        p.kill()
        p.wait()


# A stage built on the main thread while the compiler imports in the background (the CPU
# stage's own imports run beside it), then the compiled layer made and run.
OVERLAP = """
import json, sys, torch
assert "torch._dynamo" not in sys.modules
from llamadist.config import RuntimeConfig
from llamadist.runtime import compiled_layer as cl
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint
started = cl.start_compiler_import(cuda=False)
again = cl.start_compiler_import(cuda=False)
st = build_stage(open_checkpoint(sys.argv[1]), range(2), "cpu", torch.float32, 1, 16,
                 runtime=RuntimeConfig(cpu_kernels=False))
fn = cl.compiled_layer_call()
print(json.dumps({"started": started, "again": again, "same": fn is cl.compiled_layer_call(),
                  "modules": [m in sys.modules for m in cl.COMPILE_MODULES],
                  "dynamo": "torch._dynamo" in sys.modules, "import_s": cl.import_s}))
"""


def test_compiler_imports_beside_a_stage_build(tiny_model):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", OVERLAP, str(tiny_model)], cwd=ROOT, env=env,
                       text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["started"] and not got["again"]  # once per process
    assert got["same"] and got["dynamo"] and all(got["modules"]) and got["import_s"] > 0


def test_a_failed_background_import_is_reported_and_retried(monkeypatch, caplog):
    monkeypatch.setattr(compiled_layer, "_COMPILED_LAYERS", {})
    monkeypatch.setattr(compiled_layer, "_importer", None)
    monkeypatch.setattr(compiled_layer, "COMPILE_MODULES", ("llamadist_no_such_module",))
    assert compiled_layer.start_compiler_import(cuda=False)
    with caplog.at_level(logging.WARNING, logger=compiled_layer.__name__):
        fn = compiled_layer.compiled_layer_call()
    assert fn is not None and fn is compiled_layer.compiled_layer_call()
    assert "llamadist_no_such_module" in caplog.text and "failed" in caplog.text


def test_background_import_takes_triton_first_under_the_lock(monkeypatch):
    """For a CUDA stage the background thread imports triton (kernels.gpu.ready, under
    gpu.IMPORT_LOCK) before torch._dynamo, which imports triton too: the main thread's
    own ready() while weights load then never imports triton beside it (a concurrent
    import cycle hands one thread a partial module, which broke triton on the H200)."""
    from llamadist.kernels import gpu
    order = []
    monkeypatch.setattr(gpu, "ready", lambda: order.append("triton") or True)
    monkeypatch.setattr(compiled_layer, "_make_compiled_layer",
                        lambda: order.append("dynamo"))
    monkeypatch.setattr(compiled_layer, "COMPILE_MODULES", ())
    monkeypatch.setattr(compiled_layer, "CUDA_MODULES", ())
    compiled_layer._import_compiler(cuda=True)
    assert order == ["triton", "dynamo"]
    order.clear()
    compiled_layer._import_compiler(cuda=False)  # a CPU stage: no triton
    assert order == ["dynamo"]


def test_ready_imports_triton_under_the_lock(monkeypatch):
    from llamadist.kernels import gpu
    held = []
    monkeypatch.setattr(gpu, "INSTALLED", True)
    monkeypatch.setattr(gpu.importlib, "import_module",
                        lambda name: held.append((name, gpu.IMPORT_LOCK.locked())))
    gpu.ready.cache_clear()
    try:
        assert gpu.ready()
    finally:
        gpu.ready.cache_clear()
    assert held == [("triton.language", True)]
