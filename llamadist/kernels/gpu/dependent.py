"""The Triton side of programmatic dependent launches (``llamadist.kernels.gpu``'s
``dependent_launches`` says when they are on): a kernel takes a ``PDL`` constexpr, calls
``enter(PDL)`` before its first load of anything a kernel of this step may have written
(before it only what none writes: the weights, the decode graph's lengths and block tables
copied from the host, the K/V of earlier steps), and is launched with
``**dependent(device)``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels import gpu


@triton.jit
def enter(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished and its writes are
    visible, then let the kernel after this one launch (it waits for this one the same
    way); PDL 2 (gpu.TRIGGER_FIRST): let it launch first, then wait. Without: nothing."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    elif PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def dependent(device: torch.device) -> dict:
    """A launch's keyword arguments on ``device``: the kernel's PDL constexpr (2 where
    gpu.TRIGGER_FIRST) and Triton's ``launch_pdl`` together, on where
    ``gpu.launch_dependent`` says so."""
    if not gpu.launch_dependent(device):
        return {"PDL": False}
    return {"PDL": 2 if gpu.TRIGGER_FIRST else True, "launch_pdl": True}
