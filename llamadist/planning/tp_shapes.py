"""Tensor-parallel shapes, free of torch: how many query heads, KV heads, intermediate
features and vocab rows each of ``tp`` ranks owns, and whether a model can be split ``tp``
ways at all. The planner needs these before any process exists, so they live in planning;
:mod:`llamadist.parallel.tp_layout` (the loader's slices) and
:mod:`llamadist.parallel.tensor` (the modules) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamadist.config import ModelConfig
from llamadist.planning.units import PlanningError


class TensorParallelError(PlanningError):
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


def _tp_problem(config: ModelConfig, tp: int) -> str | None:
    """Why ``config`` cannot be split ``tp`` ways (the rules parallel.tensor relies on), or
    None. The vocab need not divide: vocab_range pads the last rank's slice."""
    h, kv, f = config.num_heads, config.num_kv_heads, config.intermediate_size
    if tp < 1:
        return f"tensor-parallel size must be >= 1, got {tp}"
    if h % tp:
        return f"tensor parallel {tp} needs the {h} query heads to divide by {tp}"
    if kv % tp and tp % kv:
        return (f"tensor parallel {tp} cannot place {kv} KV heads: need num_kv_heads % tp == 0 "
                f"(split) or tp % num_kv_heads == 0 (replicate); {kv} % {tp} = {kv % tp}, "
                f"{tp} % {kv} = {tp % kv}")
    if f % tp:
        return f"tensor parallel {tp} needs intermediate_size {f} to divide by {tp}"
    return None


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """Every tp this model can be split into (each divides the query head count)."""
    return [t for t in range(1, config.num_heads + 1) if _tp_problem(config, t) is None]


def check_tp(config: ModelConfig, tp_size: int) -> None:
    """Raise TensorParallelError unless ``config`` can be split ``tp_size`` ways; the
    message names the head counts and the tp sizes that would work."""
    problem = _tp_problem(config, tp_size)
    if problem is not None:
        ok = ", ".join(map(str, valid_tp_sizes(config)))
        raise TensorParallelError(f"{problem}; valid --tp for this model "
                                  f"({config.num_heads} heads, {config.num_kv_heads} KV heads): "
                                  f"{ok}")


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
