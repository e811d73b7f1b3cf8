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


def test_dependent_launches_only_inside_the_context_and_on_cuda():
    """kernels.gpu.dependent_launches: kernels launch as programmatic dependent launches
    inside it (restored after, nested or not) and on CUDA devices only; a CPU stage never
    captures with them, and --no-dependent-launches turns them off."""
    from llamadist.cli.args import runtime_config
    from llamadist.cli.main import build_parser
    from llamadist.config import RuntimeConfig
    from llamadist.runtime.kernel_passes import dependent_launches
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not gpu.launch_dependent(cuda)
    with gpu.dependent_launches():
        assert gpu.launch_dependent(cuda) and not gpu.launch_dependent(cpu)
        with gpu.dependent_launches(False):
            assert not gpu.launch_dependent(cuda)
        assert gpu.launch_dependent(cuda)
    assert not gpu.launch_dependent(cuda)
    assert RuntimeConfig().dependent_launches
    assert not dependent_launches(cpu, RuntimeConfig())
    args = build_parser().parse_args(["generate", "m", "--prompt", "p"])
    assert runtime_config(args).dependent_launches
    args = build_parser().parse_args(["generate", "m", "--prompt", "p",
                                      "--no-dependent-launches"])
    assert not runtime_config(args).dependent_launches


def test_pdl_supported_needs_hopper_a_new_driver_and_triton_that_waits(monkeypatch):
    """gpu.pdl_supported: sm_90+, not ROCm, Triton ready with gdc_wait, driver 12.3+
    (each condition alone turns it off; checked with stand-ins on the CPU)."""
    import ctypes
    import types
    state = {"cap": (9, 0), "hip": None, "ready": True, "gdc": True, "driver": 12040}

    class Driver:
        def cuDriverGetVersion(self, ptr):
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int))[0] = state["driver"]
            return 0

    def extra(name):
        assert name == "triton.language.extra.cuda"
        return types.SimpleNamespace(**({"gdc_wait": object()} if state["gdc"] else {}))

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: state["cap"])
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(gpu, "ready", lambda: state["ready"])
    monkeypatch.setattr(gpu.importlib, "import_module", extra)
    monkeypatch.setattr(torch.cuda._utils, "_get_gpu_runtime_library", lambda: Driver())
    check = gpu.pdl_supported.__wrapped__
    assert check(0)
    for key, off in [("cap", (8, 9)), ("ready", False), ("gdc", False), ("driver", 12020)]:
        before, state[key] = state[key], off
        assert not check(0), key
        state[key] = before
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not check(0)
