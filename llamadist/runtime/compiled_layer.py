"""The decoder layer under torch.compile (one compiled artifact for every layer and stage of
the same shapes), and the import of the compiler started early, beside the weight load.

``import torch._dynamo`` and Inductor's modules take seconds (7.9 s of a 30 s ``generate``
of an 8B model on the H200 host, on the main thread at the first decode step). A stage
on CUDA that will decode through compiled layers (kernel_passes.compile_expected: the
run's ``compile``, or where compiling pays) calls ``start_compiler_import`` as its build
begins: a background
thread makes the compiled layer (importing torch._dynamo) and imports Inductor's compile
path while the main thread loads weights, which mostly waits on copies and reads with
the GIL released. ``compiled_layer_call`` waits for that thread.

Two threads importing at once is mostly safe in Python: each module has its own import
lock and a module another thread is importing is waited for, but a cycle of such waits
hands one thread a partially initialised module. Triton's package has such cycles, and
the main thread imports it while weights load (``kernels.gpu.ready``), so this thread
imports triton first, under that function's lock (``kernels.gpu.IMPORT_LOCK``), and
only then torch._dynamo, which imports it too. Anything the thread raises is kept: the
thread's failure is logged and the main thread then imports as it would have without it
(so a real import error surfaces there, with its traceback).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

# Imported by the background thread after the compiled layer is made: what the first
# compile would import on the main thread (the CUDA codegen only where Triton is).
COMPILE_MODULES = ("torch._inductor.compile_fx", "torch._inductor.async_compile")
CUDA_MODULES = ("torch._inductor.codegen.triton",)
SWITCH_S = 0.0002  # the GIL's switch interval while the background import runs

_COMPILED_LAYERS: dict[bool, object] = {}  # by dependent launches (``pdl``)
_lock = threading.Lock()  # making _COMPILED_LAYERS's
_start_lock = threading.Lock()  # starting the importer
_saved_interval: float | None = None  # the switch interval the import thread found
_importer: threading.Thread | None = None
_import_error: BaseException | None = None
import_s = 0.0  # how long the background import took (for the log and the benchmark)


def _call_layer(layer, h, pending, cos, sin, cache, start, mask):
    return layer.forward_deferred(h, pending, cos, sin, cache, start, mask)


def _call_layer_pdl(layer, h, pending, cos, sin, cache, start, mask):
    # the same, as its own code object: torch._dynamo keeps its compiled entries on the
    # code, so the artifact with dependent launches never stands in for the other
    return layer.forward_deferred(h, pending, cos, sin, cache, start, mask)


def _make_compiled_layer(pdl: bool = False):
    """The compiled layer; ``pdl``: Inductor's Triton kernels as programmatic dependent
    launches (the stage's dependent_launches: llamadist.kernels.gpu)."""
    with _lock:
        if pdl not in _COMPILED_LAYERS:
            import torch._dynamo
            cfg = torch._dynamo.config
            # One entry per batch bucket and dtype; the default limit of 8 would silently
            # fall back to eager for a model used with many buckets.
            cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
            import torch._inductor.config as inductor
            made = pdl and hasattr(inductor.triton, "enable_pdl")  # a torch that has it
            if made not in _COMPILED_LAYERS:
                _COMPILED_LAYERS[made] = torch.compile(
                    _call_layer_pdl if made else _call_layer, fullgraph=True, dynamic=None,
                    options={"triton.enable_pdl": True} if made else None)
                # Inductor's atexit hook (registered by that import) would wait for its
                # compile workers; ours, registered after it, runs first and kills them.
                from llamadist.runtime.compile_workers import stop_at_exit
                stop_at_exit()
            _COMPILED_LAYERS[pdl] = _COMPILED_LAYERS[made]
    return _COMPILED_LAYERS[pdl]


def compiled_layer_call(pdl: bool = False):
    """``layer_fn`` for Llama.forward: the decoder layer under torch.compile, shared by
    every layer (parameters are inputs). Shapes are static at the first batch size seen
    (the one-sequence bucket, where fused kernels matter most, or the first bucket past
    the rows of a stage's ``compile_from``) and dynamic in the batch
    from the second (torch's automatic dynamic shapes): two compilations in all, and two
    more for a stage's first layer, which has no pending residual, instead of two per
    batch bucket (9 buckets at max_batch 256 took minutes to warm up). ``pdl``: Inductor's
    kernels launched as programmatic dependent launches (a second compiled artifact)."""
    wait_compiler_import()
    return _make_compiled_layer(pdl)


def _import_compiler(cuda: bool) -> None:
    global _import_error, import_s
    t0 = time.perf_counter()
    # The load calls thousands of torch ops (~14 a tensor), each releasing the GIL and
    # taking it back; with this thread busy importing, each take waits for the switch
    # interval (5 ms by default: seconds over an 8B model). Shorter while the import runs.
    global _saved_interval
    with _start_lock:
        interval = _saved_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_S))
    try:
        if cuda:  # triton first, under kernels.gpu's lock: torch._dynamo imports it too
            from llamadist.kernels import gpu
            gpu.ready()
        _make_compiled_layer()
        import importlib
        for name in COMPILE_MODULES + (CUDA_MODULES if cuda else ()):
            importlib.import_module(name)
    except BaseException as e:  # noqa: BLE001 - kept for the main thread, which retries
        _import_error = e
    finally:
        with _start_lock:
            if _saved_interval is not None:  # not restored by load_done yet
                sys.setswitchinterval(interval)
                _saved_interval = None
    import_s = time.perf_counter() - t0


def load_done() -> None:
    """The weight loads this import overlaps are over (every stage of the process):
    Python's switch interval back to what it was (the import may go on; the host's own
    steps should not pay for it)."""
    global _saved_interval
    with _start_lock:
        if _saved_interval is not None:
            sys.setswitchinterval(_saved_interval)
            _saved_interval = None


def start_compiler_import(cuda: bool = True) -> bool:
    """Start importing the compiler in a background thread (once per process) -> whether
    this call started it. ``cuda``: import the Triton codegen as well."""
    global _importer
    with _start_lock:
        if _importer is not None or _COMPILED_LAYERS:
            return False
        _importer = threading.Thread(target=_import_compiler, args=(cuda,),
                                     name="llamadist-compiler-import", daemon=True)
        _importer.start()
    return True


def wait_compiler_import() -> None:
    """Wait for the background import, if one was started; log what it raised (the
    caller then imports on this thread, where a lasting error raises)."""
    global _import_error, _importer
    with _start_lock:
        importer, _importer = _importer, None  # the first caller reports, once
    if importer is None:
        return
    t0 = time.perf_counter()
    importer.join()
    waited = time.perf_counter() - t0
    if _import_error is not None:
        e, _import_error = _import_error, None
        log.warning("importing torch.compile in the background failed (%s: %s); the "
                    "first compile imports what is missing", type(e).__name__, e)
    else:
        log.info("compiler imported in the background in %.1f s (waited %.1f s for it)",
                 import_s, waited)
