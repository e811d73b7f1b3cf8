"""llamadist.kernels.gpu.custom_op: the torch custom op where torch.compile traces, the
implementation itself elsewhere (the op's dispatch imports torch._dynamo at its first call;
tests/unit/test_paged_kernel.py checks that a no-compile engine never imports it)."""

import torch

from llamadist.kernels import gpu


def test_custom_op_is_the_op_when_compiled_and_the_impl_in_eager():
    calls = []

    def impl(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x * 2

    double = gpu.custom_op("llamadist_test::double", impl, fake=lambda x: x.new_empty(x.shape))
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
