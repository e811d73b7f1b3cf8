"""llamadist's Triton kernels, imported only where one runs.

``import triton`` costs a CPU-only process ~80 MiB and ~0.3 s that it never uses, so every
module that imports triton lives in this package and is reached through ``load`` alone,
on a kernel's first call (a CUDA device, or Triton's CPU interpreter in the tests). The
kernel's front module in ``llamadist.kernels`` (paged_attention, decode_attention,
moe_routed, wquant_triton) holds what any process may touch without triton: ``usable``,
the launch planning (splits, tiles), and the torch custom op (``llamadist::...``, made by
``custom_op``) whose implementation calls ``load``. The op is registered when the front
module is imported, so torch.compile sees an opaque op and the traced code never imports
anything; outside compile the implementation is called directly (see ``custom_op``). This
file itself must not import triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import threading
from types import ModuleType
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Whether a triton package is on the path, found without importing it (a path lookup; a
# folder that `pip uninstall` left behind is a namespace package, with no origin).
_SPEC = importlib.util.find_spec("triton")
INSTALLED = _SPEC is not None and _SPEC.origin is not None
_MODULES: dict[str, ModuleType] = {}
# Held while triton is first imported: by ``ready`` and by the compiler's background import
# (runtime.compiled_layer), so the two threads never import triton at once (Python then
# hands one of them a partially initialised module: seen on the H200 as "partially
# initialized module 'triton.language' has no attribute 'core'", which left triton broken
# for the process)
IMPORT_LOCK = threading.Lock()


@functools.cache
def ready() -> bool:
    """INSTALLED, and triton imports: checked once, by importing it, so call it only
    where a kernel would run next (a CUDA device, or the interpreter). A broken install
    is logged once and the callers take their PyTorch paths, as without triton. Asked
    where kernels are chosen (kernel passes, at load), never in code torch.compile traces
    (which reads INSTALLED: a broken install then fails at ``load`` with its reason)."""
    if not INSTALLED:
        return False
    try:
        with IMPORT_LOCK:  # the whole of triton (its backends too) on one thread at a time
            importlib.import_module("triton.language")
    except Exception as e:  # noqa: BLE001 - any failure to import means: not usable
        log.warning("triton is installed but does not import (%s: %s): llamadist's Triton "
                    "kernels are off, the PyTorch paths serve", type(e).__name__, e)
        return False
    return True


def interpreted() -> bool:
    """Whether Triton's CPU interpreter is asked for (TRITON_INTERPRET=1, set before the
    first kernel loads): the kernels then take CPU tensors (the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: triton installed, and a CUDA
    device or the interpreter."""
    return (device.type == "cuda" or interpreted()) and ready()


def load(name: str) -> ModuleType:
    """The Triton module ``llamadist.kernels.gpu.<name>``, imported (with triton) on the
    first call (then from a dict: eager steps call it once per op)."""
    module = _MODULES.get(name)
    if module is None:
        if not ready():
            raise RuntimeError(f"llamadist.kernels.gpu.{name} needs triton, which is not "
                               "installed or does not import (pip install triton; CUDA "
                               "builds of torch bring it)")
        module = _MODULES[name] = importlib.import_module(f"{__name__}.{name}")
    return module


def _like_first(first, *_):
    return first.new_empty(first.shape)


def custom_op(name: str, impl: Callable, mutates_args: tuple[str, ...] = (),
              fake: Callable = _like_first) -> Callable:
    """``impl`` registered as the torch custom op ``name`` (``fake`` gives its output's
    shape and dtype: by default those of its first argument), and a function that calls
    the op where torch.compile traces (an opaque op in the graph, as compiled layers need)
    and ``impl`` itself everywhere else. The op's own dispatch wrapper imports
    torch._dynamo at its first call: seconds (8 s of a ``--no-compile`` generate's first
    decode step on the H200 host, under py-spy) that eager layers and CUDA graphs of eager
    layers never use."""
    op = torch.library.custom_op(name, impl, mutates_args=mutates_args)
    op.register_fake(fake)

    @functools.wraps(impl)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return impl(*args, **kwargs)

    call.op = op
    return call


# ---- programmatic dependent launches --------------------------------------------------------
# A kernel launched with CUDA's programmatic stream serialization (sm_90+) may start while
# the kernel before it in the stream still runs; it calls griddepcontrol.wait (Triton's
# gdc_wait) before it reads what that kernel wrote, and griddepcontrol.launch_dependents
# to let the next such kernel start. CUDA graphs keep these as programmatic edges. It pays
# along a chain of kernels that take part: in an int4 decode layer on the H200
# (RESULTS.md, session 23) int4_rows and Inductor's kernels together took the batch-1 step
# from 2.354 to 2.207 ms, where either alone made it slower (2.507, 2.402: a kernel that
# never signals makes the next one wait for its end anyway, and the wait costs); with
# every llamadist kernel of the step taking part, 1.06-1.09x faster in every format, bf16
# included (cuBLAS's kernels do not). A stage's decode graphs are captured inside
# ``dependent_launches`` (RuntimeConfig.dependent_launches, where ``pdl_supported``), and
# each kernel asks ``launch_dependent`` as it launches.
_CHAIN = threading.local()
PDL_DRIVER = 12030  # CUDA 12.3: stream capture keeps programmatic launches as graph edges
# Where llamadist's Triton kernels let the kernel after them launch: False, after their
# own wait (the kernel after starts once this one's kernel before has ended); True, before
# it (once this one has started: the wait is what orders the data, so both are correct),
# so a chain of short kernels (the paged write, split and merge) lets the projection after
# them launch at their start and issue its first words (and its L2 prefetch, cuda_int4.
# L2_PREFETCH) while they run. Not yet timed (gpu_session.sh attn38).
TRIGGER_FIRST = False


@functools.cache
def pdl_supported(index: int) -> bool:
    """Whether CUDA device ``index`` takes programmatic dependent launches inside CUDA
    graphs: NVIDIA sm_90 or later, driver 12.3 or later, and a Triton whose kernels can
    wait (``triton.language.extra.cuda.gdc_wait``; 3.6 and 3.7 have it): the chain is
    mostly llamadist's Triton kernels, and int4_rows alone as one is slower."""
    if torch.version.hip is not None or torch.cuda.get_device_capability(index)[0] < 9:
        return False
    if not ready():
        return False
    try:
        cuda_extra = importlib.import_module("triton.language.extra.cuda")
    except ImportError:
        return False
    if not hasattr(cuda_extra, "gdc_wait"):
        return False
    import ctypes
    version = ctypes.c_int(0)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    return lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value >= PDL_DRIVER


@contextlib.contextmanager
def dependent_launches(on: bool = True):
    """Inside (``on``), llamadist's kernels on CUDA devices launch as programmatic
    dependent launches: only where ``pdl_supported``."""
    before = getattr(_CHAIN, "on", False)
    _CHAIN.on = on
    try:
        yield
    finally:
        _CHAIN.on = before


def launch_dependent(device: torch.device) -> bool:
    """Whether a kernel launched now on ``device`` launches as a dependent one."""
    return getattr(_CHAIN, "on", False) and device.type == "cuda"
