"""``QuantizedTensor``: a weight matrix kept as its GGUF blocks, a first-class weight.

It is no torch.Tensor: it holds ``blocks``, a (out, row bytes) uint8 tensor, its ggml
type and its logical (out, in) shape, and takes part in three torch functions through
``__torch_function__``, so the pure model's modules run on it unchanged:

* ``F.linear(x, w, bias)``: up to ``MAX_ROWS`` float32 rows on the CPU, the C GEMV of
  cpu_quant.c (weight blocks dequantized in registers; with ``int8_x``, x quantized to
  int8 per 32 and integer dot products, as llama.cpp does); more rows (prefill), tiles of
  W dequantized to x's dtype and multiplied by PyTorch's GEMM.
* ``F.embedding(ids, w)``: only the looked-up rows are dequantized.
* ``torch.cat([w1, w2], dim=0)``: the projection fusion (llamadist.model.fuse); parts of
  different types fall back to one float matrix.

Anything else (``w + 1``, ``w.to(...)``) raises a TypeError that names the function. The
loader (llamadist.weights.loader) puts one in a module's ``weight`` slot in place of the
Parameter. Row slices (output features) are free; column slices must fall on block
boundaries (blocks run along the input dimension), as tensor parallelism asks.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llamadist.kernels import cpu_quant, weight_version
from llamadist.kernels.cpu_decode import MAX_ROWS
from llamadist.kernels.quant_ref import FORMATS, block_shape, dequantize

log = logging.getLogger(__name__)

# Floats of W a prefill tile dequantizes at once (16 MiB): big enough for the GEMM to run
# at speed, small enough to stay out of the way of the model's own memory.
TILE_FLOATS = 1 << 22


class QuantizedTensor:
    """W (out, in) as GGUF blocks: ``blocks`` (out, in / block * block bytes) uint8 on the
    CPU, ``qtype`` a ggml type id of quant_ref.FORMATS. ``act_dtype`` is the dtype the
    model computes in (what an embedding lookup returns). ``int8_x``: the GEMV quantizes
    x to int8 per 32 (Q4_0 / Q4_1 / Q8_0; set by the kernel pass of
    ``RuntimeConfig.quant_activations``), else x meets the weights in float32."""

    _int8_x = False

    def __init__(self, blocks: torch.Tensor, qtype: int, shape: tuple[int, int],
                 act_dtype: torch.dtype = torch.float32) -> None:
        if qtype not in FORMATS:
            raise ValueError(f"ggml type {qtype} is not a supported block format "
                             f"({', '.join(n for n, _, _ in FORMATS.values())})")
        block, size = block_shape(qtype)
        rows, cols = shape
        if (blocks.dtype != torch.uint8 or blocks.dim() != 2 or cols % block
                or tuple(blocks.shape) != (rows, cols // block * size)):
            raise ValueError(f"{FORMATS[qtype][0]} {shape}: expected uint8 blocks of shape "
                             f"({rows}, {cols // block * size}), got {blocks.dtype} "
                             f"{tuple(blocks.shape)}")
        self.blocks = blocks.contiguous()
        self.qtype = qtype
        self.shape = torch.Size(shape)
        self.act_dtype = act_dtype
        weight_version.changed()  # a new weight: a cached decode plan checks again

    @property
    def int8_x(self) -> bool:
        return self._int8_x

    @int8_x.setter
    def int8_x(self, on: bool) -> None:
        self._int8_x = bool(on)
        weight_version.changed()  # baked into a decode plan's layer arguments

    # ---- what the loader, the passes and the kernels ask of a weight ------------------
    @property
    def type_name(self) -> str:
        return FORMATS[self.qtype][0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8  # never float32: float-only kernels pass it by

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    is_meta = False
    requires_grad = False

    def dim(self) -> int:
        return 2

    def size(self, d: int | None = None) -> Any:
        return self.shape if d is None else self.shape[d]

    def detach(self) -> "QuantizedTensor":
        return self

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.type_name}, shape={tuple(self.shape)})"

    # ---- slices --------------------------------------------------------------------
    def rows(self, start: int, stop: int) -> "QuantizedTensor":
        """Output features [start, stop): whole rows of blocks."""
        return QuantizedTensor(self.blocks[start:stop], self.qtype, (stop - start, self.shape[1]),
                               self.act_dtype)

    def cols(self, start: int, stop: int) -> "QuantizedTensor":
        """Input features [start, stop), which must fall on block boundaries."""
        block, size = block_shape(self.qtype)
        if start % block or stop % block:
            raise ValueError(f"a {self.type_name} weight {tuple(self.shape)} cannot be cut at "
                             f"input columns [{start}, {stop}): its blocks hold {block} "
                             f"consecutive inputs; cut at multiples of {block}")
        part = self.blocks[:, start // block * size:stop // block * size]
        return QuantizedTensor(part, self.qtype, (self.shape[0], stop - start), self.act_dtype)

    # ---- arithmetic ----------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) as a float tensor (the C kernel, else the numpy reference)."""
        return _dequantize_rows(self.blocks[start:stop], self.qtype, self.shape[1]).to(dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        impl = _HANDLED.get(func)
        if impl is None:
            raise TypeError(f"{getattr(func, '__name__', func)} does not take a QuantizedTensor "
                            f"(it serves F.linear, F.embedding and torch.cat); call "
                            f".dequantize() first")
        return impl(*args, **(kwargs or {}))


def _dequantize_rows(blocks: torch.Tensor, qtype: int, cols: int) -> torch.Tensor:
    """Rows of GGUF blocks (rows, bytes) as float32 (rows, cols): the C kernel, else the
    numpy reference."""
    if cpu_quant.available():
        return cpu_quant.dequant_rows(blocks, qtype, cols)
    return torch.from_numpy(dequantize(blocks.numpy(), qtype, cols).astype(np.float32))


def linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) with W quantized: x (..., in) -> (..., out)."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise RuntimeError(f"linear: x has {x.shape[-1]} features, the weight {tuple(w.shape)}")
    x2 = x.reshape(-1, k)
    if (x.device.type == "cpu" and x.dtype == torch.float32 and 0 < x2.shape[0] <= MAX_ROWS
            and (bias is None or bias.dtype == torch.float32) and cpu_quant.available()
            and not (torch.is_grad_enabled() and x.requires_grad)):
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = cpu_quant.qlinear(x2, w.blocks, w.qtype, n,
                              None if bias is None else bias.contiguous(), w.int8_x)
        return y.view(*x.shape[:-1], n)
    return _tiled_linear(x2, w, bias).view(*x.shape[:-1], n)


def _tiled_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (m, k) @ W^T one tile of W's rows at a time, each dequantized to x's dtype."""
    n, k = w.shape
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    step = max(64, TILE_FLOATS // k)
    for j in range(0, n, step):
        tile = w.dequantize(x.dtype, j, j + step).to(x.device)
        y[:, j:j + step] = x @ tile.t()
    return y if bias is None else y.add_(bias)


def embedding(ids: torch.Tensor, w: QuantizedTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """F.embedding: ids (...) -> (..., in) in w.act_dtype, dequantizing only those rows."""
    if any(a not in (None, False, 2.0) for a in list(args) + list(kwargs.values())):
        raise TypeError("a quantized embedding supports no padding_idx / max_norm / sparse")
    # the picked rows' blocks dequantized as they are (no QuantizedTensor made: a new one
    # moves weight_version, and every decode plan would check itself fully after)
    rows = _dequantize_rows(w.blocks[ids.reshape(-1).cpu()], w.qtype, w.shape[1])
    return rows.to(w.act_dtype).view(*ids.shape, w.shape[1]).to(ids.device)


def cat(parts: list[Any] | tuple[Any, ...], dim: int = 0) -> Any:
    """Rows of quantized parts, concatenated (the projection fusion): one QuantizedTensor
    when every part has one type, else a ``RowStack`` (a Q4_K_M file's Q6_K v beside its
    Q4_K q and k, or a float part), which keeps each part as it is."""
    if dim != 0:
        raise TypeError("quantized weights concatenate along rows (dim=0) only")
    first = parts[0]
    if all(isinstance(p, QuantizedTensor) and p.qtype == first.qtype
           and p.shape[1] == first.shape[1] for p in parts):
        # numpy's allocation, not torch.cat's: measured, glibc then hands the parts' pages
        # back as they are freed (torch.cat left ~30 MB resident over SmolLM2's fusion)
        blocks = torch.from_numpy(np.concatenate([p.blocks.numpy() for p in parts]))
        return QuantizedTensor(blocks, first.qtype, (sum(p.shape[0] for p in parts),
                                                     first.shape[1]), first.act_dtype)
    return RowStack([q for p in parts for q in (p.parts if isinstance(p, RowStack) else [p])])


class RowStack:
    """W (out, in) as row blocks of different formats: ``parts`` (QuantizedTensors and
    float tensors, same ``in``), stacked along the output features. F.linear runs each
    part and concatenates the outputs; the C decoder layer runs each part in turn."""

    def __init__(self, parts: list[Any]) -> None:
        cols = {int(p.shape[1]) for p in parts}
        if len(cols) != 1:
            raise ValueError(f"row blocks of different widths {sorted(cols)}")
        self.parts = [p.detach() for p in parts]
        self.shape = torch.Size((sum(int(p.shape[0]) for p in parts), cols.pop()))
        weight_version.changed()  # a new weight: a cached decode plan checks again

    dtype = torch.uint8  # never float32: float-only kernels pass it by
    is_meta = False
    requires_grad = False
    int8_x = property(lambda self: any(getattr(p, "int8_x", False) for p in self.parts))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dim(self) -> int:
        return 2

    def detach(self) -> "RowStack":
        return self

    def __repr__(self) -> str:
        kinds = [getattr(p, "type_name", str(p.dtype)) for p in self.parts]
        return f"RowStack({kinds}, shape={tuple(self.shape)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            return _stack_linear(*args, **(kwargs or {}))
        if func is torch.cat:
            return cat(*args, **(kwargs or {}))
        raise TypeError(f"{getattr(func, '__name__', func)} does not take a RowStack "
                        f"(it serves F.linear and torch.cat)")


def _stack_linear(x: torch.Tensor, w: RowStack, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.cat([F.linear(x, p) for p in w.parts], dim=-1)  # (..., out)
    return y if bias is None else y + bias


_HANDLED = {F.linear: linear, F.embedding: embedding, torch.cat: cat}
