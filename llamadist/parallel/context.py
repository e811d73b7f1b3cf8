"""Context parallelism: one sequence's attention split over the ``cp`` ranks of a group.

Every rank holds a slice of the sequence's tokens (and so of its K/V). Attention over a
slice of the keys gives a *partial* result per query row and head: ``out`` normalised
within the slice and ``lse``, the log-sum-exp of the slice's scaled scores (natural log,
fp32 or wider). Partials over disjoint key sets merge exactly (the online-softmax
correction of flash attention), in any order:

    m   = max_i lse_i                       (-inf when every slice is empty: no keys)
    w_i = exp(lse_i - m)
    out = sum_i w_i * out_i / sum_i w_i     lse = m + log(sum_i w_i)

``merge_partials`` does it over a list in one process; ``merge_across`` over the ranks of
a group with two all-reduces: MAX of lse (T*H floats), then one SUM of the packed
(w * out, w) (T*H*(D+1) floats). An all-gather of (out, lse) would be one collective but
moves C times the data to every rank and leaves C partials to merge on each; the two
all-reduces move what one all-reduce of the output would, which is what the seed's tree
attention does. A row no key is visible to (an empty slice, every key masked) has
lse = -inf and out = 0, and merges as weight 0.

Prefill (``RingAttention``). A prompt of L tokens is cut into 2C chunks (``balanced_split``):
rank r holds chunks r and 2C-1-r, an early and a late one, so the causal triangle's work
is even over the ranks. Each rank's K/V block travels the ring (isend to the next rank,
irecv from the previous, posted before the step's compute and waited after it, so the
transfer overlaps the math); after C steps every query has met every block, masked by
*global* positions (key visible iff its position <= the query's). Positions are sorted
within a rank, so the rows and keys that can meet are a suffix of the queries and a
prefix of the block (``RingPlan``): a block from an earlier rank is attended by all the
queries through its first chunk only, one from a later rank by the late chunk only, so
each off-diagonal step does half a block's work.

Decode (``ShardedDecodeAttention``). Each rank attends the new token's query against its
own K/V shard and ``merge_across`` combines them; the new token's K/V is stored only by
the rank that owns its slot (``decode_owner``: round-robin by ``granule``-token blocks).

GQA everywhere: q (..., T, H, D) against k/v (..., S, H_kv, D), heads h = kv * G + g as in
llamadist.model.llama. q and k are rotated (RoPE at their global positions) by the caller.
Nothing here is wired into the engine yet (see README, "Context parallelism").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Group = dist.ProcessGroup | None

__all__ = ["partial_attention", "merge_partials", "merge_across", "balanced_split",
           "decode_owner", "RingPlan", "RingAttention", "ShardedDecodeAttention"]


# ---- the math -------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


# Score elements materialised at once (64 MiB in fp32): longer query blocks go in row
# chunks, each exact on its own (rows are independent), so a 8k x 8k ring block of 32
# heads costs this much memory instead of 8 GiB.
MAX_SCORES = 1 << 24


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, scale: float | None = None,
                      max_scores: int = MAX_SCORES) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (..., T, H, D) over k/v (..., S, H_kv, D) -> (out (..., T, H, D),
    lse (..., T, H)), both in fp32 (fp64 for fp64 inputs). mask (..., T, S) bool, True =
    visible; None = all visible. Rows with no visible key (S == 0 included): out 0,
    lse -inf. The scores are materialised, ``max_scores`` elements at a time (query rows
    in chunks); a fused kernel that returns lse may replace this (same values)."""
    per_row = q[..., 0, :, 0].numel() * max(1, k.shape[-3])  # batch x H x S
    rows = max(1, max_scores // per_row)
    t = q.shape[-3]
    if t <= rows:
        return _partial(q, k, v, mask, scale)
    parts = [_partial(q[..., i:i + rows, :, :], k, v,
                      None if mask is None else mask[..., i:i + rows, :], scale)
             for i in range(0, t, rows)]
    return torch.cat([o for o, _ in parts], -3), torch.cat([lse for _, lse in parts], -2)


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    *batch, t, h, d = q.shape
    h_kv = k.shape[-2]
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # (..., H_kv, G, T, D) queries against (..., H_kv, 1, S, D) keys and values
    qf = q.to(acc).reshape(*batch, t, h_kv, h // h_kv, d).movedim(-4, -2)
    kf = k.to(acc).movedim(-3, -2).unsqueeze(-3)
    vf = v.to(acc).movedim(-3, -2).unsqueeze(-3)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (..., H_kv, G, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-3).unsqueeze(-3), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (..., H_kv, G, T); -inf for an empty row
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.exp(scores - safe.unsqueeze(-1)) @ vf  # (..., H_kv, G, T, D); 0 if empty
    out = out.movedim(-2, -4).reshape(*batch, t, h, d)
    return out, lse.movedim(-1, -3).reshape(*batch, t, h)


def _weights(lse: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(lse - m) with m = -inf (no keys anywhere) taken as 0: weight 0, not nan."""
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(lse - m)


def _finish(num: torch.Tensor, total: torch.Tensor,
            m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """num (..., H, D) = sum w*out, total (..., H) = sum w -> merged (out, lse)."""
    seen = total > 0
    out = torch.where(seen.unsqueeze(-1), num / torch.where(seen, total, 1).unsqueeze(-1), 0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return out, m + torch.log(total)  # log 0 = -inf: still no keys


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partials over disjoint key sets: [(out (..., H, D), lse (..., H))]
    -> (out, lse) of attention over their union."""
    lses = torch.stack([lse for _, lse in parts])  # (K, ..., H)
    m = lses.amax(0)
    w = _weights(lses, m)  # (K, ..., H)
    outs = torch.stack([out for out, _ in parts])  # (K, ..., H, D)
    num = torch.where(w.unsqueeze(-1) > 0, outs * w.unsqueeze(-1), 0).sum(0)
    return _finish(num, w.sum(0), m)


def merge_across(out: torch.Tensor, lse: torch.Tensor,
                 group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_partials over the ranks of ``group``, each holding one partial (out (..., H,
    D), lse (..., H)) for the same query rows: all-reduce MAX of lse, then one all-reduce
    SUM of (w * out, w) packed. Every rank gets the merged (out, lse)."""
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    w = _weights(lse, m)  # (..., H)
    num = torch.where(w.unsqueeze(-1) > 0, out * w.unsqueeze(-1), 0)  # (..., H, D)
    packed = torch.cat([num.reshape(-1), w.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return _finish(packed[:num.numel()].view_as(num), packed[num.numel():].view_as(w), m)


# ---- who holds which tokens -------------------------------------------------------
def balanced_split(length: int, cp: int, granule: int = 1) -> list[list[int]]:
    """Global positions of each of the ``cp`` ranks for a prompt of ``length`` tokens:
    2*cp chunks of c = granule * ceil(length / (2 * cp * granule)) tokens (the last ones
    short or empty), rank r holding chunks r and 2*cp-1-r, ascending. ``granule``: the KV
    block size, so each rank's share fills whole paged blocks."""
    if cp < 1 or granule < 1 or length < 0:
        raise ValueError(f"balanced_split needs cp >= 1, granule >= 1, length >= 0; got "
                         f"{cp}, {granule}, {length}")
    c = granule * -(-length // (2 * cp * granule))
    chunk = [list(range(min(i * c, length), min((i + 1) * c, length))) for i in range(2 * cp)]
    return [chunk[r] + chunk[2 * cp - 1 - r] for r in range(cp)]


def decode_owner(position: int, cp: int, granule: int = 1) -> int:
    """The rank that stores the K/V of a token decoded at ``position``: round-robin over
    ``granule``-token blocks, so a rank's new slots fill its paged blocks in order."""
    return (position // granule) % cp


# ---- ring-attention prefill ------------------------------------------------------
@dataclass
class RingPlan:
    """What one rank does at each ring step, made once per sequence (shared by layers).

    positions[r]: rank r's global positions (ascending). width: every block's padded
    length (the longest share), so every message has the same shape. steps[i] for ring
    step i: (source rank of the block held, q_lo, k_hi, mask): this rank's queries
    [q_lo:] attend the block's keys [:k_hi] under mask ((T - q_lo, k_hi) bool or None =
    all visible); k_hi == 0 or q_lo == T: nothing to compute."""
    rank: int
    positions: list[torch.Tensor]
    width: int
    steps: list[tuple[int, int, int, torch.Tensor | None]]

    @classmethod
    def build(cls, positions: list[list[int]], rank: int,
              device: torch.device | str = "cpu") -> "RingPlan":
        cp = len(positions)
        pos = [torch.tensor(p, dtype=torch.long, device=device) for p in positions]
        for p in positions:
            if any(a >= b for a, b in zip(p, p[1:])):
                raise ValueError("each rank's positions must be strictly ascending")
        mine = positions[rank]
        steps = []
        for i in range(cp):
            src = (rank - i) % cp
            keys = positions[src]
            if not mine or not keys:
                steps.append((src, len(mine), 0, None))
                continue
            q_lo = _first_at_least(mine, keys[0])  # queries that see the block's first key
            k_hi = _first_above(keys, mine[-1])  # keys the last query can see
            mask = None
            if q_lo < len(mine) and k_hi > 0:
                qp, kp = pos[rank][q_lo:], pos[src][:k_hi]
                m = kp.view(1, -1) <= qp.view(-1, 1)  # (T - q_lo, k_hi)
                mask = None if bool(m.all()) else m
            steps.append((src, q_lo, k_hi, mask))
        return cls(rank, pos, max(len(p) for p in positions), steps)


def _first_at_least(seq: list[int], x: int) -> int:
    return next((i for i, p in enumerate(seq) if p >= x), len(seq))


def _first_above(seq: list[int], x: int) -> int:
    return next((i for i, p in enumerate(seq) if p > x), len(seq))


def _global_rank(group: Group, index: int) -> int:
    return index if group is None else dist.get_global_rank(group, index)


class RingAttention(nn.Module):
    """Causal attention of this rank's tokens over the whole sequence, the K/V blocks
    passed around the ring of ``group`` (see the module docstring)."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                plan: RingPlan) -> torch.Tensor:
        """q (T, H, D), k/v (T, H_kv, D): this rank's tokens, rotated -> (T, H, D)."""
        t, h, d = q.shape
        cp = len(plan.positions)
        rank = plan.rank
        nxt = _global_rank(self.group, (rank + 1) % cp)
        prv = _global_rank(self.group, (rank - 1) % cp)
        block = k.new_zeros(2, plan.width, k.shape[1], d)  # (2, W, H_kv, D): K then V
        block[0, :t], block[1, :t] = k, v.to(k.dtype)
        acc = _acc_dtype(q.dtype)
        out = q.new_zeros(t, h, d, dtype=acc)
        lse = q.new_full((t, h), float("-inf"), dtype=acc)
        for i, (_, q_lo, k_hi, mask) in enumerate(plan.steps):
            reqs, incoming = [], None
            if i + 1 < cp:  # pass this block on while computing with it
                incoming = torch.empty_like(block)
                reqs = [dist.isend(block, nxt, group=self.group),
                        dist.irecv(incoming, prv, group=self.group)]
            if k_hi > 0 and q_lo < t:
                part = partial_attention(q[q_lo:], block[0, :k_hi], block[1, :k_hi], mask)
                out[q_lo:], lse[q_lo:] = merge_partials([(out[q_lo:], lse[q_lo:]), part])
            for r in reqs:
                r.wait()
            if incoming is not None:
                block = incoming
        return out.to(q.dtype)


class ShardedDecodeAttention(nn.Module):
    """One new token per sequence against K/V sharded over ``group``: each rank attends
    its shard, one merge_across combines. Every rank returns the same output."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def forward(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, H, D) rotated; keys/values (B, S, H_kv, D) this rank's shard (S may be 0);
        mask (B, S) bool (True = a written slot) or None -> (B, H, D)."""
        out, lse = partial_attention(q.unsqueeze(1), keys, values,
                                     None if mask is None else mask.unsqueeze(1))
        out, _ = merge_across(out[:, 0], lse[:, 0], self.group)
        return out.to(q.dtype)
