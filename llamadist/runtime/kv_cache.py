"""A preallocated KV cache for the layers of one stage, on that stage's device.

The runtime owns it and passes it into ``forward``; it never moves between devices.
Slots are shared across the batch (prompts are left-padded), so one start index
addresses every sequence: the write is a plain slice, or an indexed write at a
device tensor when the step is captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamadist.config import ModelConfig


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, H_kv, S, D)
    v: torch.Tensor  # (B, H_kv, S, D)
    # (2, B, H_kv, S, D) when k and v are its two halves: a graph step then writes both
    # with one indexed store, which torch.compile fuses with RoPE into one kernel.
    kv: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor,
              start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H_kv, T, D) at slots [start, start+T) and return the keys and
        values to attend over: slots [0, start+T) for an int start, all S slots for a
        tensor start (static shapes for graph capture; the mask hides unwritten slots)."""
        b, t = k.shape[0], k.shape[2]
        if b > self.k.shape[0]:
            raise IndexError(f"batch of {b} but the KV cache was built for {self.k.shape[0]}")
        # A smaller batch than the cache was built for uses the first b rows.
        kc, vc = (self.k, self.v) if b == self.k.shape[0] else (self.k[:b], self.v[:b])
        if isinstance(start, torch.Tensor):
            idx = start + torch.arange(t, device=k.device)
            # Index assignment (index_put_), which torch.compile keeps as an in-place
            # write into the cache rather than a functional copy of it.
            if self.kv is not None:
                kv = self.kv if b == self.k.shape[0] else self.kv[:, :b]
                kv[:, :, :, idx] = torch.stack((k, v))
                return kv[0], kv[1]
            kc[:, :, idx] = k
            vc[:, :, idx] = v
            return kc, vc
        end = start + t
        if end > kc.shape[2]:
            raise IndexError(f"KV cache holds {kc.shape[2]} positions; asked to write up to {end}")
        kc[:, :, start:end] = k
        vc[:, :, start:end] = v
        return kc[:, :, :end], vc[:, :, :end]


class KVCache:
    """K and V for the given global layer ids, batch size and maximum sequence length."""

    def __init__(self, config: ModelConfig, layer_ids: range | list[int], batch_size: int,
                 max_seq_len: int, device: torch.device | str, dtype: torch.dtype,
                 num_kv_heads: int | None = None):
        heads = num_kv_heads or config.num_kv_heads
        shape = (2, batch_size, heads, max_seq_len, config.head_dim)
        self.layers = {}
        for i in layer_ids:
            kv = torch.zeros(shape, device=device, dtype=dtype)
            self.layers[i] = LayerCache(kv[0], kv[1], kv)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers.values())
