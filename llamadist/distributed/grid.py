"""The (dp, pp, tp) process grid as plain arithmetic (no torch: the launcher and
`llamadist plan` use it before any process exists).

Tensor parallelism is innermost, so the TP ranks of one stage are neighbours (one node,
the fastest link), then pipeline stages, then replicas:

    rank = dp_idx * pp * tp + pp_idx * tp + tp_idx

    world 8, dp=1 pp=2 tp=4:   stage 0 = ranks 0-3 (a TP group), stage 1 = ranks 4-7
                               pipeline groups {0,4} {1,5} {2,6} {3,7}

Expert parallelism is not a dimension of its own: a stage's experts are spread over the
tp x dp ranks of that stage (EP = TP x DP, as in vLLM), so attention runs tensor- or
data-parallel on the same ranks that share the experts. ``group_ranks("ep", ...)`` gives
those groups: the TP group when dp == 1, the DP group when tp == 1.
"""

from __future__ import annotations

# The process count from the grid (and back) is planning's arithmetic too: one copy.
from llamadist.planning.checks import GridError, grid_size

__all__ = ["GridError", "coords", "grid_size", "group_ranks", "rank_of"]


def coords(rank: int, pp: int, tp: int, dp: int) -> tuple[int, int, int]:
    """Global rank -> (dp_idx, pp_idx, tp_idx)."""
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


def rank_of(dp_idx: int, pp_idx: int, tp_idx: int, pp: int, tp: int) -> int:
    return dp_idx * pp * tp + pp_idx * tp + tp_idx


def group_ranks(dim: str, pp: int, tp: int, dp: int) -> list[list[int]]:
    """Every group of one dimension ("pp", "tp", "dp" or "ep"), as lists of global ranks."""
    if dim == "tp":
        return [[rank_of(d, p, t, pp, tp) for t in range(tp)] for d in range(dp) for p in range(pp)]
    if dim == "pp":
        return [[rank_of(d, p, t, pp, tp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    if dim == "dp":
        return [[rank_of(d, p, t, pp, tp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    if dim == "ep":  # one stage's tp x dp ranks
        return [[rank_of(d, p, t, pp, tp) for d in range(dp) for t in range(tp)]
                for p in range(pp)]
    raise ValueError(f"unknown dimension {dim!r}")
