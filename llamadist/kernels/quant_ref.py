"""GGUF block formats and their reference arithmetic, in numpy float64.

A GGUF quantized matrix (out, in) is stored row by row; each row is a run of blocks along
the input dimension, each block ``block`` weights in ``size`` bytes (ggml's layouts, read
here byte by byte so they can be checked against the ``gguf`` package's own dequantize):

    Q8_0  32 w / 34 B: f16 d, int8 q[32]                 w = d q
    Q4_0  32 w / 18 B: f16 d, q[16] nibbles              w = d (q - 8)   (lo: 0..15, hi: 16..31)
    Q4_1  32 w / 20 B: f16 d, f16 m, q[16] nibbles       w = d q + m
    Q4_K 256 w /144 B: f16 d, f16 dmin, 12 B of 6-bit (scale, min) x 8, q[128] nibbles
    Q5_K 256 w /176 B: as Q4_K plus qh[32], the fifth bit of each weight
    Q6_K 256 w /210 B: ql[128], qh[64], int8 scales[16], f16 d
    F16, BF16  1 w / 2 B: a 16-bit float (kept as stored: half the bytes of float32)

The C kernels (cpu_quant.c) are checked against ``dequantize`` here. ``quantize_q8``
is the activation quantization the C GEMV applies to x before its integer dot products
(llama.cpp's q8_0 / q8_1: int8 per block of 32 with an f32 scale and the block's sum).
"""

from __future__ import annotations

import numpy as np

# ggml type id -> (name, weights per block, bytes per block)
FORMATS: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    1: ("F16", 1, 2), 30: ("BF16", 1, 2),
}
TYPE_IDS: dict[str, int] = {name: t for t, (name, _, _) in FORMATS.items()}


def block_shape(qtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type id."""
    return FORMATS[qtype][1], FORMATS[qtype][2]


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float64 from little-endian f16."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float64)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2n): the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes of packed 6-bit values -> (scales (..., 8), mins (..., 8)), as ggml's
    get_scale_min_k4."""
    sc = sc.astype(np.int64)
    lo_s, lo_m = sc[..., 0:4] & 63, sc[..., 4:8] & 63
    hi_s = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    hi_m = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return (np.concatenate([lo_s, hi_s], -1).astype(np.float64),
            np.concatenate([lo_m, hi_m], -1).astype(np.float64))


def _k_quants(qs: np.ndarray) -> np.ndarray:
    """(..., 128) nibbles of a K block -> (..., 8, 32): chunk i of 32 bytes holds
    sub-block 2i in its low nibbles and 2i+1 in its high ones."""
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([q & 0x0F, q >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32).astype(np.float64)


def _dequant_blocks(b: np.ndarray, qtype: int) -> np.ndarray:
    """(nblocks, size) uint8 -> (nblocks, block) float64."""
    name = FORMATS[qtype][0]
    if name == "F16":
        return np.ascontiguousarray(b).view(np.float16).astype(np.float64)
    if name == "BF16":
        bits = np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if name == "Q8_0":
        return _f16(b[:, 0:2]) * b[:, 2:].view(np.int8).astype(np.float64)
    if name == "Q4_0":
        return _f16(b[:, 0:2]) * (_nibbles(b[:, 2:]) - 8)
    if name == "Q4_1":
        return _f16(b[:, 0:2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        scales, mins = _k_scales(b[:, 4:16])
        if name == "Q4_K":
            q = _k_quants(b[:, 16:144])
        else:  # bit j of qh[l] is the fifth bit of weight l of sub-block j
            q = _k_quants(b[:, 48:176])
            bits = (b[:, 16:48, None] >> np.arange(8)) & 1  # (n, 32, 8)
            q += 16 * bits.transpose(0, 2, 1)
        return (d * scales)[..., None] * q - (dmin * mins)[..., None]
    if name == "Q6_K":
        return _dequant_q6_k(b)
    raise KeyError(qtype)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    ql, qh = b[:, 0:128].astype(np.int64), b[:, 128:192].astype(np.int64)
    scales = b[:, 192:208].view(np.int8).astype(np.float64)
    d = _f16(b[:, 208:210])
    out = np.empty((b.shape[0], 256))
    for half in range(2):  # 128 weights each: 64 bytes of ql, 32 of qh, 8 scales
        lo, hi = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
        quads = [(lo[:, :32] & 0xF) | ((hi >> 0) & 3) << 4,
                 (lo[:, 32:] & 0xF) | ((hi >> 2) & 3) << 4,
                 (lo[:, :32] >> 4) | ((hi >> 4) & 3) << 4,
                 (lo[:, 32:] >> 4) | ((hi >> 6) & 3) << 4]
        for j, q in enumerate(quads):  # weights 32j..32j+31 of the half: scales 2j, 2j+1
            sc = np.repeat(scales[:, 8 * half + 2 * j:8 * half + 2 * j + 2], 16, axis=1)
            out[:, 128 * half + 32 * j:128 * half + 32 * j + 32] = d * sc * (q - 32)
    return out


def dequantize(blocks: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """(rows, row bytes) uint8 blocks of ``qtype`` -> (rows, cols) float64."""
    block, size = block_shape(qtype)
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows = blocks.shape[0]
    if cols % block or blocks.shape[-1] != cols // block * size:
        raise ValueError(f"{FORMATS[qtype][0]} rows of {cols} weights need {cols // block * size}"
                         f" bytes in blocks of {block}, got {blocks.shape[-1]}")
    return _dequant_blocks(blocks.reshape(-1, size), qtype).reshape(rows, cols)


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations (m, k) (k a multiple of 32) -> int8 q (m, k), scales d (m, k/32) and
    block sums s = d * sum(q) (m, k/32): per block d = max|x| / 127, q = round(x / d)
    (half away from zero, as C's roundf). x ~ d q with |error| <= d / 2 per weight."""
    m, k = x.shape
    xb = np.asarray(x, np.float32).reshape(m, k // 32, 32)
    amax = np.abs(xb).max(-1)
    d = (amax / 127).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = xb * inv[..., None]
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)
    s = d * q.astype(np.float32).sum(-1)
    return q.reshape(m, k), d, s.astype(np.float32)
