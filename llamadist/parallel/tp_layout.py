"""Tensor-parallel arithmetic, free of torch: which heads, features and vocab rows each
rank owns, and the loader's per-parameter slice. Shared by :mod:`llamadist.parallel.tensor`
(the modules and the pass) and the planner (:mod:`llamadist.planning.auto`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llamadist.config import ModelConfig

# (dim, start, stop), as llamadist.weights.checkpoint.Shard; None = read the whole tensor.
Shard = tuple[int, int, int]
ShardFn = Callable[[str, tuple[int, ...]], Shard | None]


class TensorParallelError(ValueError):
    """A model that cannot be split ``tp`` ways; the message names the numbers."""


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """[start, stop) of the vocab rows rank ``tp_rank`` owns: ceil(V / tp) rows each, the
    last rank fewer when V does not divide (the gather pads and trims)."""
    per = -(-vocab_size // tp_size)
    start = min(tp_rank * per, vocab_size)
    return start, min(start + per, vocab_size)


# ---- sizes and checks ----------------------------------------------------
@dataclass(frozen=True)
class TPSizes:
    """Per-rank widths of one tensor-parallel shard."""
    q_heads: int
    kv_heads: int
    kv_head_start: int      # first global KV head this rank holds
    intermediate: int
    replicated_kv: bool     # tp > num_kv_heads: KV heads copied, not split


def check_tp(config: ModelConfig, tp_size: int) -> None:
    """Raise TensorParallelError unless ``config`` can be split ``tp_size`` ways."""
    h, kv, f = config.num_heads, config.num_kv_heads, config.intermediate_size
    if tp_size < 1:
        raise TensorParallelError(f"tensor-parallel size must be >= 1, got {tp_size}")
    if h % tp_size:
        raise TensorParallelError(
            f"tensor parallel {tp_size} needs the {h} query heads to divide by {tp_size}; "
            f"choose a tp that divides {h}")
    if kv % tp_size and tp_size % kv:
        raise TensorParallelError(
            f"tensor parallel {tp_size} cannot place {kv} KV heads: need num_kv_heads % tp == 0 "
            f"(split) or tp % num_kv_heads == 0 (replicate); {kv} % {tp_size} = {kv % tp_size}, "
            f"{tp_size} % {kv} = {tp_size % kv}")
    if f % tp_size:
        raise TensorParallelError(
            f"tensor parallel {tp_size} needs intermediate_size {f} to divide by {tp_size}")


def tp_sizes(config: ModelConfig, tp_rank: int, tp_size: int) -> TPSizes:
    """Heads, KV heads and intermediate features rank ``tp_rank`` of ``tp_size`` holds."""
    check_tp(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise TensorParallelError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    kv = config.num_kv_heads
    if kv % tp_size == 0:
        local_kv = kv // tp_size
        return TPSizes(config.num_heads // tp_size, local_kv, tp_rank * local_kv,
                       config.intermediate_size // tp_size, False)
    # tp > kv: query heads [r*H/tp, (r+1)*H/tp) all use KV head r*kv//tp.
    return TPSizes(config.num_heads // tp_size, 1, tp_rank * kv // tp_size,
                   config.intermediate_size // tp_size, True)


def tp_kv_heads(config: ModelConfig, tp: int) -> int:
    """KV heads each rank caches: num_kv_heads / tp, or 1 when replicated (tp > kv)."""
    return tp_sizes(config, 0, tp).kv_heads


# ---- the loader's slice per parameter ------------------------------------
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
_REPLICATED = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")


def _column_slice(config: ModelConfig, s: TPSizes, tp_rank: int, module: str) -> tuple[int, int]:
    d = config.head_dim
    if module == "q_proj":
        n = s.q_heads * d
        return tp_rank * n, (tp_rank + 1) * n
    if module in ("k_proj", "v_proj"):
        return s.kv_head_start * d, (s.kv_head_start + s.kv_heads) * d
    return tp_rank * s.intermediate, (tp_rank + 1) * s.intermediate  # gate/up


def tp_shard_fn(config: ModelConfig, tp_rank: int, tp_size: int) -> ShardFn:
    """The loader's ``shard_fn``: parameter name -> (dim, start, stop) this rank reads,
    or None for a replicated tensor (norms, row-parallel biases)."""
    sizes = tp_sizes(config, tp_rank, tp_size)
    vocab = vocab_range(config.vocab_size, tp_rank, tp_size)

    def shard(name: str, full_shape: tuple[int, ...]) -> Shard | None:
        if tp_size == 1 or name.endswith(_REPLICATED):
            return None
        if name in _VOCAB:
            return (0, *vocab)
        module, _, leaf = name.rpartition(".")
        module = module.rpartition(".")[2]
        if module in _COLUMN and leaf in ("weight", "bias"):
            return (0, *_column_slice(config, sizes, tp_rank, module))
        if module in _ROW and leaf == "weight":
            width = sizes.q_heads * config.head_dim if module == "o_proj" else sizes.intermediate
            return (1, tp_rank * width, (tp_rank + 1) * width)
        if module in _ROW and leaf == "bias":
            return None  # replicated; RowParallelLinear adds it once after the reduce
        raise TensorParallelError(f"no tensor-parallel rule for parameter {name!r} "
                                  f"(shape {tuple(full_shape)})")
    return shard
