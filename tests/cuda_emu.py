"""int4_rows.cu run on a CPU: its source compiled by g++ with tests/cuda_emu.hpp forced in
first (the header says what is emulated and checked), then launched as cuda_int4.launch
launches it on a GPU, on CPU tensors. For tests of the kernel's logic where no GPU is; its
numbers agree with a GPU's within float32's rounding of the sums, not to the bit."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from llamadist.kernels import cuda_int4 as C

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu.hpp"
ENTRY = """
#include "{source}"
#include <string>
extern "C" int emu_int4_rows(unsigned grid, unsigned threads, size_t shared,
                             const u16* x, const u32* words, const u32* sz, u16* y,
                             int M, int N, int K, const size_t* sizes, char* err, int n,
                             const u16* res, u16* hout, const u16* gamma, float eps,
                             const u16* cs, const u16* sn, int rot, u16* kv,
                             const int* slots, int qcols, int bs, long long s_kv,
                             long long s_b, long long s_h, long long s_s) {{
    std::string e = emu::launch(grid, threads, shared,
        {{{{(const char*)x, sizes[0]}}, {{(const char*)words, sizes[1]}},
         {{(const char*)sz, sizes[2]}}}},
        [=] {{ int4_rows(x, words, sz, y, M, N, K
#if NORM
                         , res, hout, gamma, eps
#endif
#if ROPE
                         , cs, sn, rot
#endif
#if KVW
                         , kv, slots, qcols, bs, s_kv, s_b, s_h, s_s
#endif
                         ); }});
    snprintf(err, n, "%s", e.c_str());
    return e.empty() ? 0 : 1;
}}
"""


def available() -> str | None:
    """Why the emulator cannot build here (no g++), or None."""
    return None if shutil.which("g++") else "g++ is not on PATH"


def _cache_dir() -> Path:
    d = Path(os.environ.get("LLAMADIST_EMU_CACHE", Path(tempfile.gettempdir()) / "llamadist-emu"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.cache
def library(defines: tuple[tuple[str, int], ...], source: str | None = None) -> ctypes.CDLL:
    """int4_rows.cu (or ``source``, a variant of its text) with these -D values built for
    the CPU (cached on disk by the sources' and the values' hash)."""
    kernels = C.SOURCE.parent
    text = source if source is not None else C.SOURCE.read_text()
    headers = [HEADER, *sorted(kernels.glob("*.cuh"))]
    key = hashlib.sha256(ENTRY.encode() + repr(defines).encode() + text.encode()
                         + b"".join(p.read_bytes() for p in headers)).hexdigest()[:20]
    lib = _cache_dir() / f"int4_rows_{key}.so"
    if not lib.exists():  # (each process its own sources and output, the library renamed in)
        own = f"int4_rows_{key}.{os.getpid()}"
        kernel, entry = _cache_dir() / f"{own}.cu", _cache_dir() / f"{own}.cpp"
        tmp = _cache_dir() / f"{own}.so.tmp"
        kernel.write_text(text)
        entry.write_text(ENTRY.format(source=kernel.name))
        cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-include", str(HEADER),
               f"-I{kernels}", *[f"-D{k}={v}" for k, v in defines], str(entry), "-o", str(tmp)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"g++ could not build int4_rows.cu {dict(defines)}:\n"
                                   f"{done.stderr[-4000:]}")
            tmp.replace(lib)
        finally:
            for f in (kernel, entry, tmp):
                f.unlink(missing_ok=True)
    return ctypes.CDLL(str(lib))


def launch(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
           group: int, tiles: int, cfg: C.RowsConfig, glu: bool = False, pdl: bool = False,
           exact: bool = False, persist_blocks: int = 3,
           source: str | None = None, rope: tuple | None = None,
           kv: tuple | None = None, prefetch: int = 0) -> torch.Tensor:
    """cuda_int4.launch's product on CPU tensors, in the form ``cfg`` (a persist form's
    grid: ``persist_blocks`` blocks; ``source``: a variant of the kernel's text; ``rope``,
    ``kv``: launch's (cos, sin, rot), (cache, slots, qcols); ``prefetch``: the kernel's
    PREFETCH bytes, with ``pdl``)."""
    return _launch(x, packed, scales_zeros, n, group, tiles, cfg, glu, pdl, exact,
                   persist_blocks, source, rope=rope, kv=kv, prefetch=prefetch)[1]


def launch_norm(x: torch.Tensor, residual: torch.Tensor | None, gamma: torch.Tensor,
                eps: float, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
                group: int, tiles: int, cfg: C.RowsConfig, glu: bool = False,
                pdl: bool = False, rope: tuple | None = None, kv: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cuda_int4.launch_norm's (h, y) on CPU tensors, in the form ``cfg`` (``rope``,
    ``kv``: launch's)."""
    return _launch(x, packed, scales_zeros, n, group, tiles, cfg, glu, pdl,
                   norm=(residual, gamma, eps), rope=rope, kv=kv)


def _launch(x, packed, scales_zeros, n, group, tiles, cfg, glu=False, pdl=False, exact=False,
            persist_blocks=3, source=None, norm=None, rope=None, kv=None, prefetch=0):
    """(h, y): the NORM kernel's residual stream (``norm``: (residual or None, gamma,
    eps)) or x, and the product."""
    m, k = x.shape
    if m > cfg.rows:
        raise ValueError(f"form {cfg.label()} takes at most {cfg.rows} rows, not {m}")
    x, packed, sz = x.contiguous(), packed.contiguous(), scales_zeros.contiguous()
    head = rope[0].shape[-1] if rope is not None else 0
    cs, sn = (rope[0].contiguous(), rope[1].contiguous()) if rope is not None else (None, None)
    d = C.defines(tiles, group, cfg, exact=exact, pdl=pdl, glu=glu, norm=norm is not None,
                  rope=head, kvw=kv is not None, prefetch=prefetch)
    fn = library(tuple(sorted(d.items())), source).emu_int4_rows
    y = torch.empty(m, n // 2 if glu else n, dtype=torch.bfloat16)
    blocks = C.tiles_of(cfg, n, glu or bool(head))
    if cfg.persist:
        blocks = min(blocks, persist_blocks)
    sizes = (ctypes.c_size_t * 3)(x.numel() * 2, packed.numel() * 4, sz.numel() * 2)
    err = ctypes.create_string_buffer(512)
    p = ctypes.c_void_p
    res, h, gamma, eps = None, x, None, 0.0
    slots32 = kv[1].to(torch.int32).contiguous() if kv is not None else None
    if norm is not None:
        res, gamma, eps = norm
        gamma = gamma.contiguous()
        if res is not None:
            res, h = res.contiguous(), torch.empty_like(x)
    rc = fn(ctypes.c_uint(blocks), ctypes.c_uint(cfg.warps * 32),
            ctypes.c_size_t(cfg.ring_bytes(tiles, group, k, norm is not None)),
            p(x.data_ptr()), p(packed.data_ptr()), p(sz.data_ptr()), p(y.data_ptr()), m, n, k,
            sizes, err, 512, p(res.data_ptr() if res is not None else 0),
            p(h.data_ptr() if res is not None else 0),
            p(gamma.data_ptr() if gamma is not None else 0), ctypes.c_float(eps),
            *((p(cs.data_ptr()), p(sn.data_ptr()), rope[2]) if rope is not None
              else (p(0), p(0), 0)),
            *((p(kv[0].data_ptr()), p(slots32.data_ptr()), kv[2], kv[0].shape[3],
               *(ctypes.c_longlong(kv[0].stride(i)) for i in range(4))) if kv is not None
              else (p(0), p(0), 0, 0, *[ctypes.c_longlong(0)] * 4)))
    if rc:
        raise RuntimeError(f"int4_rows {cfg.label()} (emulated): {err.value.decode()}")
    return h, y
