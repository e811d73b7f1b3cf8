"""Weights a CPU decode step streams, moved into memory backed by transparent huge pages.

A decode step reads every weight once (SmolLM2-135M in F16: ~270 MB a token). Through
4 KiB pages that is ~66,000 pages a step, far beyond the TLB, so the GEMVs' streams stall
on page walks. Linux backs anonymous memory with 2 MiB pages where asked
(``/sys/kernel/mm/transparent_hugepage/enabled``: ``always``, or ``madvise`` and a
``madvise(MADV_HUGEPAGE)`` on the range), but PyTorch's allocator gives each tensor its
own 4 KiB-aligned block and nobody advises it. ``move(tensors)`` copies the given tensors
into one anonymous mapping, 2 MiB aligned and advised before its first touch (so the
copy's page faults take huge pages directly), and points each tensor at its place there
(``Tensor.set_``: the same tensor objects, whose ``data_ptr`` changes; anything holding
the old pointer must be built after). Elsewhere (not Linux, THP off) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

from llamadist.kernels import weight_version

log = logging.getLogger(__name__)

HUGE = 2 << 20  # bytes of an x86-64 / arm64 transparent huge page
MIN_BYTES = 1 << 20  # smaller tensors are not worth moving (norms, biases)
_ALIGN = 64  # each tensor's start in the arena: a cache line
TRIM_BYTES = 16 << 20  # freed old copies given back to the system at least this often
_malloc_trim = None  # glibc's malloc_trim, False where there is none


def available() -> bool:
    """True where the kernel backs an advised anonymous range with huge pages."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def move(tensors, advise: bool = True, min_bytes: int = MIN_BYTES) -> int:
    """Copy the distinct CPU tensors of ``tensors`` (each at least ``min_bytes``, the
    whole of its storage, contiguous) into one arena advised MADV_HUGEPAGE and point them
    at it; tensors sharing one storage keep sharing it. Returns the bytes moved (0 where
    huge pages are not available). ``advise`` False: the same arena without the advice
    (for measuring what the advice alone does)."""
    if not available():
        return 0
    slots: dict[int, int] = {}  # the old data_ptr -> byte offset in the arena
    todo, size = [], 0
    for t in tensors:
        if not (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()
                and t.nbytes >= max(min_bytes, 1) and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == t.nbytes):
            continue
        ptr = t.data_ptr()
        if ptr not in slots:
            slots[ptr] = size
            size += (t.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        todo.append((t, ptr))
    if not todo:
        return 0
    span = (size + HUGE - 1) // HUGE * HUGE
    try:  # private: an anonymous MAP_SHARED mapping is shmem, which shmem_enabled governs
        mm = mmap.mmap(-1, span + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:  # e.g. ENOMEM under strict overcommit: the weights stay put
        log.warning("no huge-page arena for the CPU step's weights (%s): left in place", e)
        return 0
    arena = torch.frombuffer(mm, dtype=torch.uint8)  # keeps ``mm`` alive
    lead = (-arena.data_ptr()) % HUGE  # the first 2 MiB boundary inside the mapping
    if advise:
        # madvise wants a page-aligned start; lead is a multiple of 2 MiB from a page start
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, lead, span)
        except OSError as e:  # a sandbox that refuses it: an arena of plain pages
            log.warning("madvise(MADV_HUGEPAGE) refused (%s): the weights move without it", e)
    copied: set[int] = set()  # old pointers whose data is in the arena
    since_trim = 0
    for t, ptr in todo:
        if t.data_ptr() != ptr:
            continue  # listed twice (a tied weight): moved already
        off = lead + slots[ptr]
        if ptr not in copied:
            arena[off:off + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
            copied.add(ptr)
            since_trim += t.nbytes
        # a tensor made under inference_mode may only be changed in place under it
        with torch.inference_mode() if t.is_inference() else torch.no_grad():
            t.set_(arena.untyped_storage(), off // t.element_size(), t.shape, t.stride())
        if since_trim >= TRIM_BYTES:
            _trim()
            since_trim = 0
    _trim()
    weight_version.changed()  # the same objects at new addresses: plans compare pointers
    log.debug("moved %d tensors (%.1f MB) into a %s arena", len(todo), size / 1e6,
              "huge-page" if advise else "plain")
    return size


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): the old
    copies of the moved tensors are freed inside malloc's heap, which would otherwise keep
    them resident next to the arena (peak memory: weights twice)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # absent outside glibc
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
