"""Weights into the L2 ahead of the kernel that reads them (sm_90's bulk prefetch).

A decode step's attention kernels (the paged write, split and merge: ~7 us of a Llama-3-8B
layer on an H200) read a few hundred KB of K/V while the DRAM could stream ~28 MB, and
the projections after them read theirs only once they start. ``prefetch`` launches one
small kernel whose programs ask the L2 for chunks of given byte ranges
(``cp.async.bulk.prefetch.L2``: a hint, nothing waits for it) and then take their place
in the chain of dependent launches (llamadist.kernels.gpu.dependent). Called after a
decoder layer's attention (Attention.l2_prefetch, set by
llamadist.runtime.kernel_passes.use_l2_prefetch) with o's weights whole and the MLP's
first bytes up to BUDGET: o's kernel is one wave (its time is its slowest block's, so it
gains only when all of its words are near), gate | up's several waves (its first wave's
words are worth having early by themselves).

Eager layers only (outside torch.compile, as every fused kernel a pass sets), CUDA sm_90+.
"""

from __future__ import annotations

import torch
from torch import nn

from llamadist.kernels import gpu

# Bytes asked for after each decoder layer's attention: o's weights, then the MLP's (its
# smaller tensors whole, its largest one's first bytes) while the budget lasts; 0: off.
# Not yet timed (gpu_session.sh attn38).
BUDGET = 0
ALIGN = 16  # the bulk prefetch's address and size unit


def usable(device: torch.device) -> bool:
    """Whether ``prefetch`` can run on ``device``: NVIDIA sm_90+ with Triton (not ROCm, never
    under the interpreter: its programs are PTX)."""
    return (device.type == "cuda" and torch.version.hip is None and gpu.INSTALLED
            and not gpu.interpreted() and torch.cuda.get_device_capability(device)[0] >= 9)


def read_tensors(module: nn.Module, device_type: str = "cuda") -> list[torch.Tensor]:
    """The tensors on ``device_type`` a linear's product reads (its own parameters and
    buffers: a PackedLinear's codes and scales, not its host copy), largest first."""
    found = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
             if isinstance(t, torch.Tensor) and t.device.type == device_type]
    return sorted(found, key=lambda t: -t.nbytes)


def ranges(whole: list[nn.Module], head: list[nn.Module], budget: int,
           device_type: str = "cuda") -> list[tuple[torch.Tensor, int]]:
    """(tensor, bytes) to ask for, at most ``budget`` bytes in all: every tensor of the
    ``whole`` modules, then of the ``head`` modules their smaller tensors whole and their
    largest one's first bytes; sizes rounded down to ALIGN, tensors not ALIGN-aligned left
    out. At most 4 ranges (the kernel's), the largest kept where there are more."""
    out, left = [], budget

    def take(t: torch.Tensor, n: int) -> None:
        nonlocal left
        n = min(n, left) // ALIGN * ALIGN
        if n > 0 and t.data_ptr() % ALIGN == 0:
            out.append((t, n))
            left -= n

    for m in whole:
        for t in read_tensors(m, device_type):
            take(t, t.nbytes)
    for m in head:
        ts = read_tensors(m, device_type)
        for t in ts[1:]:
            take(t, t.nbytes)
        if ts:
            take(ts[0], ts[0].nbytes)
    return sorted(out, key=lambda r: -r[1])[:4]


def prefetch(found: list[tuple[torch.Tensor, int]]) -> None:
    """Ask the L2 for each (tensor, bytes) of ``found`` (``ranges``'s) on their device."""
    if found:
        gpu.load("l2_prefetch").prefetch(found)
