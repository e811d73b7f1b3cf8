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
a group with one all-gather of the packed (out, lse) (T*H*(D+1) floats per rank), each
rank merging the C partials itself. Two all-reduces (MAX of lse, then SUM of the packed
(w * out, w)) would move 1/C of the data, as the seed's tree attention does, but pay two
latencies: on gloo a collective costs ~0.5 ms idle and a few ms on a loaded machine,
and the rows merged in the engine are decodes and one chunk's queries, where latency
dominates. A row no key is visible to (an empty slice, every key masked) has lse = -inf
and out = 0, and merges as weight 0.

The partials themselves: a fused kernel that also returns lse (``fused_partial``): on
the CPU ``aten._scaled_dot_product_flash_attention_for_cpu``, on CUDA PyTorch's flash
or memory-efficient kernel (llamadist.parallel.context_cuda), a masked block split into
runs of rows that see the same contiguous key range (``masked_runs``: a striped ring
block is one run per stripe) so masked-out blocks cost nothing. Where no fused kernel
fits (fp64 on CUDA, other devices), ``reference_partial`` materialises the scores in
bounded chunks; it is also the reference the kernels are tested against. Collectives
on device tensors over a gloo group (ranks sharing one GPU) go through host memory
(``all_gather``, ``RingExchange``).

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
The engine's CP step (llamadist.runtime.cp_step) uses the math and merges; RingAttention
and ShardedDecodeAttention serve the unpaged layouts (context_kv, paged_context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llamadist.parallel.context_cuda import cuda_kernel, sdpa_lse

Group = dist.ProcessGroup | None

__all__ = ["partial_attention", "fusable", "reference_partial", "masked_runs", "attend_runs",
           "merge_partials", "merge_across", "all_gather", "RingExchange", "balanced_split",
           "decode_owner", "RingPlan", "RingAttention", "ShardedDecodeAttention"]


# ---- the math -------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


# Score elements materialised at once by the reference path (64 MiB in fp32): longer
# query blocks go in row chunks, each exact on its own (rows are independent), so a 8k x
# 8k ring block of 32 heads costs this much memory instead of 8 GiB.
MAX_SCORES = 1 << 24

# A masked block whose rows' visible keys form contiguous ranges runs as one unmasked
# fused call per run of equal ranges (a striped ring block: one per stripe) up to this
# many runs; beyond it, one call with an additive mask.
MAX_RUNS = 64


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, scale: float | None = None,
                      max_scores: int = MAX_SCORES, causal: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (..., T, H, D) over k/v (..., S, H_kv, D) -> (out (..., T, H, D),
    lse (..., T, H)), both in fp32 (fp64 for fp64 inputs). mask (..., T, S) bool, True =
    visible; None = all visible; ``causal``: key j visible to query i iff j <= i (T == S,
    no mask). Rows with no visible key (S == 0 included): out 0, lse -inf.

    A fused kernel that returns the log-sum-exp does it without materialising scores
    (``fused_partial``): on the CPU ``aten._scaled_dot_product_flash_attention_for_cpu``,
    on CUDA the flash or memory-efficient kernel (llamadist.parallel.context_cuda) for
    fp32/fp16/bf16 and head sizes that are multiples of 8 up to 256. Otherwise (fp64 on
    CUDA, other devices) ``reference_partial`` materialises the scores in fp32 chunks."""
    if causal:
        if mask is not None or q.shape[-3] != k.shape[-3]:
            raise ValueError("causal attention takes T == S and no mask")
    if q.shape[-1] != k.shape[-1] or q.shape[-2] % max(1, k.shape[-2]):
        raise ValueError(f"q (..., T, H, D) {tuple(q.shape)} does not fit k (..., S, H_kv, "
                         f"D) {tuple(k.shape)}: D must match and H_kv divide H")
    if not q.shape[-3] or not k.shape[-3]:  # no query rows, or an empty shard
        acc = _acc_dtype(q.dtype)
        return (q.new_zeros(q.shape, dtype=acc),
                q.new_full(q.shape[:-1], float("-inf"), dtype=acc))
    if fusable(q):
        return fused_partial(q, k, v, mask, scale, causal)
    return reference_partial(q, k, v, mask, scale, max_scores, causal)


def fusable(q: torch.Tensor) -> bool:
    """A fused kernel returning the log-sum-exp exists for q's device, dtype and head size."""
    if q.device.type == "cpu":
        return True
    return q.device.type == "cuda" and cuda_kernel(q.dtype, q.shape[-1], True) is not None


def reference_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, scale: float | None = None,
                      max_scores: int = MAX_SCORES, causal: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """partial_attention by materialised scores (matmul + logsumexp in fp32, or fp64),
    ``max_scores`` elements at a time (query rows in chunks): any device, the reference
    the fused kernels are tested against."""
    if causal:
        t = q.shape[-3]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    per_row = q.shape[:-3].numel() * q.shape[-2] * max(1, k.shape[-3])  # batch x H x S
    rows = max(1, max_scores // per_row)
    t = q.shape[-3]
    if t <= rows:
        return _partial(q, k, v, mask, scale)
    parts = [_partial(q[..., i:i + rows, :, :], k, v,
                      None if mask is None else mask[..., i:i + rows, :], scale)
             for i in range(0, t, rows)]
    return torch.cat([o for o, _ in parts], -3), torch.cat([lse for _, lse in parts], -2)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            causal: bool, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k/v (B, H, S, D), bias (B, T, S) or None -> out (B, H, T, D), lse
    (B, H, T): the device's fused kernel."""
    if q.device.type == "cpu":
        mask = None if bias is None else bias.to(q.dtype).unsqueeze(1)  # (B, 1, T, S)
        out, lse = _FLASH_CPU(q, k, v, is_causal=causal, attn_mask=mask, scale=scale)[:2]
        return out, lse
    return sdpa_lse(q, k, v, scale, causal, bias)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           causal: bool = False, bias: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused call: q (B, T, H, D), k/v (B, S, H_kv, D) -> out (B, T, H, D) and lse
    (B, T, H) in the accumulation dtype. Unless causal, the G query heads of a KV head
    become G x T rows of one head (K/V read once per KV head, no copies; a bias row is
    repeated for each g); causal, K/V are repeated to H heads. bias (B, T, S) additive,
    or None. The CPU kernel runs in the accumulation dtype; the CUDA ones take fp16/bf16
    as they are and accumulate in fp32 themselves."""
    b, t, h, d = q.shape
    h_kv = k.shape[-2]
    g = h // h_kv
    acc = _acc_dtype(q.dtype)
    dt = acc if q.device.type == "cpu" else q.dtype
    kh, vh = k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2)  # (B, H_kv, S, D)
    if g == 1 or causal:
        if g > 1:
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        out, lse = _kernel(q.to(dt).transpose(1, 2), kh, vh, scale, causal, bias)
        return out.transpose(1, 2).to(acc), lse.transpose(1, 2).to(acc)
    # (B, T, H_kv, G, D) -> (B, H_kv, G * T, D): row g * T + t
    qf = q.to(dt).view(b, t, h_kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, h_kv, g * t, d)
    if bias is not None:
        bias = bias.repeat(1, g, 1)  # (B, G * T, S): row g * T + t is bias row t
    out, lse = _kernel(qf, kh, vh, scale, False, bias)  # (B, H_kv, G*T, D), (B, H_kv, G*T)
    out = out.to(acc).view(b, h_kv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return out, lse.to(acc).view(b, h_kv, g, t).permute(0, 3, 1, 2).reshape(b, t, h)


def fused_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, scale: float | None, causal: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """partial_attention through the device's fused kernel (T, S > 0). A 2-D mask whose rows
    see contiguous key ranges (CP's stripes, a causal prefix) runs unmasked per run of
    equal ranges, skipping the masked blocks; any other mask becomes an additive bias.
    Rows with no visible key are fixed up afterwards (out 0, lse -inf)."""
    *batch, t, h, d = q.shape
    s, h_kv = k.shape[-3:-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q3, k3, v3 = q.reshape(-1, t, h, d), k.reshape(-1, s, h_kv, d), v.reshape(-1, s, h_kv, d)
    if mask is None:
        out, lse = _flash(q3, k3, v3, scale, causal)
        return out.view(*batch, t, h, d), lse.view(*batch, t, h)
    if mask.dim() == 2 and not batch:
        runs = masked_runs(mask)
        if runs is not None:
            return attend_runs(q, k, v, runs, scale)
    m3 = mask.expand(*batch, t, s).reshape(-1, t, s)
    seen = m3.any(-1)  # (B, T)
    m3 = m3 | ~seen.unsqueeze(-1)  # an empty row sees every key, then is zeroed
    bias = torch.zeros(m3.shape, dtype=_acc_dtype(q.dtype), device=q.device)
    bias.masked_fill_(~m3, float("-inf"))
    out, lse = _flash(q3, k3, v3, scale, bias=bias)
    if not bool(seen.all()):
        out = out.masked_fill(~seen.view(*seen.shape, 1, 1), 0)
        lse = lse.masked_fill(~seen.unsqueeze(-1), float("-inf"))
    return out.view(*batch, t, h, d), lse.view(*batch, t, h)


def masked_runs(mask: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    """mask (T, S) -> [(row lo, row hi, key lo, key hi)] runs of rows that see exactly
    the same contiguous key range (empty rows left out), or None when some row's keys
    are not contiguous or there are more than MAX_RUNS runs."""
    t, s = mask.shape
    any_ = mask.any(-1)
    first = mask.to(torch.uint8).argmax(-1)
    last = s - mask.flip(-1).to(torch.uint8).argmax(-1)
    count = mask.sum(-1)
    if not bool(((last - first == count) | ~any_).all()):
        return None
    first, last = first.masked_fill(~any_, 0), last.masked_fill(~any_, 0)
    change = torch.ones(t, dtype=torch.bool, device=mask.device)
    change[1:] = (first[1:] != first[:-1]) | (last[1:] != last[:-1])
    starts = torch.nonzero(change).flatten().tolist() + [t]
    if len(starts) - 1 > MAX_RUNS:
        return None
    lo, hi = first.tolist(), last.tolist()
    return [(a, b, lo[a], hi[a]) for a, b in zip(starts, starts[1:]) if hi[a] > lo[a]]


def attend_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                runs: list[tuple[int, int, int, int]], scale: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """partial_attention of q (T, H, D) over k/v (S, H_kv, D) under a mask given as its
    ``masked_runs``: one fused call per run, rows in no run get out 0, lse -inf."""
    t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = _acc_dtype(q.dtype)
    out = q.new_zeros(t, h, d, dtype=acc)
    lse = q.new_full((t, h), float("-inf"), dtype=acc)
    for a, b, lo, hi in runs:
        o, l_ = _flash(q[None, a:b], k[None, lo:hi], v[None, lo:hi], scale)
        out[a:b], lse[a:b] = o[0], l_[0]
    return out, lse


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
    D), lse (..., H)) for the same query rows, in one collective: an all-gather of the
    packed (out, lse) (..., H, D + 1), merged on every rank. Every rank gets the merged
    (out, lse). (Two all-reduces, MAX of lse then SUM of the weighted outputs, move 1/C
    of the data but pay two latencies; the rows merged here are decodes and one chunk's
    queries, where latency dominates.)"""
    packed = torch.cat([out, lse.unsqueeze(-1)], -1)  # (..., H, D + 1)
    stacked = torch.stack(all_gather(packed, group))  # (C, ..., H, D + 1)
    outs, lses = stacked[..., :-1], stacked[..., -1]
    m = lses.amax(0)
    w = _weights(lses, m)  # (C, ..., H)
    num = torch.where(w.unsqueeze(-1) > 0, outs * w.unsqueeze(-1), 0).sum(0)
    return _finish(num, w.sum(0), m)


# ---- moving tensors between the ranks ----------------------------------------------
def via_host(t: torch.Tensor, group: Group) -> bool:
    """A device tensor over a gloo group (ranks sharing one GPU: NCCL refuses two ranks
    on a GPU, llamadist.distributed.groups) travels through host memory, as the stage
    messages of llamadist.distributed.p2p do: gloo's send/recv read host pointers."""
    return t.device.type != "cpu" and dist.get_backend(group) == "gloo"


def all_gather(t: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all), on t's device."""
    host = via_host(t, group)
    src = (t.cpu() if host else t).contiguous()
    everyone = [torch.empty_like(src) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, src, group=group)
    return [e.to(t.device) for e in everyone] if host else everyone


class RingExchange:
    """Send ``block`` to global rank ``nxt`` and receive a block of its shape from ``prv``,
    both posted at once so the transfer overlaps whatever runs before ``wait``."""

    def __init__(self, block: torch.Tensor, nxt: int, prv: int, group: Group):
        self.device = block.device
        host = via_host(block, group)
        self.sent = (block.cpu() if host else block).contiguous()  # alive until wait
        self.incoming = torch.empty_like(self.sent)
        self.reqs = [dist.isend(self.sent, nxt, group=group),
                     dist.irecv(self.incoming, prv, group=group)]

    def wait(self) -> torch.Tensor:
        """The received block, on the sent block's device."""
        for r in self.reqs:
            r.wait()
        return self.incoming.to(self.device)


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
            # pass this block on while computing with it
            exchange = RingExchange(block, nxt, prv, self.group) if i + 1 < cp else None
            if k_hi > 0 and q_lo < t:
                part = partial_attention(q[q_lo:], block[0, :k_hi], block[1, :k_hi], mask)
                out[q_lo:], lse[q_lo:] = merge_partials([(out[q_lo:], lse[q_lo:]), part])
            if exchange is not None:
                block = exchange.wait()
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
