"""What the model needs from a KV cache, as a Protocol: the runtime owns the cache (its
blocks, its device, its batch rows) and passes it into ``Llama.forward``; the model only
writes this step's keys and values and reads back what to attend over.

``llamadist.runtime.kv_cache.KVCache`` / ``LayerCache`` are the implementations; any
object with these methods serves (a test's, a graph bucket's view of the first rows).
"""

from __future__ import annotations

from typing import Protocol

import torch

# Cache start position: a Python int (eager path) or a 0-d long tensor (graph path).
Start = int | torch.Tensor


class LayerKV(Protocol):
    """One decoder layer's keys and values."""

    def write(self, k: torch.Tensor, v: torch.Tensor,
              start: Start) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H_kv, T, D) at slots [start, start+T); return the keys and values
        (B, H_kv, S, D) to attend over: S = start+T for an int start, every slot for a
        tensor start (the mask hides the slots not yet written)."""
        ...


class StageKV(Protocol):
    """The caches of a stage's layers, by global layer index."""

    def layer(self, i: int) -> LayerKV:
        ...
