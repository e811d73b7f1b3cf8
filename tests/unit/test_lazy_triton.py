"""Triton is imported only where a Triton kernel runs (a CUDA device, or the interpreter):
a CPU-only process never pays for it (~80 MiB of memory: test_smollm2_generate_peak_memory
measures it), even with triton installed. The Triton code lives in llamadist/kernels/gpu/,
reached only through ``llamadist.kernels.gpu.load``."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interpreted import repo_env

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "llamadist" / "kernels" / "gpu"


def _imports_triton(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        if any(n == "triton" or n.startswith("triton.") for n in names):
            return True
    return False


def test_only_the_gpu_kernel_modules_import_triton():
    found = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llamadist").rglob("*.py")
             if _imports_triton(p)}
    outside = sorted(f for f in found if not f.startswith("llamadist/kernels/gpu/"))
    assert not outside, f"import triton outside llamadist/kernels/gpu/: {outside}"
    assert not _imports_triton(GPU / "__init__.py")  # the door itself stays light
    assert found, "the scan found no Triton module at all: is the pattern still right?"


CPU_RUN = """
import sys
from llamadist.cli import main
assert main(["generate", sys.argv[1], "--devices", "cpu", "--prompt", "hello",
             "--max-new-tokens", "3"]) == 0
assert main(["bench", sys.argv[2], "--devices", "cpu", "--batch", "2", "--prompt-len", "4",
             "--gen-len", "3"]) == 0
import llamadist.serve.server  # noqa: F401  (what `llamadist serve` imports)
from llamadist.kernels import decode_attention, moe_routed, paged_attention, wquant
import torch
assert not moe_routed.usable(torch.device("cpu"))
print("TRITON_IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] == "triton")[:3])
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton not installed (the point is a CPU run with it installed)")
def test_cpu_generate_and_bench_with_triton_installed_never_import_it(tiny_models,
                                                                      tiny_mixtrals):
    env = repo_env(interpret=False)
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", CPU_RUN, str(tiny_models["llama3"]),
                           str(tiny_mixtrals["moe_top2_gqa"])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "TRITON_IMPORTED []" in proc.stdout, proc.stdout[-500:]


INTERPRETED_RUN = """
import sys
import torch
from llamadist.kernels import moe_routed, paged_attention
assert "triton" not in sys.modules  # the ops are registered; nothing has run yet
torch.manual_seed(0)
# the routed MoE op: G 4 experts, D 32, F 48, two tokens top-2
w13, w2 = torch.randn(4, 96, 32), torch.randn(4, 32, 48)
x, w, idx = torch.randn(2, 32), torch.softmax(torch.randn(2, 2), -1), torch.tensor([[0, 1], [2, 3]])
eager = moe_routed.routed_expert_sum(x, w, idx, w13, w2)
print("TRITON_AFTER_FIRST_CALL", "triton" in sys.modules)
fn = torch.compile(moe_routed.routed_expert_sum, backend="eager", fullgraph=True)
print("MOE_COMPILED_EQUAL", torch.equal(fn(x, w, idx, w13, w2), eager))
# the paged op (mutates the cache): 2 sequences, H 4 over H_kv 2, D 16, blocks of 8
kv = torch.randn(2, 6, 2, 8, 16)
q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
args = (torch.tensor([9, 20]), torch.tensor([[0, 1, 5], [2, 3, 4]]), torch.tensor([10, 13]), 1)
kv2 = kv.clone()
eager = paged_attention.paged_decode(q, k, v, kv, *args)
fn = torch.compile(paged_attention.paged_decode, backend="eager", fullgraph=True)
got = fn(q, k, v, kv2, *args)
print("PAGED_COMPILED_EQUAL", torch.equal(got, eager) and torch.equal(kv2, kv))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_interpreted_ops_load_triton_on_first_call_and_trace_whole():
    """Under the interpreter, importing the kernels' front modules still imports no triton;
    the first op call does; and torch.compile (fullgraph) traces the custom ops whole, the
    loading staying inside the ops' bodies, with the eager values."""
    env = repo_env(interpret=True)
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_RUN], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for line in ("TRITON_AFTER_FIRST_CALL True", "MOE_COMPILED_EQUAL True",
                 "PAGED_COMPILED_EQUAL True"):
        assert line in proc.stdout, proc.stdout[-1000:]
