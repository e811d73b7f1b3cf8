"""When to move a request's KV blocks to another replica instead of recomputing them
(seed 000, section 8.2): the cost rule of a drain.

A request that leaves a live replica (``POST /admin/drain``) has ``n`` tokens whose K/V
sit in that replica's blocks. Two ways to continue it elsewhere:

* migrate: ship the blocks (every layer's K and V of the ``n`` tokens) over the path
  between the replicas' executors and write them into blocks of the target, then decode
  on at once;
      migrate_s = hops x (messages x latency + bytes / bandwidth)
  with bytes = n x (layers x 2 x H_kv x D x itemsize): for replicas in worker processes
  the path is direct, each source rank's KV listener to the same target rank
  (distributed.kv_direct: each byte crosses loopback once, ``hops`` = 1), or the front's
  TCP links (``kv=...-relay``, or where a worker has no listener: every byte crosses
  loopback twice, replica -> front -> replica, ``hops`` = 2); a host copy for in-process
  replicas;
* replay: prefill the ``n`` tokens again on the target (less what its prefix cache
  already holds), the cost model's prefill time (planning.cost.CostModel.prefill_time:
  matmul FLOPs x tokens + causal attention, at the device's FLOP/s and bandwidth).

Migrate when it is cheaper. A lost replica's KV is gone: it can only replay. Where the
executor has no path (``kv_path`` None: a torchrun front, whose other ranks it reaches
only through their steps), or the target has no free blocks or batch slot, replay too.
The constants are order-of-magnitude defaults (benchmarks/RESULTS.md has the measured
rates on this machine's CPU); a wrong guess costs time, never a token: both ways give the
same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from llamadist.config import ModelConfig
from llamadist.planning.cost import CostModel, Link
from llamadist.planning.devices import (CPU_BANDWIDTH, CPU_FLOPS, REFERENCE_BANDWIDTH,
                                        REFERENCE_FLOPS)
from llamadist.planning.profile import profile

POLICIES = ("auto", "migrate", "replay")
# how a migration's bytes travel between worker processes: "direct" rank to rank
# (distributed.kv_direct) where both replicas' workers have a KV listener, "relay" through
# the front's links; "auto" is direct where it can be. A drain's ``kv`` says both as
# POLICY or POLICY-ROUTE, e.g. "migrate-relay", "auto-direct".
ROUTES = ("auto", "direct", "relay")

# Loopback TCP through the front's links (distributed.link): each byte is copied into a
# frame, through the kernel, out of the reader's buffer into a tensor, and again on the way
# to the target; measured ~120 MB/s end to end for SmolLM2's blocks on this (shared,
# loaded) 2-core CPU, i.e. ~240 MB/s per hop (benchmarks/RESULTS.md, issue 15 migration);
# ~1 ms per message with the reader thread and the rank's own work.
FRONT_RELAY = Link("front-relay", 2e8, 1e-3)
# Loopback TCP rank to rank (distributed.kv_direct): copied out of the cache, through the
# kernel once, into the target's cache; the order and the ack still go through the front.
# Measured ~400 MB/s end to end for SmolLM2's blocks on the same loaded 2-core CPU
# (benchmarks/RESULTS.md, issue 15 direct migration)
DIRECT_TCP = Link("direct-tcp", 5e8, 1e-3)
HOST_COPY = Link("host-copy", 3e9, 1e-5)    # an in-process CPU replica: copied out and in
PCIE = Link("pcie", 25e9, 5e-6)             # an in-process GPU replica: through the host


@dataclass(frozen=True)
class KVPath:
    """How KV blocks go from one executor to another: the link, how often each byte
    crosses it (2 through the front: in, then out), and the messages of one transfer
    (through the front: one per rank each way)."""
    link: Link
    hops: int = 2
    messages: int = 2

    def seconds(self, nbytes: float) -> float:
        return self.messages * self.link.latency_s + self.hops * nbytes / self.link.bandwidth


def parse_kv(kv: str) -> tuple[str, str]:
    """A drain's ``kv`` -> (policy, route): "auto" -> ("auto", "auto"), "migrate-relay" ->
    ("migrate", "relay"). ValueError: not POLICY or POLICY-ROUTE."""
    policy, dash, route = kv.partition("-")
    route = route if dash else "auto"
    if policy not in POLICIES or route not in ROUTES:
        raise ValueError(f"kv must be one of {', '.join(POLICIES)}, optionally followed by "
                         f"-{'/-'.join(ROUTES[1:])} (e.g. migrate-relay), not {kv!r}")
    return policy, route


def device_rates(device: str) -> tuple[float, float]:
    """(FLOP/s, bytes/s) the planner assumes for ``device`` (planning.devices)."""
    if device.startswith("cuda"):
        return REFERENCE_FLOPS, REFERENCE_BANDWIDTH
    return CPU_FLOPS, CPU_BANDWIDTH


def kv_bytes_per_token(config: ModelConfig, itemsize: int) -> int:
    """K and V of one token in every layer (all KV heads: all the replica's ranks)."""
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize


@lru_cache(maxsize=8)
def _cost_model(config: ModelConfig, dtype: str) -> CostModel:
    return CostModel.build(profile(config, dtype, seq_len=1), batch=1, context=1,
                           config=config)


@dataclass(frozen=True)
class MigrationCost:
    """The rule for one model on one kind of replica."""
    config: ModelConfig
    dtype: str        # the KV cache's (and weights') dtype, e.g. "float32", "bfloat16"
    itemsize: int     # bytes per KV value
    device: str       # where a replica computes (its first device)

    def migrate_s(self, path: KVPath, tokens: int) -> float:
        return path.seconds(tokens * kv_bytes_per_token(self.config, self.itemsize))

    def replay_s(self, tokens: int) -> float:
        """Prefill of ``tokens`` tokens through the whole model on ``device``."""
        if tokens <= 0:
            return 0.0
        flops, bandwidth = device_rates(self.device)
        cm, n = _cost_model(self.config, self.dtype), self.config.num_layers
        return cm.prefill_time(flops, bandwidth, 0, n, True, True, tokens, batch=1)

    def choose(self, policy: str, path: KVPath | None, computed: int,
               recompute: int) -> str:
        """"migrate" or "replay" for a request with ``computed`` tokens in its blocks, of
        which the target would ``recompute`` (the rest are in its prefix cache)."""
        if policy not in POLICIES:
            raise ValueError(f"KV policy must be one of {POLICIES}, got {policy!r}")
        if path is None or computed <= 0 or policy == "replay":
            return "replay"
        if policy == "migrate":
            return "migrate"
        return "migrate" if self.migrate_s(path, computed) < self.replay_s(recompute) \
            else "replay"
