"""The loader's per-parameter tensor-parallel slice, free of torch. The shapes it slices to
(heads, KV heads, features, vocab rows per rank) and the divisibility checks live in
:mod:`llamadist.planning.tp_shapes`, below this package, so the planner can use them; they
are re-exported here for the parallel modules.
"""

from __future__ import annotations

from collections.abc import Callable

from llamadist.config import ModelConfig
from llamadist.planning.tp_shapes import (TensorParallelError, TPSizes, check_tp, tp_kv_heads,
                                          tp_sizes, vocab_range)

__all__ = ["Shard", "ShardFn", "TPSizes", "TensorParallelError", "check_tp", "tp_kv_heads",
           "tp_shard_fn", "tp_sizes", "vocab_range"]

# (dim, start, stop), as llamadist.weights.checkpoint.Shard; None = read the whole tensor.
Shard = tuple[int, int, int]
ShardFn = Callable[[str, tuple[int, ...]], Shard | None]


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
        if tp_size == 1 or name.endswith(_REPLICATED) or ".block_sparse_moe." in name:
            return None  # MoE router and whole experts (tensor.py spreads them by EP)
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
