"""How many Triton kernels tests/gpu/test_wquant_gpu.py's kernel tests compile on CUDA
(their cost on a GPU: ~0.5-2 s each), counted on the CPU.

The tests' launches go through stand-in kernels that record, not run, a key like Triton's
specialisation: the constexprs, warps and stages, each tensor argument's dtype and
16-byte alignment, each int argument's being 1 or a multiple of 16. The test functions run
with their CUDA case lists (``format_cases(True)`` etc.), the rule on an H200's traits
(132 SMs, float8 conversions); the four whole-model tests are not counted.

    python benchmarks/wquant_test_compiles.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TRITON_INTERPRET"] = "1"  # the kernels module imports on CPU; nothing runs


def _spec(a):
    import torch
    if isinstance(a, torch.Tensor):
        return str(a.dtype), a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        return "i", a == 1, a % 16 == 0
    return type(a).__name__


def main() -> int:
    import pytest
    import torch
    from llamadist.kernels import gpu
    from llamadist.kernels import wquant_triton as T
    import tests.gpu.test_wquant_gpu as t
    kernels = gpu.load("wquant")
    keys: set = set()
    launches = [0]

    class Recorder:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            def run(*args, **kw):
                launches[0] += 1
                keys.add((self.name, tuple(sorted((k, str(v)) for k, v in kw.items())),
                          tuple(_spec(a) for a in args)))
            return run

    for name in ("_gemv_kernel", "_wq_kernel", "_splitk_sum_kernel"):
        setattr(kernels, name, Recorder(name))
    kernels.device_traits = lambda dev: (132, True)

    def check(pw, m, dtype, bias, config=None):  # the launch of tests' check, no compare
        n, k = pw.shape
        x = torch.randn(m, k).to(dtype)
        b = torch.randn(n).to(dtype) if bias else None
        if config is None:
            T.packed_linear(x, pw, b)
        else:
            T.launch(x, pw.kind, pw.q, pw.scale, pw.offset, b, pw.group, n, k, config)
    t.check = check
    parts = {}
    for name, test, cases in [
            ("formats", t.test_formats_against_float64, t.format_cases(True)),
            ("configs", t.test_gemv_configs_against_float64, t.config_cases(True)),
            ("gguf", t.test_gguf_converted_against_float64, t.gguf_cases(True)),
            ("rest", None, None)]:
        before = len(keys)
        if test is not None:
            for case in cases:
                test(*case)
        else:  # these compare outputs the stand-ins never wrote
            for f, args in [(t.test_fp8_decodes_every_finite_code, (False,)),
                            (t.test_fp8_decodes_every_finite_code, (True,)),
                            (t.test_int4_x_pairs_from_odd_offsets_and_strides, ("float32",)),
                            (t.test_int4_x_pairs_from_odd_offsets_and_strides, ("float16",)),
                            (t.test_empty_and_3d_inputs, ())]:
                try:
                    f(*args)
                except (AssertionError, pytest.skip.Exception):
                    pass
        parts[name] = len(keys) - before
    print(f"CUDA case lists: {launches[0]} launches, {len(keys)} distinct compilations ("
          + ", ".join(f"{k} {v}" for k, v in parts.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
