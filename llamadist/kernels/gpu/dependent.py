"""The Triton side of programmatic dependent launches (``llamadist.kernels.gpu``'s
``dependent_launches`` says when they are on): a kernel compiled with PDL calls ``enter``
before its first load, and is launched with ``launch_options(True)``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def enter(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished and its writes are
    visible, then let the kernel after this one launch (it waits for this one the same
    way). Without: nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """The launch's keyword arguments: Triton's ``launch_pdl`` where ``pdl``."""
    return {"launch_pdl": True} if pdl else {}
