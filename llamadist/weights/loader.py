"""Streamed loading: fill a meta-built stage with only the tensors it owns.

Tensors are read one at a time from the checkpoint, sliced (tensor parallel)
before they reach the device, cast, and moved; nothing else of the model is
ever read. Every expected weight must arrive exactly once, with the right shape.

``native=True`` keeps a quantized checkpoint's block tensors (GGUF Q4_0 ... Q6_K) as
they are, a ``QuantizedTensor`` (llamadist.kernels.quant) in the module's ``weight``
slot instead of a Parameter, on CPU stages; float tensors load as before, and a stage
on another device dequantizes (its kernels are still to come).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from llamadist.kernels.quant import QuantizedTensor
from llamadist.weights.base import Checkpoint, CheckpointError, Shard

log = logging.getLogger(__name__)

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


def _set_param(model: nn.Module, name: str, value: torch.Tensor | QuantizedTensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(value, QuantizedTensor):  # no Parameter: a plain attribute in its place
        owner._parameters.pop(leaf, None)
        setattr(owner, leaf, value)
    else:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _keeps_blocks(ckpt: Checkpoint, name: str, device: torch.device | str) -> bool:
    """Whether ``name`` loads as its quantized blocks (a CPU stage, a block type)."""
    quant_type = getattr(ckpt, "quant_type", None)
    return (torch.device(device).type == "cpu" and quant_type is not None
            and quant_type(name) is not None)


def load_weights(model: nn.Module, ckpt: Checkpoint, device: torch.device | str,
                 dtype: torch.dtype, shard_fn: ShardFn | None = None,
                 progress: bool = False, native: bool = False) -> LoadStats:
    """Materialise every parameter of ``model`` (built on meta) from ``ckpt``; with
    ``native``, quantized tensors stay quantized (see the module docstring)."""
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
    bar = tqdm(wanted.items(), desc="loading", unit="tensor", disable=not progress,
               file=sys.stderr, leave=False)
    for pname, src in bar:
        full_shape = ckpt.shape(src)
        shard = shard_fn(pname, full_shape) if shard_fn else None
        blocks = native and _keeps_blocks(ckpt, src, device)
        tensor = ckpt.get_quantized(src, shard, dtype) if blocks else ckpt.get(src, shard)
        expected = tuple(params[pname].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{ckpt.path}: weight {src!r} has shape {tuple(tensor.shape)}, expected {expected} "
                "from config.json; the checkpoint and its config disagree")
        value = tensor if blocks else tensor.to(dtype=dtype).to(device, non_blocking=True)
        _set_param(model, pname, value)
        nbytes += value.nbytes
    _retie(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"weights never loaded: {left}")
    if torch.device(device).type == "cuda":
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


def _retie(model: nn.Module) -> None:
    # Replacing the embedding's Parameter broke the tie; point the head at it again.
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    cfg = getattr(model, "config", None)
    if embed is not None and head is not None and cfg is not None and cfg.tie_word_embeddings:
        if not isinstance(embed.weight, nn.Parameter):  # quantized blocks: shared as they are
            head._parameters.pop("weight", None)
        head.weight = embed.weight
