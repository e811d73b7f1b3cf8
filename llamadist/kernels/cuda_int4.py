"""int4 decode products in CUDA C++ (int4_rows.cu), compiled at first use by NVRTC.

Why not Triton: a one-row int4 product is bound by the bytes of W, and reaching them
takes ~1-2 instructions a weight. Triton's layouts cost several times that (RESULTS.md,
sessions 17-19: three Triton forms, CUDA cores and wgmma, all behind tinygemm), and
tinygemm itself, built for 16-row tiles, reads Llama-3-8B's int4 linears at about a third
of the H200's bandwidth at one row. ``int4_rows.cu`` reads tinygemm's own words (so the
GPU keeps one copy of the weight) as mma.m16n8k16's operands, one AND-OR a pair of
codes: up to 8 rows W is the A operand (two n-tiles an mma) and x's rows the B columns;
see its header. Measured on an H200 (RESULTS.md, session 21): Llama-3-8B's four linears
at one row in 74% of tinygemm's time (53.4 against 72.0 us a layer; ~2 TB/s), 1.5-1.9x
faster at 4 rows, 2.0-2.8x at 8; the 8B batch-1 decode step 0.515x bf16's (tinygemm 0.636x).

How it is built and run, with what torch ships: NVRTC (libnvrtc, a dependency of CUDA
builds of torch: the ``nvidia-cuda-nvrtc`` wheel, or the toolkit's) compiles the source,
with no CUDA headers (only cuda_mma.cuh, handed over in memory), to a cubin for the
device's architecture, and torch's driver-API loader (``torch.cuda._utils.
_cuda_load_module``) launches it on the current stream, so CUDA graphs capture it. Each
(device, config) compiles once a process (~0.3 s); ``wquant_torch.int4_rows_ok`` checks
a small case on the device first, and where anything is missing (no NVRTC, ROCm, a GPU
below sm_80, a compile error) it says why once and int4 keeps tinygemm.

Numerics: the mma sums (128 + code) * x in float32 for each group, then applies that
group's scale and zero once: sum w x = s acc + (z - 136 s) sum x, x's sum from the same
mma against ones. tinygemm instead rounds each w = (code - 8) s + z to bf16 first; both
are within bf16's rounding of the float64 product (tests/gpu/test_cuda_int4_gpu.py).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llamadist.kernels import gpu

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_rows.cu")
# rows a call may have (the A operand's 16)
MAX_ROWS = 16


@dataclass(frozen=True)
class RowsConfig:
    """One compiled form of int4_rows: warps a block, n-tiles (8 rows of W) a block, the
    most rows of x it takes (1..16: the ring holds as many), the k-tiles of words each warp
    has in flight + 1, whether W is the mma's A operand where it can be (``a_w``), and
    whether a grid of one wave of blocks loops over the tiles (``persist``: the ring runs
    on from one tile to the next, so each block's loads stay in flight through its sums),
    and whether a warp's step is two consecutive k-tiles of one n-tile (``kpair``, up to 4
    rows: the block's n-tiles one after another, read in address order; int4_rows.cu's
    KP: 1 through the ring, 2 each lane's words straight into its registers)."""
    warps: int = 4
    nb: int = 2
    rows: int = 1
    stages: int = 4
    w_as_a: bool = True
    persist: bool = False
    kpair: int = 0

    def __post_init__(self):
        if self.kpair not in (0, 1, 2):
            raise ValueError(f"int4_rows: kpair is 0, 1 (the ring) or 2 (registers), not "
                             f"{self.kpair!r}")
        if self.kpair and (self.rows > 4 or self.persist):
            raise ValueError(f"int4_rows: a k-pair form takes up to 4 rows and no persist, "
                             f"not {self.rows} rows{', persist' if self.persist else ''}")

    @property
    def a_w(self) -> bool:
        """W as the A operand (two n-tiles an mma, x's rows the B columns): up to 8 rows
        and an even number of n-tiles; else x is the A operand (16 rows, one n-tile)."""
        return self.w_as_a and self.rows <= 8 and self.nb % 2 == 0

    def label(self) -> str:
        if self.kpair:
            return f"w{self.warps}nb{self.nb}s{self.stages}r{self.rows}k{'r' * (self.kpair == 2)}"
        return (f"w{self.warps}nb{self.nb}s{self.stages}r{self.rows}{'a' if self.a_w else ''}"
                f"{'p' if self.persist else ''}")

    def ring_bytes(self, tiles: int, group: int, k: int = 0, norm: bool = False) -> int:
        """The dynamic shared memory a block takes (int4_rows.cu's ring; a k-pair form's
        and NORM's also x's rows whole, ``k`` inputs each: the k-pair form's in k-tiles of
        each row, an even number of them)."""
        if (self.kpair or norm) and k <= 0:
            raise ValueError("a k-pair or NORM form's shared memory depends on K: pass k")
        gpk = max(1, 16 * tiles // group)
        x_rows = self.rows * (8 * tiles + 4)
        if self.kpair:
            pairs = -(-(k // (16 * tiles)) // 2)
            slot = 2 * 32 * tiles // 2 + 2 * gpk * 8 if self.kpair == 1 else 0  # (2: no ring)
            return (self.warps * self.stages * slot + 2 * pairs * x_rows) * 4
        if norm:  # the ring without x's rows, then x's whole rows
            slot = self.nb * 32 * tiles // 2 + self.nb * gpk * 8
            return (self.warps * self.stages * slot + self.rows * (k // 2 + 4)) * 4
        slot = self.nb * 32 * tiles // 2 + self.nb * gpk * 8 + x_rows
        return self.warps * self.stages * slot * 4

    def smem_bytes(self, tiles: int, group: int, k: int = 0, norm: bool = False) -> int:
        """The ring, the static sums over warps (16 rows past 8, else 8; NORM: and of h^2
        a row) and the slots' mbarriers (BULK): a block's shared memory."""
        return self.ring_bytes(tiles, group, k, norm) + self.static_bytes(norm)

    def static_bytes(self, norm: bool = False) -> int:
        """A block's static shared memory: the sums over warps, the slots' mbarriers (BULK;
        counted whether or not), NORM's sums of h^2."""
        return self.warps * self.nb * 8 * (16 if self.rows > 8 else 8) * 4 + \
            self.warps * self.stages * 8 + (self.warps * self.rows * 4 if norm else 0)

    def fit(self, tiles: int, group: int, have: int, k: int = 0,
            norm: bool = False) -> "RowsConfig":
        """This form, with fewer stages (to 2), then fewer warps, until a block's shared
        memory (``norm``: NORM's, x's rows whole) fits ``have`` bytes (an A10 or L4 allows
        99 KiB, an H200 227)."""
        cfg = self
        while cfg.smem_bytes(tiles, group, k, norm) > have and (cfg.stages > 2 or cfg.warps > 1):
            cfg = replace(cfg, stages=cfg.stages - 1) if cfg.stages > 2 else \
                replace(cfg, warps=cfg.warps // 2)
        return cfg


def row_capacity(m: int) -> int:
    """The form's rows for a call of ``m``: the next power of two (1, 2, 4, 8, 16)."""
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"int4_rows takes 1..{MAX_ROWS} rows, not {m}")
    return 1 << (m - 1).bit_length()


def rows_config(m: int, n: int, k: int, sms: int = 132) -> RowsConfig:
    """The form a call of ``m`` rows of an N x K weight takes on a device of ``sms`` SMs
    (``rule_form`` fits it to the device and checks its registers). W is the mma's A
    operand up to 8 rows, 4 n-tiles a block. Up to 4 rows: 2 stages and 8 warps, or 16
    where the grid is at most one block an SM and K gives each warp two k-tiles of 128
    inputs (K >= 4 096: Llama-3-8B's o and down), measured through the decode step
    (RESULTS.md, session 30: H200, Llama-3-8B, int4 + head, batch 1 1.967 / 1.970 ms
    against 2.136-2.151, batch 4 2.164 against 2.360, at session 21's 8 x 4 x 4, whose
    kernels alone had timed within 10% of the fastest of 11 forms). 5-8 rows: 8 x 4 x 4,
    persistent on a wide weight (N >= 4 K: gate_up, whose grid is several waves; 28.2
    against 31.6 us on Llama-3-8B's at 8 rows: session 22). Past 8 rows (x as the A
    operand): 4 x 2 x 4."""
    rows = row_capacity(m)
    if rows > 8:
        return RowsConfig(warps=4, nb=2, rows=rows, stages=4)
    if rows > 4:
        return RowsConfig(warps=8, nb=4, rows=rows, stages=4, persist=n >= 4 * k)
    nb = 4
    one_wave = -(-(n // 8) // nb) <= sms
    return RowsConfig(warps=16 if one_wave and k >= 16 * 2 * 128 else 8, nb=nb, rows=rows,
                      stages=2)


# ---- NVRTC --------------------------------------------------------------------------------
def _nvrtc_candidates() -> list[str]:
    names = []
    major = (torch.version.cuda or "12").split(".")[0]
    for base in sys.path:  # the pip wheels' copies (nvidia-cuda-nvrtc-cu12, nvidia/cu13)
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib",
                                               "libnvrtc.so.*")))
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libnvrtc.so.*")))
    names = [p for p in names if "builtins" not in p and ".alt." not in p]
    # torch's own CUDA major first (an older NVRTC may not know the device)
    names.sort(key=lambda p: not (p.endswith(f".so.{major}") or f"cu{major}" in p))
    return names + [f"libnvrtc.so.{major}", "libnvrtc.so"]


@functools.cache
def nvrtc() -> ctypes.CDLL | None:
    """libnvrtc, loaded once, or None where none is found."""
    for name in _nvrtc_candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    return None


def compile_cubin(arch: str, defines: dict[str, int], source: str | None = None,
                  path: Path = SOURCE) -> bytes:
    """``source`` (else the file at ``path``, int4_rows.cu by default) compiled for
    ``arch`` ("90": sm_90) with these -D values, the kernels' own headers (``*.cuh``
    beside it) given to NVRTC in memory; RuntimeError with NVRTC's log on a compile
    error."""
    return _compile(arch, defines, source, path)[0]


def spill_bytes(arch: str, defines: dict[str, int]) -> int | None:
    """Bytes int4_rows spills to local memory (ptxas's spill stores) compiled for
    ``arch`` with these -D values, None where this NVRTC gives no such report (compiled
    once: ``kernel`` reuses the cubin)."""
    found = re.search(r"Function properties for int4_rows\s*\n[^\n]*?(\d+) bytes spill stores",
                      _compiled(arch, tuple(sorted(defines.items())))[1])
    return int(found.group(1)) if found else None


@functools.cache
def _compiled(arch: str, defines: tuple[tuple[str, int], ...]) -> tuple[bytes, str]:
    """int4_rows's (cubin, log) with ptxas's resource report, or without it (an empty log)
    where this NVRTC does not take ptxas options (the same cubin: the report is a log)."""
    try:
        return _compile(arch, dict(defines), None, SOURCE, PTXAS_REPORT)
    except RuntimeError:  # the option refused (NVRTC's or ptxas's error): a plain compile,
        return _compile(arch, dict(defines), None, SOURCE)[0], ""  # whose errors propagate


PTXAS_REPORT = ("--ptxas-options=-v",)


def _compile(arch: str, defines: dict[str, int], source: str | None, path: Path,
             extra: tuple[str, ...] = (), target: str = "CUBIN") -> tuple[bytes, str]:
    """(cubin, NVRTC's log) of compile_cubin's arguments, with ``extra`` options
    (``target`` "PTX": the PTX of the virtual architecture instead, NUL-terminated)."""
    lib = nvrtc()
    if lib is None:
        raise RuntimeError("libnvrtc was not found (CUDA builds of torch bring it through the "
                           "nvidia-cuda-nvrtc wheel; pip install nvidia-cuda-nvrtc-cu12)")

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")

    src = (source if source is not None else path.read_text()).encode()
    prog = ctypes.c_void_p()
    headers = sorted(SOURCE.parent.glob("*.cuh"))  # in memory: #include "cuda_mma.cuh"
    bodies = (ctypes.c_char_p * len(headers))(*[h.read_bytes() for h in headers])
    names = (ctypes.c_char_p * len(headers))(*[h.name.encode() for h in headers])
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.name.encode(), len(headers),
                                 bodies, names), "create")
    try:
        virtual = "compute" if target == "PTX" else "sm"
        opts = [f"--gpu-architecture={virtual}_{arch}".encode(), b"-std=c++17"] + \
            [o.encode() for o in extra] + \
            [f"-D{k}={v}".encode() for k, v in sorted(defines.items())]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if rc != 0:
            raise RuntimeError(f"NVRTC could not compile {path.name} ({defines}):\n{log}")
        size = ctypes.c_size_t()
        check(getattr(lib, f"nvrtcGet{target}Size")(prog, ctypes.byref(size)), f"{target} size")
        buf = ctypes.create_string_buffer(size.value)
        check(getattr(lib, f"nvrtcGet{target}")(prog, buf), target)
        return buf.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def defines(tiles: int, group: int, cfg: RowsConfig, exact: bool = False,
            probe: int = 0, hi_shift: bool = False, tma: bool = False,
            stagger: bool = False, pdl: bool = False, glu: bool = False,
            min_blocks: int = 1, norm: bool = False, rope: int = 0,
            kvw: bool = False, prefetch: int = 0) -> dict[str, int]:
    return {"TILES": tiles, "GROUP": group, "WARPS": cfg.warps, "NB": cfg.nb,
            "STAGES": cfg.stages, "ROWS": cfg.rows, "CODES_EXACT": int(exact), "PROBE": probe,
            "WA": int(cfg.a_w), "HI_SHIFT": int(hi_shift), "TMA": int(tma),
            "STAGGER": int(stagger), "PERSIST": int(cfg.persist), "PDL": int(pdl),
            "GLU": int(glu), "MINB": min_blocks, "NORM": int(norm), "KP": int(cfg.kpair),
            "ROPE": rope, "KVW": int(kvw), "PREFETCH": prefetch}


# ---- kernels on a device -------------------------------------------------------------------
_KERNELS: dict[tuple, object] = {}
_LOCK = threading.Lock()
CODES_EXACT = False  # True: codes - 8 in bf16 before the mma (A/B of the numerics)
PROBE = 0  # benchmarks only: 1 skips the math, 2 the global loads (wrong numbers)
HI_SHIFT = False  # True: the decode's shifts as IMAD.HI (FMA pipe), not SHF (ALU pipe)
BULK = False  # True: on sm_90+, the ring filled by bulk copies (TMA) instead of cp.async
STAGGER = False  # True: each block's warps start on a rotated k-tile (cp.async only)
# Past 1: the blocks of a form that should share an SM, asked of ptxas through
# __launch_bounds__ (fewer registers, maybe spills; capped by the threads an SM holds):
# a measurement of whether more resident warps read the words faster (session 33's Nsight
# Compute: the one-row rule forms, at 88-100 registers, hold two blocks an SM). Not
# measured yet; the rule's spill check still applies.
MIN_BLOCKS = 1
# None, or a measurement: a function (rows, n, k) -> (warps, nb, stages[, kind]) or None
# giving the k-pair form (int4_rows.cu's KP: a warp's step two consecutive k-tiles of one
# n-tile, the block's words in address order; kind 1 through the ring, the default, 2
# straight into registers) that calls of up to 4 rows take instead of the rule's. Not
# measured yet.
KPAIR = None
# Bytes of words a dependent launch's first blocks bring into the L2 before they wait for
# the kernel before (int4_rows.cu's PREFETCH: each block its whole tile; 0: none). The
# decode step's int4 linears read 55-60% of the DRAM's bandwidth and the attention's
# kernels between q | k | v and o little of it (RESULTS.md, sessions 33 and 38): o's words
# (8.4 MB on Llama-3-8B), launched during the merge kernel, could come in before it starts,
# and the first wave of gate | up's while o runs. Not yet timed (gpu_session.sh attn38).
L2_PREFETCH = 0
PERSIST_BLOCKS = 0  # a persist form's grid: one wave (0), or at most this many blocks (tests)
# True: on sm_90+, always launched as a programmatic dependent launch (its words issued
# before it waits for the kernel before it; see int4_rows.cu): tests and benchmarks. Else
# inside gpu.dependent_launches only.
PDL = False


def _arch(index: int) -> str:
    p = torch.cuda.get_device_properties(index)
    return f"{p.major}{p.minor}"


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def launch_defines(tiles: int, group: int, cfg: RowsConfig, arch: str,
                   pdl: bool = False, glu: bool = False, norm: bool = False,
                   rope: int = 0, kvw: bool = False) -> dict[str, int]:
    """int4_rows's -D values for this form on ``arch`` as launched now: the module's
    switches (CODES_EXACT, PROBE, HI_SHIFT, BULK, STAGGER, MIN_BLOCKS, L2_PREFETCH) where
    they apply (NORM: not BULK or STAGGER; L2_PREFETCH: a dependent launch, a tile a
    block)."""
    tma = BULK and int(arch) >= 90 and not cfg.persist and not norm
    stagger = STAGGER and not tma and not cfg.persist and not norm  # cp.async options
    min_blocks = max(1, min(MIN_BLOCKS, 2048 // (cfg.warps * 32)))
    prefetch = L2_PREFETCH if pdl and not tma and not cfg.persist and not cfg.kpair else 0
    return defines(tiles, group, cfg, CODES_EXACT, PROBE, HI_SHIFT, tma, stagger, pdl, glu,
                   min_blocks, norm, rope, kvw, prefetch)


def kernel(index: int, tiles: int, group: int, cfg: RowsConfig, *, pdl: bool = False,
           glu: bool = False, norm: bool = False, rope: int = 0, kvw: bool = False):
    """The compiled int4_rows for CUDA device ``index`` and this form (compiled and loaded
    once; the variant's switches by keyword: a misplaced one would build a kernel whose
    parameters are not the ones launched); ``pdl``: its programmatic-dependent-launch
    variant (``pdl_launch``); ``glu``: the variant writing silu(gate) * up of a gate | up
    weight; ``norm``: the variant taking RMSNorm(x + res) (its shared memory grows with
    K: all the device allows); ``rope``: the head dimension of the variant rotating q and
    k (0: none); ``kvw``: its variant writing k and v into the paged cache too."""
    launched = launch_defines(tiles, group, cfg, _arch(index), pdl, glu, norm, rope, kvw)
    key = (index, tuple(sorted(launched.items())))
    fn = _KERNELS.get(key)
    if fn is None:
        with _LOCK:
            fn = _KERNELS.get(key)
            if fn is None:
                from torch.cuda._utils import _cuda_load_module
                have = smem_optin(index)
                need = 0 if cfg.kpair or norm else cfg.smem_bytes(tiles, group)  # (a K: launch)
                if need > have:
                    raise ValueError(f"int4_rows form {cfg.label()} needs {need} bytes of "
                                     f"shared memory a block, the device has {have}: fewer "
                                     "warps, n-tiles, stages or rows")
                cubin = _compiled(_arch(index), key[1])[0]
                with torch.cuda.device(index):
                    fn = _cuda_load_module(cubin, ["int4_rows"])["int4_rows"]
                    # the attribute raised past the 48 KiB default whatever the ring's size:
                    # the block's static shared memory counts against the same limit
                    # (a k-pair or NORM form's grows with K: all the device allows past
                    # the static)
                    fn.set_shared_memory_config(
                        have - cfg.static_bytes(norm) if cfg.kpair or norm
                        else max(cfg.ring_bytes(tiles, group), 48 * 1024))
                _KERNELS[key] = fn
    return fn


def launch(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
           group: int, tiles: int, cfg: RowsConfig | None = None,
           glu: bool = False, rope: tuple | None = None,
           kv: tuple | None = None) -> torch.Tensor:
    """y (M, N) bf16 = x (M, K) bf16 @ W^T, W in tinygemm's layout ``packed`` with its
    (G, N, 2) bf16 table; 1 <= M <= MAX_ROWS. Without ``cfg``, the rule's form, fitted to
    the device's shared memory. ``glu``: W is gate | up (N / 2 rows each, N a multiple of
    16) and y (M, N / 2) = silu(gate) * up, the bits eager_fused.silu_mul gives of the
    product. ``rope``: (cos, sin, rot), cos and sin (M, D) bf16: W is q | k | v, heads of
    D rows, and y's first ``rot`` columns (q's and k's heads) leave rotated, the bits
    eager_fused.rope gives of the product's q and k. ``kv`` (with ``rope``): (cache,
    slots, qcols): k's heads (columns qcols to rot) and v's (rot on) also go into the paged
    cache (2, blocks, H_kv, bs, D) bf16 at each row's slot (slots (M,) int32 or int64), as
    eager_fused.rope and then the paged K/V write would store them."""
    m, k = x.shape
    _check_args(x, packed, scales_zeros, n, k, group, tiles, glu)
    head = _check_rope(rope, x, n, glu)
    kvw = _check_kv(kv, x, n, rope)
    x = x.contiguous()
    if x.data_ptr() % 16:  # x's rows and the table are copied in 16-byte chunks
        x = x.clone()
    # GLU takes the product's own form: the same warps sum each output in the same order
    scales_zeros, index, pdl, cfg = _form(x, scales_zeros, n, k, tiles, group, cfg,
                                          rope=head, kvw=kvw)
    if m > cfg.rows:
        raise ValueError(f"int4_rows form {cfg.label()} takes at most {cfg.rows} rows, not {m}")
    if (glu or head) and cfg.nb % 2:
        raise ValueError(f"int4_rows form {cfg.label()}: GLU and RoPE take an even number of "
                         "n-tiles")
    if cfg.kpair and cfg.smem_bytes(tiles, group, k) > smem_optin(index):
        raise ValueError(f"int4_rows form {cfg.label()} needs {cfg.smem_bytes(tiles, group, k)} "
                         f"bytes of shared memory a block at K {k} (x's rows whole), the "
                         f"device has {smem_optin(index)}: fewer warps, stages or rows")
    fn = kernel(index, tiles, group, cfg, pdl=pdl, glu=glu, rope=head, kvw=kvw)
    y = torch.empty(m, n // 2 if glu else n, dtype=torch.bfloat16, device=x.device)
    blocks = tiles_of(cfg, n, glu or bool(head))
    if cfg.persist:  # one wave, each block looping over its tiles
        blocks = min(blocks, PERSIST_BLOCKS
                     or resident_blocks(index, tiles, group, cfg, pdl, glu))
    args, smem = [x, packed, scales_zeros, y, m, n, k], cfg.ring_bytes(tiles, group, k)
    with torch.cuda.device(x.device):
        if head:  # (a pointer past torch's launcher's arguments: through the driver)
            _launch_ex(fn, blocks, cfg.warps * 32, args + epilogue_args(rope, kv), smem, pdl)
        elif pdl:
            _launch_dependent(fn, blocks, cfg.warps * 32, args, smem)
        else:
            fn(grid=(blocks, 1, 1), block=(cfg.warps * 32, 1, 1), args=args, shared_mem=smem)
    return y


def _form(x: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, tiles: int,
          group: int, cfg: RowsConfig | None, **variant) -> tuple:
    """(the table, 16-byte aligned: copied in 16-byte chunks; the device's index; whether
    this launch is a dependent one; ``cfg``, or the rule's form for x's rows and the
    kernel ``variant`` names: _rule_form's norm, glu, rope, kvw)."""
    if scales_zeros.data_ptr() % 16:
        scales_zeros = scales_zeros.clone()
    index = device_index(x.device)
    pdl = pdl_launch(index)
    if cfg is None:
        cfg = _rule_form(index, row_capacity(x.shape[0]), n, k, tiles, group, pdl,
                         _switches(), **variant)
    return scales_zeros, index, pdl, cfg


def _check_rope(rope: tuple | None, x: torch.Tensor, n: int, glu: bool) -> int:
    """The head dimension D of launch's ``rope`` (0 for None), or a ValueError naming what
    is wrong with it."""
    if rope is None:
        return 0
    cos, sin, rot = rope
    m, d = x.shape[0], cos.shape[-1]
    problems = []
    if glu:
        problems.append("RoPE rotates q | k | v, not gate | up (glu)")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (m, d) or t.dtype != torch.bfloat16 or t.device != x.device:
            problems.append(f"{name} must be bfloat16 ({m}, {d}) on x's device, is {t.dtype} "
                            f"{tuple(t.shape)} on {t.device}")
    if d % 16 or d <= 0 or n % d or rot % d or not 0 <= rot <= n:
        problems.append(f"the head dimension {d} must be a multiple of 16 dividing N {n}, and "
                        f"the rotated columns {rot} a multiple of it, at most N")
    if problems:
        raise ValueError("int4_rows (rope): " + "; ".join(problems))
    return d


def _check_kv(kv: tuple | None, x: torch.Tensor, n: int, rope: tuple | None) -> bool:
    """Whether launch's ``kv`` is given (a ValueError naming what is wrong with it)."""
    if kv is None:
        return False
    cache, slots, qcols = kv
    problems = []
    if rope is None:
        raise ValueError("int4_rows (kv): the cache write needs rope (k's heads rotated)")
    d, rot = rope[0].shape[-1], rope[2]
    if (cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[-1] != d
            or cache.dtype != torch.bfloat16 or cache.device != x.device
            or cache.stride(-1) != 1):
        problems.append(f"the cache must be bfloat16 (2, blocks, H_kv, bs, {d}) with "
                        f"contiguous heads on x's device, is {cache.dtype} "
                        f"{tuple(cache.shape)} on {cache.device}")
    elif not (qcols % d == 0 and rot - qcols == n - rot == cache.shape[2] * d):
        problems.append(f"k's columns {qcols}..{rot} and v's {rot}..{n} must each be the "
                        f"cache's {cache.shape[2]} heads of {d}")
    if tuple(slots.shape) != (x.shape[0],) or slots.device != x.device \
            or slots.dtype not in (torch.int32, torch.int64):
        problems.append(f"slots must be int32 or int64 ({x.shape[0]},) on x's device, are "
                        f"{slots.dtype} {tuple(slots.shape)} on {slots.device}")
    if problems:
        raise ValueError("int4_rows (kv): " + "; ".join(problems))
    return True


def kv_fits(kv: tuple, x: torch.Tensor, n: int, rope: tuple) -> bool:
    """Whether launch takes ``kv`` with these x, N and ``rope`` (_check_kv without the
    error: a caller that can leave the write to the cache's own kernel asks this)."""
    try:
        return _check_kv(kv, x, n, rope)
    except ValueError:
        return False


def epilogue_args(rope: tuple | None, kv: tuple | None) -> list:
    """The kernel's parameters past NORM's for ``rope`` and ``kv`` (launch's): cos, sin,
    rot, then the cache, the slots (as int32), qcols, the cache's block size and its
    strides (k to v, a block, a head, a slot) as 64-bit ints."""
    if rope is None:
        return []
    args = [rope[0].contiguous(), rope[1].contiguous(), rope[2]]
    if kv is not None:
        cache, slots, qcols = kv
        args += [cache, slots.to(torch.int32).contiguous(), qcols, cache.shape[3],
                 *(ctypes.c_longlong(cache.stride(i)) for i in range(4))]
    return args


def tiles_of(cfg: RowsConfig, n: int, glu: bool = False) -> int:
    """A product's tiles (its grid, but for a persist form's one wave): NB n-tiles each, or
    (GLU) NB / 2 of gate's and the same of up's."""
    return -(-(n // 16) // (cfg.nb // 2)) if glu else -(-(n // 8) // cfg.nb)


# NORM's rows a call may have: x's whole rows sit in shared memory (8 KB a row at K 4 096)
NORM_MAX_ROWS = 4


def launch_norm(x: torch.Tensor, residual: torch.Tensor | None, gamma: torch.Tensor,
                eps: float, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
                group: int, tiles: int, cfg: RowsConfig | None = None, glu: bool = False,
                rope: tuple | None = None, kv: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual (x itself for None), the residual stream, and y = launch's
    product (``glu``: silu(gate) * up; ``rope``, ``kv``: launch's, q's and k's heads
    rotated, k and v into the cache) of
    RMSNorm(h) with weight ``gamma`` (K,) and ``eps``, as eager_fused.add_rms_norm then
    ``launch`` give them, in one kernel: each block normalises x's rows itself (the norm's
    sums in another order than the Triton kernel's: within an ulp of its bf16 output).
    1 <= M <= NORM_MAX_ROWS."""
    m, k = x.shape
    _check_args(x, packed, scales_zeros, n, k, group, tiles, glu)
    head = _check_rope(rope, x, n, glu)
    kvw = _check_kv(kv, x, n, rope)
    problems = []
    if not 1 <= m <= NORM_MAX_ROWS:
        problems.append(f"x has {m} rows (1..{NORM_MAX_ROWS} with the norm)")
    if k % 8:
        problems.append(f"K {k} must be a multiple of 8")
    if tuple(gamma.shape) != (k,) or gamma.dtype != torch.bfloat16 or gamma.device != x.device:
        problems.append(f"gamma must be bfloat16 ({k},) on x's device, is {gamma.dtype} "
                        f"{tuple(gamma.shape)} on {gamma.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        problems.append(f"the residual must be like x {tuple(x.shape)} {x.dtype}, is "
                        f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    if problems:
        raise ValueError("int4_rows (norm): " + "; ".join(problems))
    # rows read 16 bytes at a time: contiguous, 16-byte aligned
    x, gamma = (t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.contiguous().clone()
                for t in (x, gamma))
    if residual is not None and (not residual.is_contiguous() or residual.data_ptr() % 16):
        residual = residual.contiguous().clone()
    scales_zeros, index, pdl, cfg = _form(x, scales_zeros, n, k, tiles, group, cfg,
                                          norm=True, glu=glu, rope=head, kvw=kvw)
    if m > cfg.rows or cfg.persist or ((glu or head) and cfg.nb % 2):
        raise ValueError(f"int4_rows form {cfg.label()} with the norm: at most {cfg.rows} "
                         "rows, not persistent, an even number of n-tiles for GLU and RoPE")
    smem, have = cfg.ring_bytes(tiles, group, k, norm=True), smem_optin(index)
    if cfg.smem_bytes(tiles, group, k, norm=True) > have:
        raise ValueError(f"int4_rows form {cfg.label()} with the norm needs "
                         f"{cfg.smem_bytes(tiles, group, k, norm=True)} bytes of shared "
                         f"memory a block for K {k}, the device has {have}")
    fn = kernel(index, tiles, group, cfg, pdl=pdl, glu=glu, norm=True, rope=head, kvw=kvw)
    y = torch.empty(m, n // 2 if glu else n, dtype=torch.bfloat16, device=x.device)
    h = x if residual is None else torch.empty_like(x)
    blocks = tiles_of(cfg, n, glu or bool(head))
    args = [x, packed, scales_zeros, y, m, n, k, residual,
            None if residual is None else h, gamma, ctypes.c_float(eps)]
    args += epilogue_args(rope, kv)
    with torch.cuda.device(x.device):
        _launch_ex(fn, blocks, cfg.warps * 32, args, smem, pdl)
    return h, y


def norm_fits(m: int, n: int, k: int, tiles: int, group: int, index: int,
              glu: bool = False, rope: int = 0, kvw: bool = False) -> bool:
    """Whether launch_norm's rule form for ``m`` rows of this shape fits device ``index``'s
    shared memory (x's rows sit whole in it: a long K on a small device does not)."""
    cfg = _rule_form(index, row_capacity(m), n, k, tiles, group, pdl_launch(index),
                     _switches(), norm=True, glu=glu, rope=rope, kvw=kvw)
    return cfg.smem_bytes(tiles, group, k, norm=True) <= smem_optin(index)


def pdl_launch(index: int) -> bool:
    """Whether int4_rows launches as a programmatic dependent launch on device ``index``
    now (``PDL`` or inside gpu.dependent_launches; sm_90 and later; not with BULK)."""
    return (PDL or gpu.launch_dependent(torch.device("cuda", index))) and not BULK \
        and int(_arch(index)) >= 90


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, a 64-byte union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int),
                ("rest", ctypes.c_byte * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _launch_dependent(fn, blocks: int, threads: int, args: list, smem: int) -> None:
    """``fn`` on the current stream through cuLaunchKernelEx with programmatic stream
    serialization allowed (CUDA graphs capture it as a programmatic edge)."""
    _launch_ex(fn, blocks, threads, args, smem, True)


def _launch_ex(fn, blocks: int, threads: int, args: list, smem: int, pdl: bool) -> None:
    """``fn`` on the current stream through cuLaunchKernelEx, with programmatic stream
    serialization allowed (``pdl``: CUDA graphs capture it as a programmatic edge) or not.
    Tensors pass as pointers (None: a null one), ints as C ints, as torch's own launcher
    passes them; ctypes values as they are (a float parameter: c_float)."""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
              else ctypes.c_void_p(0) if a is None
              else a if isinstance(a, ctypes._SimpleCData) else ctypes.c_int(a)
              for a in args]
    params = (ctypes.c_void_p * len(values))(
        *[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(blocks, 1, 1),
                           block=(ctypes.c_uint * 3)(threads, 1, 1), shared=smem,
                           stream=torch.cuda.current_stream().cuda_stream,
                           attrs=ctypes.pointer(attr) if pdl else None,
                           num_attrs=1 if pdl else 0)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    rc = lib.cuLaunchKernelEx(ctypes.byref(config), fn.func, params, None)
    if rc != 0:
        raise RuntimeError(f"int4_rows: cuLaunchKernelEx failed (CUresult {rc})")


@functools.cache
def resident_blocks(index: int, tiles: int, group: int, cfg: RowsConfig,
                    pdl: bool = False, glu: bool = False) -> int:
    """How many blocks of this form device ``index`` holds at once (a wave): the driver's
    occupancy of the compiled kernel, times the SMs."""
    fn = kernel(index, tiles, group, cfg, pdl=pdl, glu=glu)
    lib, per_sm = torch.cuda._utils._get_gpu_runtime_library(), ctypes.c_int(0)
    rc = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(per_sm), fn.func, cfg.warps * 32,
        ctypes.c_size_t(cfg.ring_bytes(tiles, group)))
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    return sms * max(1, per_sm.value) if rc == 0 else sms


def _check_args(x, packed, scales_zeros, n, k, group, tiles, glu=False) -> None:
    """What the kernel assumes and does not check itself (it would read out of bounds)."""
    problems = []
    if glu and n % 16:
        problems.append(f"a gate | up weight's N {n} must be a multiple of 16 (two halves "
                        "of whole n-tiles)")
    if x.dtype != torch.bfloat16 or scales_zeros.dtype != torch.bfloat16:
        problems.append(f"x and the table must be bfloat16 (are {x.dtype}, "
                        f"{scales_zeros.dtype})")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        problems.append(f"x has {x.shape[0]} rows (1..{MAX_ROWS})")
    if n % 8 or k % (16 * tiles) or k % group or group % 32 or group & (group - 1):
        problems.append(f"N {n} must be a multiple of 8, K {k} of {16 * tiles} and of the "
                        f"group {group} (a power of 2 from 32)")
    if tuple(packed.shape) != (n // 8, k // (16 * tiles), 32, tiles // 2) \
            or packed.dtype != torch.int32 or not packed.is_contiguous():
        want = (n // 8, k // (16 * tiles), 32, tiles // 2)
        problems.append(f"packed must be tinygemm's contiguous int32 {want}, is "
                        f"{packed.dtype} {tuple(packed.shape)}")
    elif packed.data_ptr() % 16:
        problems.append("packed must start on a 16-byte boundary (its words are copied 16 "
                        "bytes a lane): a view at an odd offset; pass tinygemm's own tensor")
    if tuple(scales_zeros.shape) != (k // group, n, 2) or not scales_zeros.is_contiguous():
        problems.append(f"the table must be contiguous ({k // group}, {n}, 2), is "
                        f"{tuple(scales_zeros.shape)}")
    if not (x.is_cuda and packed.device == x.device == scales_zeros.device):
        problems.append("x, packed and the table must be on one CUDA device")
    if problems:
        raise ValueError("int4_rows: " + "; ".join(problems))


def smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


@functools.cache
def _rule_form(index: int, rows: int, n: int, k: int, tiles: int, group: int,
               pdl: bool = False, switches: tuple = (), norm: bool = False,
               glu: bool = False, rope: int = 0, kvw: bool = False) -> RowsConfig:
    """The rule's form for calls of up to ``rows`` rows on device ``index``: once a shape,
    launch kind and set of the module's ``switches``, not on every launch (``norm``, with
    ``glu``: launch_norm's kernel; ``rope``: the kernel rotating heads of that many
    dimensions, ``kvw`` writing k and v to the cache too; their spills are their own)."""
    p = torch.cuda.get_device_properties(index)
    form = KPAIR(rows, n, k) if KPAIR is not None and rows <= 4 else None
    if form is not None:
        warps, nb, stages, kind = (*form, 1)[:4]
        return RowsConfig(warps, nb, rows, stages, kpair=kind).fit(
            tiles, group, p.shared_memory_per_block_optin, k, norm)
    return rule_form(rows, n, k, tiles, group, p.multi_processor_count,
                     p.shared_memory_per_block_optin, _arch(index), pdl, glu, norm, rope, kvw)


def _switches() -> tuple:
    """The module switches a launch's -D values follow (``_rule_form``'s cache key)."""
    return CODES_EXACT, PROBE, HI_SHIFT, BULK, STAGGER, MIN_BLOCKS, KPAIR, L2_PREFETCH


def rule_form(rows: int, n: int, k: int, tiles: int, group: int, sms: int, smem: int,
              arch: str, pdl: bool, glu: bool = False, norm: bool = False,
              rope: int = 0, kvw: bool = False) -> RowsConfig:
    """``rows_config``'s form fitted to ``smem`` bytes of shared memory a block. Where its 2
    stages or 16 warps make ptxas spill registers to local memory for ``arch`` (as 8 x 4 x
    2 on sm_90 at 4 tiles and groups of 32 as a dependent launch, or on sm_80 at groups of
    32: ptxas's register targets differ by form), the first of the same at 4 stages, at 8
    warps, at both (session 21's 8 x 4 x 4) that does not, or else the one that spills
    least. Compiled once each (``kernel`` reuses the cubin). ``norm`` (launch_norm's
    kernel, ``glu`` its gate | up variant): the spills checked are that kernel's (the
    product's GLU takes the product's own form, for the product's bits). ``rope``: the
    same of the kernel rotating heads of that many dimensions (ROPE; 8 x 4 x 2 at one row
    spills 12 bytes there on sm_90 as a dependent launch, 8 x 4 x 4 none: the same warps,
    so the same sums as the product's form), and ``kvw`` of its variant writing the cache."""
    cfg = rows_config(rows, n, k, sms).fit(tiles, group, smem, k if norm else 0, norm)
    if cfg.stages != 2:
        return cfg
    best, least = cfg, None
    candidates = (cfg, replace(cfg, stages=4), replace(cfg, warps=8),
                  replace(cfg, warps=8, stages=4))
    for c in dict.fromkeys(c.fit(tiles, group, smem, k if norm else 0, norm)
                           for c in candidates):  # each once
        spilled = spill_bytes(arch, launch_defines(tiles, group, c, arch, pdl, glu and norm,
                                                   norm, rope, kvw))
        if not spilled:  # none, or no report to go by (then the rule's form)
            return c
        if least is None or spilled < least:
            best, least = c, spilled
    return best


def _rows(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
          group: int, tiles: int) -> torch.Tensor:
    return launch(x, packed, scales_zeros, n, group, tiles)


def _rows_shape(x, packed, scales_zeros, n, group, tiles):
    return x.new_empty(x.shape[0], n)


def _glu(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
         group: int, tiles: int) -> torch.Tensor:
    return launch(x, packed, scales_zeros, n, group, tiles, glu=True)


def _glu_shape(x, packed, scales_zeros, n, group, tiles):
    return x.new_empty(x.shape[0], n // 2)


def _rope(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
          group: int, tiles: int, cos: torch.Tensor, sin: torch.Tensor,
          rot: int) -> torch.Tensor:
    return launch(x, packed, scales_zeros, n, group, tiles, rope=(cos, sin, rot))


def _rope_shape(x, packed, scales_zeros, n, group, tiles, *rope):
    return x.new_empty(x.shape[0], n)


def _rope_kv(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
             group: int, tiles: int, cos: torch.Tensor, sin: torch.Tensor, rot: int,
             cache: torch.Tensor, slots: torch.Tensor, qcols: int) -> torch.Tensor:
    return launch(x, packed, scales_zeros, n, group, tiles, rope=(cos, sin, rot),
                  kv=(cache, slots, qcols))


# y (M, N) = x (M, K) @ W^T from tinygemm's int4 layout for M <= MAX_ROWS (the custom op
# torch.compile sees; outside compile the launch itself), and silu(gate) * up (M, N / 2)
# of a gate | up W the same way, and a q | k | v W's product with q's and k's heads
# rotated (cos, sin (M, D), the first ``rot`` columns), k and v also stored in a paged
# cache with rope_kv
int4_rows = gpu.custom_op("llamadist::int4_rows", _rows, fake=_rows_shape)
int4_rows_glu = gpu.custom_op("llamadist::int4_rows_glu", _glu, fake=_glu_shape)
int4_rows_rope = gpu.custom_op("llamadist::int4_rows_rope", _rope, fake=_rope_shape)
int4_rows_rope_kv = gpu.custom_op("llamadist::int4_rows_rope_kv", _rope_kv,
                                  mutates_args=("cache",), fake=_rope_shape)
