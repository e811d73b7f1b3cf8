"""A context-parallel rank's share of requests in its own paged KV cache: the layout the
engine's CP wiring would use (not wired yet), and the attention of a step over it.

Every CP rank has its own ``PagedKVCache`` (same block size, its own block ids). A
request's K/V is split over the ranks (llamadist.parallel.context: the prompt by the
causal-balanced split, each decoded token to its ``decode_owner``); each rank stores
*its* tokens at consecutive local slots 0, 1, 2, ... of a local block table, whatever
their global positions. So a rank's share of a request is an ordinary paged sequence
of ``local_len`` slots, and:

* decode: every sequence's query is attended against all its local slots (all in the
  past: no positions needed, only the lengths), the partials merged across the ranks
  (``ShardedDecodeAttention``); the new token's K/V is written by its owner only;
* prefill: one prompt's tokens of this rank are written at local slots [0, n) and
  attended by ``RingAttention`` (positions from the plan), the K/V in hand.

``ShardStep`` is one step's metadata on one rank (what ``PagedBatch`` is without CP);
``PagedShardStep(cache, step)`` is the StageKV ``Llama.forward`` takes (its layers have
``attend``). The scheduler would allocate blocks per CP rank from its local lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamadist.parallel.context import (Group, RingAttention, RingPlan, ShardedDecodeAttention,
                                        balanced_split)
from llamadist.runtime.paged_attention import gather, gather_rows
from llamadist.runtime.paged_kv import PagedKVCache


@dataclass
class ShardStep:
    """One step of S sequences on one CP rank. block_tables (S, MB): each sequence's local
    blocks; local_lens (S,): its local slots after this step's writes; write_tokens (W,)
    and write_slots (W,): the flat indices of the step's tokens this rank stores and their
    local slots (block * block_size + offset); plan: a one-prompt prefill's ring plan, or
    None for a decode step (one token per sequence)."""
    block_size: int
    block_tables: torch.Tensor
    local_lens: torch.Tensor
    write_tokens: torch.Tensor
    write_slots: torch.Tensor
    plan: RingPlan | None = None

    @staticmethod
    def _slots(table: Sequence[int], start: int, n: int, block_size: int) -> list[int]:
        if len(table) * block_size < start + n:
            raise ValueError(f"local table of {len(table)} blocks of {block_size} cannot hold "
                             f"{start + n} slots")
        return [table[p // block_size] * block_size + p % block_size
                for p in range(start, start + n)]

    @classmethod
    def prefill(cls, table: Sequence[int], length: int, cp: int, rank: int,
                block_size: int, granule: int = 1) -> tuple["ShardStep", torch.Tensor]:
        """A fresh prompt of ``length`` tokens: this rank's step and its global positions
        (T,), the tokens it runs through the model (stored at local slots [0, T))."""
        shares = balanced_split(length, cp, granule)
        plan = RingPlan.build(shares, rank)
        n = len(shares[rank])
        step = cls(block_size, torch.tensor([list(table)]), torch.tensor([n]),
                   torch.arange(n), torch.tensor(cls._slots(table, 0, n, block_size),
                                                 dtype=torch.long), plan)
        return step, plan.positions[rank]

    @classmethod
    def decode(cls, tables: Sequence[Sequence[int]], held: Sequence[int],
               owns: Sequence[bool], block_size: int) -> "ShardStep":
        """One new token per sequence: ``held[s]`` local slots already written, ``owns[s]``
        whether this rank stores sequence s's new token (at local slot held[s])."""
        width = max(1, max(len(t) for t in tables))
        padded = [list(t) + [0] * (width - len(t)) for t in tables]
        mine = [s for s, o in enumerate(owns) if o]
        slots = [cls._slots(tables[s], held[s], 1, block_size)[0] for s in mine]
        lens = [h + int(o) for h, o in zip(held, owns)]
        return cls(block_size, torch.tensor(padded), torch.tensor(lens),
                   torch.tensor(mine, dtype=torch.long), torch.tensor(slots, dtype=torch.long))


class PagedShardLayer:
    """One layer's share (a FlatLayerKV): k/v (num_blocks, H_kv, bs, D) of this rank."""

    def __init__(self, kv: torch.Tensor, step: ShardStep, ring: RingAttention,
                 decode: ShardedDecodeAttention):
        self.k, self.v = kv[0], kv[1]
        self.step, self.ring, self.decode = step, ring, decode

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        st = self.step
        if not len(st.write_tokens):
            return
        h_kv, bs, d = self.k.shape[1:]
        slots = st.write_slots.view(-1, 1)  # (W, 1) -> rows of (blocks * H_kv * bs, D)
        heads = torch.arange(h_kv, device=slots.device).view(1, -1)
        rows = (((slots // bs) * h_kv + heads) * bs + slots % bs).view(-1)
        self.k.view(-1, d).index_copy_(0, rows, k[st.write_tokens].reshape(-1, d).to(self.k.dtype))
        self.v.view(-1, d).index_copy_(0, rows, v[st.write_tokens].reshape(-1, d).to(self.v.dtype))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, H, D), k/v (N, H_kv, D) rotated -> (N, H, D)."""
        self._write(k, v)
        st = self.step
        if st.plan is not None:
            return self.ring(q, k, v, st.plan)
        h_kv = self.k.shape[1]
        length = int(st.local_lens.max())
        # (S, H_kv, L, D) gathered from the local blocks -> (S, L, H_kv, D)
        rows = gather_rows(st.block_tables, h_kv)
        keys = gather(self.k, rows, length).transpose(1, 2)
        values = gather(self.v, rows, length).transpose(1, 2)
        lens = st.local_lens.view(-1, 1)
        mask = torch.arange(length, device=lens.device).view(1, -1) < lens  # (S, L)
        return self.decode(q, keys.to(q.dtype), values.to(q.dtype), mask)


class PagedShardStep:
    """The StageKV of one CP step: ``layer(i)`` over this rank's paged cache."""

    def __init__(self, cache: PagedKVCache, step: ShardStep, group: Group):
        if step.block_size != cache.block_size:
            raise ValueError(f"step built for block_size {step.block_size}, cache has "
                             f"{cache.block_size}")
        self.cache, self.step = cache, step
        self.ring, self.decode = RingAttention(group), ShardedDecodeAttention(group)

    def layer(self, i: int) -> PagedShardLayer:
        return PagedShardLayer(self.cache.kv(i), self.step, self.ring, self.decode)
