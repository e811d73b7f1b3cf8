"""The Triton code of llamadist.kernels.l2_prefetch (see its docstring): one kernel whose
programs each ask the L2 for a chunk of up to four byte ranges (sm_90's bulk prefetch), then
take their place in the chain of dependent launches. Imported only through
llamadist.kernels.gpu.load, on the first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels.gpu.dependent import dependent, enter

CHUNK = 65536  # bytes a program asks for (a multiple of 16, as the bulk prefetch's size)


@triton.jit
def _ask(base, nbytes, chunk, CHUNK: tl.constexpr):
    """Chunk ``chunk`` of the ``nbytes`` bytes (a multiple of 16) at ``base`` (16-byte
    aligned) into the L2: a hint, nothing waits for it."""
    at = chunk * CHUNK
    size = tl.minimum(nbytes - at, CHUNK).to(tl.int32)
    p = base.to(tl.pointer_type(tl.uint8)) + at
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
                              "=r,l,r", [p, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(A, B, C, D, na, nb, nc, nd, CHUNK: tl.constexpr, PDL: tl.constexpr):
    # Program p: chunk p of the ranges laid end to end (each range's byte count a multiple
    # of 16), asked for before enter: weights, which no kernel of the step writes.
    pid = tl.program_id(0).to(tl.int64)
    ca = tl.cdiv(na, CHUNK)
    cb = ca + tl.cdiv(nb, CHUNK)
    cc = cb + tl.cdiv(nc, CHUNK)
    if pid < ca:
        _ask(A, na, pid, CHUNK)
    elif pid < cb:
        _ask(B, nb, pid - ca, CHUNK)
    elif pid < cc:
        _ask(C, nc, pid - cb, CHUNK)
    else:
        _ask(D, nd, pid - cc, CHUNK)
    enter(PDL)


def prefetch(ranges: list[tuple[torch.Tensor, int]]) -> None:
    """Ask the L2 for the first ``n`` bytes of each (tensor, n) of ``ranges`` (1 to 4 CUDA
    tensors, each 16-byte aligned; n a multiple of 16, at most its bytes)."""
    chunks = sum(-(-n // CHUNK) for _, n in ranges)
    if not chunks:
        return
    padded = list(ranges) + [(ranges[0][0], 0)] * (4 - len(ranges))
    tensors, sizes = zip(*padded)
    _prefetch_kernel[(chunks,)](*tensors, *sizes, CHUNK=CHUNK, num_warps=1,
                                **dependent(tensors[0].device))
