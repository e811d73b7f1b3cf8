"""Streamed loading: fill a meta-built stage with only the tensors it owns.

Tensors are read one at a time from the checkpoint, sliced (tensor parallel)
before they reach the device, cast, and moved; nothing else of the model is
ever read. Every expected weight must arrive exactly once, with the right shape.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

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


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def load_weights(model: nn.Module, ckpt: Checkpoint, device: torch.device | str,
                 dtype: torch.dtype, shard_fn: ShardFn | None = None,
                 progress: bool = False) -> LoadStats:
    """Materialise every parameter of ``model`` (built on meta) from ``ckpt``."""
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
        tensor = ckpt.get(src, shard)
        expected = tuple(params[pname].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{ckpt.path}: weight {src!r} has shape {tuple(tensor.shape)}, expected {expected} "
                "from config.json; the checkpoint and its config disagree")
        value = tensor.to(dtype=dtype).to(device, non_blocking=True)
        _set_param(model, pname, value)
        nbytes += value.nbytes
    _retie(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"weights never loaded: {left}")
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return LoadStats(len(wanted), nbytes, time.perf_counter() - t0)


def _retie(model: nn.Module) -> None:
    # Replacing the embedding's Parameter broke the tie; point the head at it again.
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    cfg = getattr(model, "config", None)
    if embed is not None and head is not None and cfg is not None and cfg.tie_word_embeddings:
        head.weight = embed.weight
