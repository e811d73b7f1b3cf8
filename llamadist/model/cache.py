"""What the model needs from a KV cache, as a Protocol: the runtime owns the cache (its
blocks, its device, its batch rows) and passes it into ``Llama.forward``; the model only
writes this step's keys and values and reads back what to attend over.

``llamadist.runtime.kv_cache.KVCache`` / ``LayerCache`` are the implementations; any
object with these methods serves (a test's, a graph bucket's view of the first rows).

A flat batch (continuous batching over a paged cache) uses ``FlatLayerKV`` instead: the
model hands over this step's rotated q/k/v token by token, and the runtime's object
stores k/v in its blocks and attends each token over its own sequence's context
(``llamadist.runtime.paged_kv``). ``Attention.forward`` takes this path whenever the
layer's cache has an ``attend`` method.
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

    def layer(self, i: int) -> "LayerKV | FlatLayerKV":
        ...


class FlatLayerKV(Protocol):
    """One decoder layer's keys and values for a flat batch of N tokens from S sequences,
    each token at its own position (the runtime's batch metadata says which sequence)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None) -> torch.Tensor:
        """Store k/v (N, H_kv, D) (k rotated) at each token's slot, then return causal
        attention of q (N, H, D) (rotated) over each token's own sequence, up to and
        including the token itself: (N, H, D). k and v None: stored already, where the
        cache offers ``cache_slots`` (optional: (kv, slots) or None, see
        llamadist.runtime.paged_attention.PagedLayer)."""
        ...
