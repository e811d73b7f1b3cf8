"""One sequence's K/V sharded over the ranks of a context-parallel group, as the cache
``Llama.forward`` takes (a StageKV whose layers have ``attend``: llamadist.model.cache.
FlatLayerKV), so the unchanged model runs context-parallel:

    kv = ContextParallelKV(config, layers, group, rank, cp)
    mine = kv.begin_prefill(len(prompt))            # this rank's global positions
    logits = model(ids[mine].view(1, -1), mine.view(1, -1), kv, 0, logits="all")
    kv.begin_decode(len(prompt))                    # every rank runs the new token
    logits = model(tok.view(1, 1), torch.tensor([[len(prompt)]]), kv, 0)

Everything outside attention (embedding, norms, MLP, head) is per token, so a rank that
runs the model on its own tokens at their global positions (RoPE included) gets exactly
those tokens' hidden states; only attention needs the other ranks, through the explicit
modules of llamadist.parallel.context: ``RingAttention`` in prefill (each rank's tokens,
the causal-balanced split) and ``ShardedDecodeAttention`` in decode (the one new token
on every rank, merged). A decoded token's K/V is kept by its ``decode_owner`` only.

Why a cache object and not a pass that swaps ``Attention``: the model already hands its
rotated q/k/v to the cache's ``attend`` for flat batches (the paged engine's seam), and
what changes under CP is exactly what "attend over this sequence's context" means.

The K/V here is plain growing tensors for one sequence, a reference for the paged
version the engine will need (README, "Context parallelism": each CP rank's paged cache
holds its share of a request's blocks). Not wired into the engine or the CLI yet.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llamadist.config import ModelConfig
from llamadist.parallel.context import (Group, RingAttention, RingPlan, ShardedDecodeAttention,
                                        balanced_split, decode_owner)


class ContextParallelLayer:
    """One layer's shard of the sequence: k/v (S_local, H_kv, D) and their positions."""

    def __init__(self, owner: "ContextParallelKV", h_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.owner = owner
        self.k = torch.empty(0, h_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, H, D), k/v (N, H_kv, D), rotated: this rank's prompt tokens (prefill) or
        the one new token, the same on every rank (decode) -> (N, H, D)."""
        kv = self.owner
        if kv.plan is not None:
            if self.k.shape[0]:
                raise NotImplementedError("ring prefill after cached tokens (a chunked or "
                                          "continued prefill) is not written yet")
            self.k, self.v = k.to(self.k.dtype), v.to(self.v.dtype)
            return kv.ring(q, k, v, kv.plan)
        if q.shape[0] != 1:
            raise ValueError(f"a context-parallel decode step takes one token, got {q.shape[0]}")
        if kv.keeps_new_token:
            self.k = torch.cat([self.k, k.to(self.k.dtype)])
            self.v = torch.cat([self.v, v.to(self.v.dtype)])
        # (1, H, D) against (1, S_local, H_kv, D): all of the shard is in the past
        return kv.decode(q, self.k.unsqueeze(0), self.v.unsqueeze(0))


class ContextParallelKV:
    """This rank's shard of one sequence's K/V for ``layers`` (a StageKV), over the
    ``cp`` ranks of ``group`` (this is rank ``cp_rank`` of it). ``granule``: the split's
    unit (the paged block size when the shard lives in paged blocks)."""

    def __init__(self, config: ModelConfig, layers: Iterable[int], group: Group, cp_rank: int,
                 cp: int, granule: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", num_kv_heads: int | None = None):
        self.cp_rank, self.cp, self.granule = cp_rank, cp, granule
        self.device = torch.device(device)
        self.ring = RingAttention(group)
        self.decode = ShardedDecodeAttention(group)
        h_kv = num_kv_heads or config.num_kv_heads
        self.layers = {i: ContextParallelLayer(self, h_kv, config.head_dim, dtype, device)
                       for i in layers}
        self.plan: RingPlan | None = None
        self.keeps_new_token = False
        self.positions: list[int] = []  # global positions of this rank's K/V, in order

    def layer(self, i: int) -> ContextParallelLayer:
        return self.layers[i]

    def begin_prefill(self, length: int) -> torch.Tensor:
        """Split a prompt of ``length`` tokens; returns this rank's global positions (T,)
        (possibly empty), the tokens it must run through the model."""
        shares = balanced_split(length, self.cp, self.granule)
        self.plan = RingPlan.build(shares, self.cp_rank, self.device)
        self.positions = list(shares[self.cp_rank])
        return self.plan.positions[self.cp_rank]

    def relay(self, num_heads: int, dtype: torch.dtype = torch.float32) -> None:
        """The prefill of a rank that holds no token of this prompt (shorter than 2 * cp
        chunks): the model has nothing to run (it takes no empty batch), but the ring
        passes through this rank, so each layer's ring step runs on empty tensors."""
        assert self.plan is not None and not self.positions, "relay() is for an empty share"
        for layer in self.layers.values():
            h_kv, d = layer.k.shape[1:]
            q = torch.empty(0, num_heads, d, dtype=dtype, device=self.device)
            self.ring(q, layer.k, layer.v, self.plan)

    def begin_decode(self, position: int) -> int:
        """Every rank runs the token at ``position``; its owner stores its K/V. Returns
        the owner."""
        self.plan = None
        owner = decode_owner(position, self.cp, self.granule)
        self.keeps_new_token = owner == self.cp_rank
        if self.keeps_new_token:
            self.positions.append(position)
        return owner
