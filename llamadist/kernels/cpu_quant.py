"""ctypes bindings of cpu_quant.c, the quantized (GGUF block) linears on the CPU.

They live in the same library as cpu_decode.c (built by cpu_decode.py at first use), so
the C decoder layer calls them too. ``qlinear`` is the decode GEMV (each weight block
dequantized in registers and met by x in float32; or, for Q4_0 / Q4_1 / Q8_0, x quantized
to int8 per 32 and integer dot products), ``dequant_rows`` the
block -> float32 conversion behind prefill tiles and embedding rows, ``quantize_q8`` the
activation quantization alone (for its tests), ``set_isa`` the dispatch level (0 plain C,
1 AVX2, 2 AVX-512, 3 AVX-512 with VNNI; tests force each in turn).
"""

from __future__ import annotations

import ctypes

import torch

from llamadist.kernels import cpu_decode

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_bound: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL | None:
    """The kernel library with this module's signatures set (None: no compiler)."""
    global _bound
    if _bound is None:
        lib = cpu_decode.library()
        if lib is None:
            return None
        lib.llamadist_qlinear.restype = None
        lib.llamadist_qlinear.argtypes = ([ctypes.c_int] * 2 + [_P] * 4 + [_I64] * 5
                                          + [_P, ctypes.c_int])
        lib.llamadist_dequant_rows.restype = None
        lib.llamadist_dequant_rows.argtypes = [ctypes.c_int, _P, _I64, _I64, _P, ctypes.c_int]
        lib.llamadist_quantize_q8.restype = None
        lib.llamadist_quantize_q8.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P]
        lib.llamadist_quant_scratch_bytes.restype = _I64
        lib.llamadist_quant_scratch_bytes.argtypes = [_I64, _I64]
        lib.llamadist_quant_set_isa.restype = ctypes.c_int
        lib.llamadist_quant_set_isa.argtypes = [ctypes.c_int]
        _bound = lib
    return _bound


def available() -> bool:
    return _lib() is not None


def set_isa(level: int) -> int:
    """Force the dispatch level (-1: the best the CPU has); returns the level in effect."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the CPU kernels are not built (no C compiler?)")
    return lib.llamadist_quant_set_isa(level)


def scratch_bytes(m: int, k: int, threads: int = 1) -> int:
    """Bytes of quantized activations for m rows of k inputs (int8 + scale + sum), one
    64-byte aligned share per thread (each thread prepares x itself: no barrier)."""
    return threads * ((m * k + 2 * m * (k // 32) * 4 + 63) // 64 * 64)


def qlinear(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int,
            bias: torch.Tensor | None = None, int8_x: bool = False) -> torch.Tensor:
    """x (m, k) float32 (rows with unit stride) @ W^T + bias -> (m, n) float32, W (n, k)
    as ``blocks`` (n, row bytes) of ggml type ``qtype``; ``int8_x``: x quantized to int8
    per 32 first (Q4_0 / Q4_1 / Q8_0; ignored for the K types)."""
    lib = _lib()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    scratch = torch.empty(scratch_bytes(m, k, threads), dtype=torch.uint8)
    lib.llamadist_qlinear(qtype, int(int8_x), x.data_ptr(), blocks.data_ptr(),
                          None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k,
                          x.stride(0), n, scratch.data_ptr(), threads)
    return y


def dequant_rows(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """blocks (rows, row bytes) contiguous uint8 -> (rows, k) float32."""
    out = torch.empty(blocks.shape[0], k, dtype=torch.float32)
    _lib().llamadist_dequant_rows(qtype, blocks.data_ptr(), blocks.shape[0], k,
                                  out.data_ptr(), torch.get_num_threads())
    return out


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (m, k) float32 -> (q int8 (m, k), d (m, k/32), s (m, k/32)) as the GEMV does."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    d, s = torch.empty(m, k // 32), torch.empty(m, k // 32)
    _lib().llamadist_quantize_q8(x.data_ptr(), m, k, k, q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q, d, s
