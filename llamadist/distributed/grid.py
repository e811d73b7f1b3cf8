"""The (dp, pp, cp, tp) process grid as plain arithmetic (no torch: the launcher and
`llamadist plan` use it before any process exists).

Tensor parallelism is innermost, so the TP ranks of one stage are neighbours (one node,
the fastest link), then context parallelism (each CP rank holds a slice of every long
request's sequence: it talks to its ring neighbours every layer), then pipeline stages,
then replicas:

    rank = ((dp_idx * pp + pp_idx) * cp + cp_idx) * tp + tp_idx     (cp = 1: as before)

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

__all__ = ["GridError", "coords", "cp_index", "grid_size", "group_ranks", "rank_of"]


def coords(rank: int, pp: int, tp: int, dp: int, cp: int = 1) -> tuple[int, int, int]:
    """Global rank -> (dp_idx, pp_idx, tp_idx); ``cp_index`` gives the fourth."""
    return rank // (pp * cp * tp), (rank // (cp * tp)) % pp, rank % tp


def cp_index(rank: int, tp: int, cp: int) -> int:
    """Global rank -> its context-parallel index (0 when cp == 1)."""
    return (rank // tp) % cp


def rank_of(dp_idx: int, pp_idx: int, tp_idx: int, pp: int, tp: int, cp: int = 1,
            cp_idx: int = 0) -> int:
    return ((dp_idx * pp + pp_idx) * cp + cp_idx) * tp + tp_idx


def group_ranks(dim: str, pp: int, tp: int, dp: int, cp: int = 1) -> list[list[int]]:
    """Every group of one dimension ("pp", "tp", "dp", "cp", "ep" or "stage": the cp x tp
    ranks of one stage of one replica), as lists of global ranks."""
    def r(d: int, p: int, t: int, c: int) -> int:
        return rank_of(d, p, t, pp, tp, cp, c)
    if dim == "tp":
        return [[r(d, p, t, c) for t in range(tp)] for d in range(dp) for p in range(pp)
                for c in range(cp)]
    if dim == "cp":
        return [[r(d, p, t, c) for c in range(cp)] for d in range(dp) for p in range(pp)
                for t in range(tp)]
    if dim == "pp":
        return [[r(d, p, t, c) for p in range(pp)] for d in range(dp) for c in range(cp)
                for t in range(tp)]
    if dim == "dp":
        return [[r(d, p, t, c) for d in range(dp)] for p in range(pp) for c in range(cp)
                for t in range(tp)]
    if dim == "ep":  # one stage's tp x dp ranks (of one CP index: they hold the same tokens)
        return [[r(d, p, t, c) for d in range(dp) for t in range(tp)]
                for p in range(pp) for c in range(cp)]
    if dim == "stage":
        return [[r(d, p, t, c) for c in range(cp) for t in range(tp)]
                for d in range(dp) for p in range(pp)]
    raise ValueError(f"unknown dimension {dim!r}")
