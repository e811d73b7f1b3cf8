"""kernels.cuda_int8 on the CPU: the decode int8_rows.cu applies to a word of codes,
emulated bit for bit here with the fragments' slots, gives every product exactly; every
form compiles through NVRTC for sm_80 and sm_90 without local memory, its dependent-launch
form waits once, after W's first loads; the form rule; and the refusals off CUDA. The
kernel's numbers are checked on a GPU (tests/gpu/test_cuda_int8_gpu.py)."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

from llamadist.kernels import cuda_int4 as C
from llamadist.kernels import cuda_int8 as C8
from tests.unit.test_cuda_int4 import sass_of

needs_nvrtc = pytest.mark.skipif(C.nvrtc() is None, reason="no libnvrtc (the test extra's "
                                 "nvidia-cuda-nvrtc-cu12 wheel brings one on Linux x86_64)")


def _bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _prmt(a: int, sel: int) -> int:  # PTX prmt.b32 with b = 0 (selectors 0-3: a's bytes)
    src = a.to_bytes(4, "little") + bytes(4)
    return int.from_bytes(bytes(src[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def _pair(word: int, sel: int) -> tuple[list[float], list[float]]:
    """int8_rows.cu's pair(): (l0, l1) and (16 h0, 16 h1) of the two selected bytes."""
    t = _prmt(word, sel)
    lo = (t & 0x000F000F) | 0x43004300
    hi = ((t >> 4) & 0x000F000F) ^ 0x43084308
    return ([_bf16(lo) - 128, _bf16(lo >> 16) - 128],
            [16 * _bf16(hi) - 2176, 16 * _bf16(hi >> 16) - 2176])


def test_every_code_splits_exactly():
    """Each int8 code q becomes l + 16 h exactly, from the low and the high pair."""
    for q0 in range(-128, 128, 7):
        for q1 in (-128, -1, 0, 1, 127):
            word = (q0 & 0xFF) | (q1 & 0xFF) << 8 | (q1 & 0xFF) << 16 | (q0 & 0xFF) << 24
            for sel, want in ((0x4140, (q0, q1)), (0x4342, (q1, q0))):
                lo, hi = _pair(word, sel)
                assert [a + b for a, b in zip(lo, hi)] == list(want)


def test_fragments_sum_every_product_once():
    """The mma's view, emulated: W rows g, g + 8 as A (bytes 4j, 4j + 1 of each lane's 16
    in slots 2c, 2c + 1; 4j + 2, 4j + 3 in 2c + 8, 2c + 9), x's row g as B with the same
    inputs: y = x @ q^T exactly (rows past M repeat M - 1, never read back)."""
    rng = np.random.default_rng(1)
    n, k, m = 32, 128, 3
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    qb, y = q.view(np.uint8), np.zeros((m, n))
    for tile, chunk, j in np.ndindex(n // 16, k // 64, 4):
        a, b = np.zeros((16, 16)), np.zeros((16, 8))
        for lane in range(32):
            g, c = lane >> 2, lane & 3
            at = chunk * 64 + 16 * c + 4 * j
            for h in range(2):
                word = int.from_bytes(bytes(qb[tile * 16 + 8 * h + g, at:at + 4]), "little")
                (l0, l1), (h0, h1) = _pair(word, 0x4140)
                (l2, l3), (h2, h3) = _pair(word, 0x4342)
                a[8 * h + g, [2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9]] = \
                    [l0 + h0, l1 + h1, l2 + h2, l3 + h3]
            b[[2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9], g] = x[min(g, m - 1), at:at + 4]
        y[:, tile * 16:tile * 16 + 16] += (a @ b)[:, :m].T
    assert np.array_equal(y, x.astype(np.float64) @ q.astype(np.float64).T)


FORMS = sorted({C8.form_for(m, n, 132) for m in range(1, 9) for n in (4096, 28672)}
               | {C8.Int8Form(4, 2, 3, 8), C8.Int8Form(8, 2, 1, 2), C8.Int8Form(2, 1, 2, 4)},
               key=C8.Int8Form.label)


@needs_nvrtc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_form_compiles_without_local_memory(arch, tmp_path):
    for form in FORMS if arch == "90" else FORMS[:2]:
        cubin = C8.compile_cubin(arch, form)
        assert cubin[:4] == b"\x7fELF", form
        sass = sass_of(cubin, tmp_path)
        if sass is None:
            continue
        # the unrolled ring: (PF + 1) chunks x 4 k-steps x NT tiles x 2 (low, high)
        assert len(re.findall(r"\bHMMA\.16816\.F32\.BF16\b", sass)) == \
            (form.pf + 1) * 4 * form.nt * 2, form
        assert not re.search(r"\b(LDL|STL)\b", sass), f"local memory: {form}"


@needs_nvrtc
def test_dependent_launch_form_waits_once_after_w(tmp_path):
    sass = sass_of(C8.compile_cubin("90", C8.Int8Form(), pdl=True), tmp_path)
    if sass is None:
        pytest.skip("nvdisasm (triton's) not installed")
    assert sass.count("ACQBULK") == 1 and sass.count("PREEXIT") == 1
    wait = sass.index("ACQBULK")
    # W's first chunks before it (plain loads: ptxas hoists the wait above .nc ones), x's
    # after: NT 2 x 2 rows x PF 2 words, then PF x 2 of x
    assert sass[:wait].count("LDG.E.128") == 8 and "LDG.E.128" in sass[wait:]


def test_form_rule_and_refusals():
    assert C8.form_for(1, 28672, 132) == C8.Int8Form(8, 2, 2, 1)  # gate_up
    assert C8.form_for(3, 6144, 132) == C8.Int8Form(8, 1, 2, 4)   # qkv
    assert C8.form_for(8, 4096, 132) == C8.Int8Form(8, 1, 3, 8)   # o, down
    with pytest.raises(ValueError, match="1..8 rows"):
        C8.form_for(9, 4096, 132)
    q, s = torch.zeros(32, 128, dtype=torch.int8), torch.ones(32, 1)
    assert not C8.supports(torch.zeros(1, 128, dtype=torch.bfloat16), q, s, 32)  # CPU
    assert C8.ok(torch.device("cpu")) is False
