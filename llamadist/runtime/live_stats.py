"""A worker's live statistics, sent with its heartbeats (distributed.link) so the front's
``LLM.stage_stats``, ``LLM.expert_load`` and /metrics see every rank while the run goes on,
not only in the final report.

The heartbeat thread builds them about once a second from counters the step path keeps
anyway (``RankStats``) plus the device allocator's figures; nothing is added to a step.
Only the expert counters live on the device: they are read (a few KB) while the rank is
between steps, holding ``StageRank.step_lock``, so the copy never meets a CUDA graph
capture in the main thread; when a step keeps the lock past ``LOCK_WAIT_S`` the previous
counts go out again (at most one beat old).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

LOCK_WAIT_S = 0.2


def memory_of(device: torch.device) -> dict[str, int]:
    """Bytes allocated by tensors and held by the allocator on a CUDA device (host-side
    figures, no sync); on the CPU both are the process's resident set."""
    if device.type == "cuda":
        return {"memory_allocated_bytes": int(torch.cuda.memory_allocated(device)),
                "memory_used_bytes": int(torch.cuda.memory_reserved(device))}
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = 0
    return {"memory_allocated_bytes": rss, "memory_used_bytes": rss}


class LiveStats:
    """``WorkerLink.stats`` of one rank: identity (stage, rank, replica, tp, cp, layers,
    device), steps, compute and wait seconds, the busy fraction since the previous beat,
    memory, and for a mixture-of-experts stage ``expert_load`` ({layer: per-expert
    tokens}, keys as strings: JSON)."""

    def __init__(self, rank_stage: Any, identity: dict):
        self.rank_stage, self.identity = rank_stage, dict(identity)
        self._last = (time.monotonic(), rank_stage.stats.compute_s)
        self._load: dict[str, list[int]] = {}
        self.moe = bool(rank_stage.stage.model.config.is_moe)

    def __call__(self) -> dict:
        rs = self.rank_stage
        st, now = rs.stats, time.monotonic()
        t, c = self._last
        self._last = (now, st.compute_s)
        busy = min(1.0, max(0.0, (st.compute_s - c) / (now - t))) if now > t else 0.0
        out = {**self.identity, "steps": st.steps, "compute_s": st.compute_s,
               "wait_s": st.wait_s, "busy": busy, **memory_of(rs.stage.device)}
        if self.moe:
            if rs.step_lock.acquire(timeout=LOCK_WAIT_S):
                try:
                    self._load = {str(k): v for k, v in rs.stage.expert_load().items()}
                finally:
                    rs.step_lock.release()
            out["expert_load"] = self._load
        return out


def merge_expert_load(reports: list[dict]) -> dict[int, list[int]]:
    """{layer: tokens routed to each expert} over the ranks' reports (live or final): the
    sum over the ranks of TP index 0 (a stage's TP ranks, experts spread over them or not,
    all route the same tokens; context-parallel ranks and data-parallel replicas route
    tokens of their own)."""
    out: dict[int, list[int]] = {}
    for r in reports:
        if r.get("tp", 0) != 0:
            continue
        for layer, counts in r.get("expert_load", {}).items():
            have = out.setdefault(int(layer), [0] * len(counts))
            out[int(layer)] = [a + b for a, b in zip(have, counts)]
    return out
