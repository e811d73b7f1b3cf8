"""llamadist.kernels.gpu.custom_op: the torch custom op where torch.compile traces, the
implementation itself elsewhere (the op's dispatch imports torch._dynamo at its first call;
tests/unit/test_paged_kernel.py checks that a no-compile engine never imports it)."""

import subprocess
import sys
from pathlib import Path

import torch

from llamadist.kernels import gpu

ROOT = Path(__file__).resolve().parents[2]


def test_custom_op_is_the_op_when_compiled_and_the_impl_in_eager():
    calls = []

    def impl(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x * 2

    double = gpu.custom_op("llamadist_test::double", impl)  # fake: like its first argument
    x = torch.arange(3.0)
    assert torch.equal(double(x), x * 2) and len(calls) == 1  # eager: impl, directly
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(lambda t: double(t) + 1, backend=backend, fullgraph=True)(x)
    assert torch.equal(out, x * 2 + 1)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.llamadist_test.double.default in targets  # traced as one opaque op


def test_an_eager_call_does_not_import_the_compiler():
    """The op's own dispatch imports torch._dynamo at its first call (seconds on a GPU
    host); the wrapper's eager call must not (a fresh process: others import it)."""
    code = ("import sys, torch\n"
            "from llamadist.kernels import gpu\n"
            "def inc(x: torch.Tensor) -> torch.Tensor:\n"
            "    return x + 1\n"
            "f = gpu.custom_op('llamadist_test::inc', inc, fake=lambda x: x.new_empty(x.shape))\n"
            "assert torch.equal(f(torch.zeros(2)), torch.ones(2))\n"
            "print('torch._dynamo' in sys.modules)\n"
            "f.op(torch.zeros(2))  # the op itself does import it\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
