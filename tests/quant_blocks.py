"""Random GGUF block bytes for the quantized-weight tests (no gguf package needed)."""

from __future__ import annotations

import numpy as np

from llamadist.kernels.quant_ref import FORMATS


def random_blocks(qtype: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes with finite, varied f16 scales (and mins)."""
    name, block, size = FORMATS[qtype]
    if name in ("F16", "BF16"):  # finite 16-bit floats, as bytes
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        bits = (x.astype(np.float16).view(np.uint16) if name == "F16"
                else (x.view(np.uint32) >> 16).astype(np.uint16))
        return bits.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.03, (rows, cols // block, 2)).astype(np.float16)
    scales[..., 1] *= rng.choice([-1, 1], scales[..., 1].shape)
    as_bytes = scales.view(np.uint8).reshape(rows, cols // block, 4)
    if name == "Q6_K":
        raw[..., -2:] = as_bytes[..., 0:2]
    elif name in ("Q4_0", "Q8_0"):
        raw[..., 0:2] = as_bytes[..., 0:2]
    else:  # Q4_1 (d, m), K types (d, dmin)
        raw[..., 0:4] = as_bytes
    return raw.reshape(rows, -1)
