"""The attention mask of an eager step over the KV cache's live slots (left padding,
causal order). The static-cache graph path builds its own, over every slot, on the device
(llamadist.runtime.cuda_graph)."""

from __future__ import annotations

import torch


def attention_mask(valid: torch.Tensor | None, start: int, t: int) -> torch.Tensor | None:
    """(B, 1, T, start+T) bool: query i (slot start+i) sees key j if j <= start+i and slot
    j holds a real token. ``valid`` (B, S) marks real tokens; None means no padding.
    A query always sees itself, so padded rows stay finite."""
    end = start + t
    if valid is None:
        if t == 1 or start == 0:
            return None  # plain causal: SDPA's is_causal (prefill) or no mask (decode)
        valid_keys = None
        device = None
    else:
        valid_keys = valid[:, :end]
        device = valid.device
    q_slot = torch.arange(start, end, device=device).view(t, 1)
    k_slot = torch.arange(end, device=device).view(1, end)
    causal = k_slot <= q_slot  # (T, end)
    if valid_keys is None:
        return causal.view(1, 1, t, end)
    allowed = causal.unsqueeze(0) & valid_keys.unsqueeze(1)  # (B, T, end)
    allowed = allowed | (k_slot == q_slot).unsqueeze(0)
    return allowed.unsqueeze(1)
