"""Streamed loading: fill a meta-built stage with only the tensors it owns.

Tensors are read one at a time from the checkpoint, sliced (tensor parallel)
before they reach the device, cast, and moved; nothing else of the model is
ever read. Every expected weight must arrive exactly once, with the right shape.

``native=True`` keeps a quantized checkpoint's block tensors (GGUF Q4_0 ... Q6_K) as
they are, a ``QuantizedTensor`` (llamadist.kernels.quant) in the module's ``weight``
slot instead of a Parameter, on CPU stages where the C kernels are built (without a C
compiler every call would unpack them through numpy, about 30x slower than float32: they
are dequantized to the run's dtype at load, as --weights float32); on a GPU stage the decoder layers' block
linears convert to int8 / int4 (a ``PackedWeight``, llamadist.kernels.wquant) and the
rest (embedding, head) dequantize. ``quantize`` ("int8" | "int4" | "fp8") quantizes the
decoder layers' linear weights at load from their float values (a GGUF's dequantized):
``PackedWeight`` on a GPU, GGUF Q8_0 / Q4_1 blocks on the CPU; with ``quantize_head`` the
output head too (a head tied to an embedding on the same stage gets its own quantized
copy; the embedding keeps its rows, float or a GGUF's blocks). Either way each weight is
sliced (tensor parallel) before it is quantized.
"""

from __future__ import annotations

import ctypes
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from llamadist.kernels import cpu_quant, weight_version
from llamadist.kernels.quant import QuantizedTensor
from llamadist.kernels.quant_ref import FORMATS, TYPE_IDS, block_shape
from llamadist.kernels.wquant import (GPU_CONVERTS, PackedWeight, from_gguf, quantize,
                                      to_gguf_blocks)
from llamadist.weights.base import Checkpoint, CheckpointError, Shard

log = logging.getLogger(__name__)

# The weights --quantize and GPU stages quantize: the decoder layers' linears (not the
# embedding, the head, norms or MoE experts).
LAYER_LINEAR = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
HALF_TYPES = (TYPE_IDS["F16"], TYPE_IDS["BF16"])
# Maps a parameter name to the slice of the checkpoint tensor this rank owns.
ShardFn = Callable[[str, tuple[int, ...]], Shard | None]


@dataclass
class LoadStats:
    tensors: int
    bytes: int
    seconds: float


def source_name(param: str, ckpt_names: set[str], tied: bool) -> str:
    """The checkpoint tensor a parameter comes from (tied heads read the embedding)."""
    if param == "lm_head.weight" and param not in ckpt_names and tied:
        return "model.embed_tokens.weight"
    return param


Weight = torch.Tensor | QuantizedTensor | PackedWeight


def _set_param(model: nn.Module, name: str, value: Weight) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if not isinstance(value, torch.Tensor):  # no Parameter: a plain attribute in its place
        owner._parameters.pop(leaf, None)
        setattr(owner, leaf, value)
    else:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    weight_version.changed()  # no registration hook sees either write: a plan checks again


class PinnedStaging:
    """Host tensors onto one GPU through a few pinned chunk buffers: each chunk is copied
    into a free buffer (the host's read of the checkpoint) while the buffers before it
    cross to the device on the current stream, without waiting. A pageable tensor's copy
    is staged by the driver, synchronously, chunk by chunk: measured on the H200 (session
    14, benchmarks/load_paths_gpu.py), 6.1 GB/s for the 8B folder against 22.5 GB/s
    through two pinned buffers (the pinned copy itself: 55 GB/s). Later work on the
    current stream is ordered after the copies; ``finish`` waits for them and hands the
    pinned buffers back (made at the first tensor: a load with nothing to stage pins none)."""

    def __init__(self, device: torch.device, chunk_bytes: int = 64 << 20, buffers: int = 3):
        self.device = device
        self.chunk = chunk_bytes
        self.count = buffers
        self.buffers: list[torch.Tensor] = []
        self.copied: list[torch.cuda.Event | None] = [None] * buffers
        self.next = 0

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (on the host) as a new tensor on the device; its copy may still run."""
        t = t.contiguous()
        if not self.buffers:
            self.buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True)
                            for _ in range(self.count)]
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        src, dst = t.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        for at in range(0, src.numel(), self.chunk):
            i, n = self.next, min(self.chunk, src.numel() - at)
            self.next = (i + 1) % self.count
            if self.copied[i] is not None:
                self.copied[i].synchronize()  # its last chunk has crossed: free again
            buf = self.buffers[i][:n]
            buf.copy_(src[at:at + n])
            with torch.cuda.device(self.device):
                dst[at:at + n].copy_(buf, non_blocking=True)
                self.copied[i] = torch.cuda.Event()
                self.copied[i].record()
        return out

    def finish(self) -> None:
        """Wait for the copies, then unpin the buffers (torch's host allocator would keep
        them, pinned, for the process's life)."""
        for ev in self.copied:
            if ev is not None:
                ev.synchronize()
        pinned, self.buffers, self.copied = bool(self.buffers), [], [None] * self.count
        empty = getattr(torch._C, "_host_emptyCache", None)
        if pinned and empty is not None:
            empty()


def _quantized(w: torch.Tensor, fmt: str, device: torch.device, dtype: torch.dtype, src: str,
               staging: PinnedStaging | None = None) -> Weight:
    """A float weight in --quantize format ``fmt`` on ``device`` (the module docstring)."""
    if device.type == "cpu":
        return to_gguf_blocks(w, fmt, dtype, src)
    return quantize(_to_device(w, device, staging), fmt)


def _load_one(ckpt: Checkpoint, pname: str, src: str, shard: Shard | None,
              device: torch.device, dtype: torch.dtype, native: bool,
              fmt: str | None, staging: PinnedStaging | None = None,
              head: bool = False) -> Weight:
    """One parameter's value on ``device``, as the module docstring says; float tensors
    for a GPU (those --quantize quantizes there too) go through ``staging`` when given."""
    quant_type = getattr(ckpt, "quant_type", None)
    qtype = quant_type(src) if quant_type is not None else None
    if fmt is not None and (LAYER_LINEAR.search(pname) or head and pname == "lm_head.weight"):
        w = ckpt.get(src, shard)  # float (a block tensor dequantized)
        return _quantized(w, fmt, device, dtype, src, staging)
    if native and qtype is not None and device.type == "cpu" and cpu_quant.available():
        return ckpt.get_quantized(src, shard, dtype)
    half = _half_kept(ckpt, src, dtype) if native and device.type == "cpu" else None
    if half is not None:  # as a GGUF's F16 / BF16 tensors
        t = ckpt.get(src, shard).contiguous()
        return QuantizedTensor(t.view(torch.uint8).reshape(t.shape[0], -1), half,
                               tuple(t.shape), dtype)
    if (native and qtype is not None and qtype not in HALF_TYPES and device.type == "cuda"
            and LAYER_LINEAR.search(pname)):
        blocks = ckpt.get_quantized(src, shard, dtype)  # converted on the GPU, as bytes
        raw = blocks.blocks
        if FORMATS[blocks.qtype][0] in GPU_CONVERTS:
            raw = _to_device(raw, device, staging)
        return from_gguf(raw, blocks.qtype, tuple(blocks.shape), device).to(device)
    return _to_device(ckpt.get(src, shard).to(dtype=dtype), device, staging)


_HALF_IDS = {torch.bfloat16: TYPE_IDS["BF16"], torch.float16: TYPE_IDS["F16"]}


def _half_kept(ckpt: Checkpoint, name: str, dtype: torch.dtype | str | None) -> int | None:
    """The GGUF type id (F16 / BF16) a CPU stage keeps checkpoint tensor ``name`` in under
    --weights native in a run of ``dtype``, or None: a float checkpoint's (safetensors)
    decoder-layer linears and untied head stored in 16 bits stay 16-bit on the CPU when
    the run computes in float32 (the default with a CPU in the devices) and the C kernels
    are built, read by the same C GEMVs as a GGUF's F16 / BF16 tensors: half the bytes of
    a float32 copy, so about half the decode step (without the kernels every call would
    dequantize through numpy)."""
    stored = getattr(ckpt, "stored_dtype", None)
    if stored is None or dtype not in (torch.float32, "float32"):
        return None
    tied = getattr(getattr(ckpt, "config", None), "tie_word_embeddings", False)
    if not (LAYER_LINEAR.search(name) or (name == "lm_head.weight" and not tied)):
        return None
    half = _HALF_IDS.get(stored(name))
    return half if half is not None and cpu_quant.available() else None


def _to_device(t: torch.Tensor, device: torch.device,
               staging: PinnedStaging | None) -> torch.Tensor:
    if staging is not None and t.device.type == "cpu":
        return staging.to_device(t)
    return t.to(device, non_blocking=True)


def held_bytes(ckpt: Checkpoint, weights: str, dtype: torch.dtype | str | None = None
               ) -> dict[str, dict[str, tuple[int, int]]] | None:
    """--weights ``weights`` of ``ckpt`` in a run of ``dtype``: per device kind ("cpu",
    "cuda"), native_bytes' tensors, which the planner counts in those bytes
    (planning.profile.native_profile); None for --weights float* or a checkpoint of which
    the run holds nothing as stored."""
    if weights != "native":
        return None
    held = {kind: native_bytes(ckpt, kind, dtype) for kind in ("cpu", "cuda")}
    return held if any(held.values()) else None


def native_bytes(ckpt: Checkpoint, kind: str,
                 dtype: torch.dtype | str | None = None) -> dict[str, tuple[int, int]]:
    """What a ``--weights native`` run on a ``kind`` device ("cpu", "cuda") holds, out of
    the run's dtype, of each checkpoint tensor, as ``_load_one`` keeps it: name -> (weights,
    bytes). CPU: every block and F16/BF16 tensor as stored (of a float checkpoint, the
    16-bit linears ``_half_kept`` names in a run of ``dtype``); CUDA: the decoder layers'
    block linears converted (``from_gguf``: codes and scales). Tensors absent here are
    held in the run's dtype (F32 ones, other GGUF types, what a GPU dequantizes). The
    planner counts these bytes."""
    quant_type = getattr(ckpt, "quant_type", None)
    out: dict[str, tuple[int, int]] = {}
    if quant_type is None:  # a float checkpoint: its 16-bit linears on a CPU (_half_kept)
        for name in ckpt.names() if kind == "cpu" else ():
            if _half_kept(ckpt, name, dtype) is not None:
                n, k = ckpt.shape(name)
                out[name] = (n * k, 2 * n * k)
        return out
    for name in ckpt.names():
        qtype = quant_type(name)
        if qtype is None:
            continue
        n, k = ckpt.shape(name)
        if kind == "cpu" and cpu_quant.available():
            block, size = block_shape(qtype)
            out[name] = (n * k, n * (k // block) * size)
        elif kind == "cuda" and qtype not in HALF_TYPES and LAYER_LINEAR.search(name):
            out[name] = (n * k, gguf_packed_bytes(qtype, n, k))
    return out


def gguf_packed_bytes(qtype: int, n: int, k: int) -> int:
    """Bytes of the PackedWeight ``from_gguf`` makes of an (n, k) GGUF block matrix: int8
    codes (Q8_0: float16 scale per 32) or int4 codes two per byte (Q4_0 / Q4_1: float16
    scale and offset per 32; Q4_K: float32 ones per 32); Q5_K / Q6_K become int8 per 32
    (quantize_int8 of their dequantized values) with a float32 scale per 32."""
    name, groups = FORMATS[qtype][0], n * -(-k // 32)
    if name == "Q8_0":
        return n * k + 2 * groups
    if name in ("Q4_0", "Q4_1"):
        return n * ((k + 1) // 2) + 4 * groups
    if name == "Q4_K":
        return n * ((k + 1) // 2) + 8 * groups
    return n * k + 4 * groups


def load_weights(model: nn.Module, ckpt: Checkpoint, device: torch.device | str,
                 dtype: torch.dtype, shard_fn: ShardFn | None = None,
                 progress: bool = False, native: bool = False,
                 quantize: str | None = None, quantize_head: bool = False) -> LoadStats:
    """Materialise every parameter of ``model`` (built on meta) from ``ckpt``; with
    ``native``, quantized tensors stay quantized; ``quantize`` (int8 | int4 | fp8) the
    decoder layers' linears (and with ``quantize_head`` the head) are quantized at load
    (see the module docstring)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    names = ckpt.names()
    tied = ckpt.config.tie_word_embeddings
    params = dict(model.named_parameters())  # tied parameters appear once
    wanted = {p: source_name(p, names, tied) for p in params}
    missing = sorted(src for src in wanted.values() if src not in names)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{ckpt.path}: missing weights {', '.join(missing[:3])}{more}; the checkpoint does "
            "not match its config")
    # Each checkpoint tensor feeds at most one parameter of a stage (a tied head on the
    # embedding's own stage shares the Parameter, so it is not in `params` twice).
    twice = sorted(src for src, n in Counter(wanted.values()).items() if n > 1)
    if twice:
        raise CheckpointError(f"checkpoint tensors {twice} would load into several parameters")
    nbytes = 0
    staging = PinnedStaging(device) if device.type == "cuda" else None
    bar = tqdm(wanted.items(), desc="loading", unit="tensor", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        for pname, src in bar:
            full_shape = ckpt.shape(src)
            shard = shard_fn(pname, full_shape) if shard_fn else None
            expected = tuple(params[pname].shape)
            got = tuple(full_shape) if shard is None else None
            if got is not None and got != expected:  # before reading (and quantizing) it
                raise CheckpointError(
                    f"{ckpt.path}: weight {src!r} has shape {got}, expected {expected} "
                    "from config.json; the checkpoint and its config disagree")
            value = _load_one(ckpt, pname, src, shard, device, dtype, native, quantize, staging,
                              quantize_head)
            if tuple(value.shape) != expected:
                raise CheckpointError(
                    f"{ckpt.path}: weight {src!r} has shape {tuple(value.shape)}, expected "
                    f"{expected} from config.json; the checkpoint and its config disagree")
            _set_param(model, pname, value)
            nbytes += value.nbytes
    finally:
        if staging is not None:  # also after a failed tensor: no copy left running
            staging.finish()
    _retie(model)
    if quantize and quantize_head:  # a head tied to this stage's embedding: its own copy
        nbytes += _untie_quantized(model, quantize, device, dtype)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"weights never loaded: {left}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadStats(len(wanted), nbytes, time.perf_counter() - t0)


def trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim; a no-op elsewhere).
    Loading, un-permuting and fusing free many mid-sized buffers between live ones; glibc
    keeps those pages resident (~30 MB for SmolLM2's fusion) until asked."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _untie_quantized(model: nn.Module, fmt: str, device: torch.device,
                     dtype: torch.dtype) -> int:
    """Give a head that shares its embedding's weight a quantized copy of it in ``fmt``
    (the lookups keep the embedding's rows: float, or a GGUF's blocks under --weights
    native, whose values are dequantized first, as the layers' are for --quantize); its
    bytes, 0 if the head is not tied so."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is None or head is None or head.weight is not embed.weight:
        return 0
    w = embed.weight
    w = w.dequantize() if isinstance(w, QuantizedTensor) else w.detach()
    value = _quantized(w, fmt, device, dtype, "lm_head.weight")
    _set_param(model, "lm_head.weight", value)
    return value.nbytes


def _retie(model: nn.Module) -> None:
    # Replacing the embedding's Parameter broke the tie; point the head at it again.
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    cfg = getattr(model, "config", None)
    if embed is not None and head is not None and cfg is not None and cfg.tie_word_embeddings:
        if not isinstance(embed.weight, nn.Parameter):  # quantized blocks: shared as they are
            head._parameters.pop("weight", None)
        head.weight = embed.weight
