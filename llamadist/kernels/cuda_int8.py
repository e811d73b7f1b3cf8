"""int8 decode products on the tensor cores in CUDA C++ (int8_rows.cu), compiled at first
use by NVRTC as kernels.cuda_int4's int4_rows is (its compiler, loader and dependent
launch are shared).

Why: the Triton GEMV spends ~4 instructions a code on int8 (a byte permute and an exact
subtraction each, then an FMA) and reads Llama-3-8B's gate_up at 0.80 of the H200's copy
rate where fp8 (the hardware's conversion) reads it at 0.93 (RESULTS.md, session 27).
int8_rows makes each code two exact bf16 small integers (its low nibble and 16 times its
signed high one: ~3 instructions a code) and lets mma.m16n8k16 multiply them by x's rows,
W as the A operand, loaded with plain 16-byte loads a few chunks ahead in registers (see
its header): no float32 FMA a code. The products are exact and summed in float32 by the
mma. kernels.gpu.wquant's launch calls it (inside the ``llamadist::packed_linear`` op).

Measured on an H200 (RESULTS.md, session 27): at 4 rows Llama-3-8B's four linears in 83
against the Triton GEMV's 128 us, the batch-4 decode step 3.29 against 4.57 ms; at one
row slower than the GEMV on all four, so ``wquant_triton.int8_rows`` takes it for 3-8
rows. ``ok`` checks a small case on the device before the first use (at load).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from llamadist.kernels import cuda_int4 as C

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_rows.cu")
MAX_ROWS = 8  # x's rows: the B operand's 8 columns
CHUNK = 64    # inputs a warp's step (K must be a multiple)


@dataclass(frozen=True)
class Int8Form:
    """One compiled form of int8_rows: warps a block (they split K), tiles of 16 rows of W
    a block (``nt``), chunks of 64 inputs in flight ahead of the one being multiplied
    (``pf``), and the most rows of x (1..8)."""
    warps: int = 8
    nt: int = 2
    pf: int = 2
    rows: int = 1

    def label(self) -> str:
        return f"w{self.warps}t{self.nt}p{self.pf}r{self.rows}"


def form_for(m: int, n: int, sms: int) -> Int8Form:
    """The form for ``m`` rows of x and N rows of W on ``sms`` SMs: 8 warps; two 16-row
    tiles a block where that still gives >= 4 blocks a SM (gate_up), else one; three chunks
    ahead where one-tile blocks are at most 2 a SM (o, down: each block's warps need more
    in flight), else two. On an H200 (RESULTS.md, session 27: 7 forms on Llama-3-8B's
    linears at 1 and 4 rows) the fastest form on qkv, o and down, within 2% on gate_up."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"int8_rows takes 1..{MAX_ROWS} rows, not {m}")
    nt = 2 if n >= 4 * sms * 32 else 1
    pf = 3 if nt == 1 and -(-n // 16) <= 2 * sms else 2
    return Int8Form(nt=nt, pf=pf, rows=1 << (m - 1).bit_length())


@functools.cache
def _rule_form(index: int, rows: int, n: int) -> Int8Form:
    """form_for on CUDA device ``index``: once a shape, not on every launch."""
    return form_for(rows, n, torch.cuda.get_device_properties(index).multi_processor_count)


def defines(form: Int8Form, pdl: bool = False) -> dict[str, int]:
    return {"WARPS": form.warps, "NT": form.nt, "PF": form.pf, "ROWS": form.rows,
            "PDL": int(pdl)}


def compile_cubin(arch: str, form: Int8Form, pdl: bool = False) -> bytes:
    return C.compile_cubin(arch, defines(form, pdl), path=SOURCE)


_KERNELS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def kernel(index: int, form: Int8Form, pdl: bool = False):
    """The compiled int8_rows for CUDA device ``index`` and this form (once a process)."""
    key = (index, form, pdl)
    fn = _KERNELS.get(key)
    if fn is None:
        with _LOCK:
            fn = _KERNELS.get(key)
            if fn is None:
                from torch.cuda._utils import _cuda_load_module
                cubin = compile_cubin(C._arch(index), form, pdl)
                with torch.cuda.device(index):
                    fn = _cuda_load_module(cubin, ["int8_rows"])["int8_rows"]
                _KERNELS[key] = fn
    return fn


def supports(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, n: int) -> bool:
    """Whether int8_rows takes this call (else the Triton GEMV does): bf16 x of 1..8 rows
    on CUDA, a contiguous int8 (N, K) W with K a multiple of 64, one float32 scale a row,
    16-byte aligned tensors."""
    m, k = x.shape
    return (x.is_cuda and x.dtype == torch.bfloat16 and 1 <= m <= MAX_ROWS
            and k % CHUNK == 0 and q.dtype == torch.int8 and tuple(q.shape) == (n, k)
            and q.is_contiguous() and scale.dtype == torch.float32
            and tuple(scale.shape) == (n, 1) and scale.is_contiguous()
            and x.stride(1) == 1 and x.stride(0) == k
            and x.data_ptr() % 16 == 0 and q.data_ptr() % 16 == 0)


def launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, n: int,
           form: Int8Form | None = None) -> torch.Tensor:
    """y (M, N) bf16 = (x (M, K) @ q^T) * scale (``supports`` must hold)."""
    m, k = x.shape
    index = C.device_index(x.device)
    if form is None:
        form = _rule_form(index, 1 << (m - 1).bit_length(), n)
    pdl = C.pdl_launch(index)
    fn = kernel(index, form, pdl)
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    blocks = -(-n // (16 * form.nt))
    args = [x, q, scale, y, m, n, k]
    with torch.cuda.device(x.device):
        if pdl:
            C._launch_dependent(fn, blocks, form.warps * 32, args, 0)
        else:
            fn(grid=(blocks, 1, 1), block=(form.warps * 32, 1, 1), args=args, shared_mem=0)
    return y


_OK: dict[int, bool] = {}


def ok(device: torch.device) -> bool:
    """Whether int8_rows compiles and gives the right numbers on ``device`` (a small case
    against float64, checked once a device, at load: kernels.wquant's conversion asks
    first; inside a CUDA graph's capture an unchecked device says no); says why once
    where it does not."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    index = C.device_index(device)
    if index not in _OK:
        if torch.cuda.is_current_stream_capturing():
            return False
        _OK[index] = _check(torch.device("cuda", index))
    return _OK[index]


def _check(device: torch.device) -> bool:
    index = device.index
    if torch.cuda.get_device_properties(index).major < 8:
        log.warning("int8_rows needs sm_80 or later; int8 keeps the Triton GEMV")
        return False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randint(-127, 128, (48, 192), generator=g, dtype=torch.int8)
        s = torch.rand(48, 1, generator=g) + 0.5
        x = torch.randn(3, 192, generator=g).to(torch.bfloat16)
        y = launch(x.to(device), w.to(device), s.to(device), 48).cpu().double()
        ref = (x.double() @ w.double().t()) * s.double().t()
        bound = 2.0 ** -7 * ((x.double().abs() @ w.double().abs().t()) * s.double().t())
        if not bool(((y - ref).abs() <= bound + 1e-6).all()):
            raise RuntimeError(f"wrong result: max error {(y - ref).abs().max():.3g}")
        return True
    except Exception as e:  # noqa: BLE001 - any failure keeps the Triton GEMV, said once
        log.warning("int8_rows is not used on %s (%s); int8 keeps the Triton GEMV", device, e)
        return False
