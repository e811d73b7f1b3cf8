"""llamadist's Triton kernels, imported only where one runs.

``import triton`` costs a CPU-only process ~80 MiB and ~0.3 s that it never uses, so every
module that imports triton lives in this package and is reached through ``load`` alone,
on a kernel's first call (a CUDA device, or Triton's CPU interpreter in the tests). The
kernel's front module in ``llamadist.kernels`` (paged_attention, decode_attention,
moe_routed, wquant_triton) holds what any process may touch without triton: ``usable``,
the launch planning (splits, tiles), and the torch custom op (``llamadist::...``) whose
implementation calls ``load``. The op is registered when the front module is imported, so
torch.compile and CUDA-graph capture see the same opaque op as before; the traced code
never imports anything. This file itself must not import triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

# Whether triton can be imported, found without importing it (a path lookup).
INSTALLED = importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton's CPU interpreter is asked for (TRITON_INTERPRET=1, set before the
    first kernel loads): the kernels then take CPU tensors (the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: triton installed, and a CUDA
    device or the interpreter."""
    return INSTALLED and (device.type == "cuda" or interpreted())


def load(name: str) -> ModuleType:
    """The Triton module ``llamadist.kernels.gpu.<name>``, imported (with triton) on the
    first call."""
    if not INSTALLED:
        raise RuntimeError(f"llamadist.kernels.gpu.{name} needs triton, which is not "
                           "installed (pip install triton; CUDA builds of torch bring it)")
    return importlib.import_module(f"{__name__}.{name}")
