"""The one cost model: memory and time of a pipeline stage, and of the messages around it.

Every strategy (:mod:`llamadist.planning.strategies`) and the auto planner
(:mod:`llamadist.planning.auto`) call these functions, so one stage costs the same
wherever it is planned.

Decode step of ``batch`` sequences through layers [s, e) on one device of a tensor-parallel
group of ``tp`` devices. Decode is usually bandwidth-bound: every weight and every cached
token is read once per step, so

    time       = max(FLOPs / tp / device FLOP/s, bytes read / device bandwidth)
    bytes read = layer weights / tp + this device's share of the batch's KV cache
               + the head's (V, D) slice (last stage)
               + B rows of the embedding (first stage: a lookup gathers one row per
                 token; it never reads the whole (V, D) table)

Prefill of a prompt of T tokens: T x the matmul FLOPs plus causal attention over
T (T + 1) / 2 token pairs; the weights are read once and the KV cache written once.

Messages follow the alpha-beta (Hockney) model: ``latency_s`` per message plus
bytes / bandwidth. A ring all-reduce of n bytes over p ranks is 2 (p - 1) steps each
moving n / p bytes (Thakur, Rabenseifner, Gropp, "Optimization of collective
communication operations in MPICH", 2005):

    all-reduce  2 (p - 1) alpha + 2 (p - 1) / p * n / beta
    all-gather  (p - 1) alpha + (p - 1) / p * n / beta        (n = the gathered size)
    send/recv   alpha + n / beta

Every ring step waits for its slowest hop, so a group spanning nodes pays the inter-node
link on every step. NCCL's tree and low-latency protocols do better on tiny messages, so
for decode's small hidden states this over- rather than under-states the latency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from llamadist.config import ModelConfig
from llamadist.planning.devices import DeviceSpec
from llamadist.planning.experts import ExpertPlacement
from llamadist.planning.profile import ModelProfile, expected_experts, quantized_profile
from llamadist.planning.tp_shapes import tp_kv_heads
from llamadist.planning.units import PlanningError


# ---- links ---------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """A link between devices: sustained one-way bandwidth (bytes/s) and the fixed cost
    of one message (seconds): the beta and alpha of the alpha-beta model."""

    name: str
    bandwidth: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or self.latency_s < 0:
            raise PlanningError(f"link {self.name}: bandwidth must be positive and latency "
                                f"not negative, got {self.bandwidth} B/s, {self.latency_s} s")

    def send_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth

    def all_reduce_s(self, nbytes: float, ranks: int) -> float:
        if ranks <= 1:
            return 0.0
        steps = 2 * (ranks - 1)
        return steps * self.latency_s + steps / ranks * nbytes / self.bandwidth

    def all_to_all_s(self, nbytes: float, ranks: int) -> float:
        """``nbytes`` leave each rank, spread evenly over the ranks (its own share stays):
        pairwise exchange, (p - 1) steps of n / p bytes."""
        if ranks <= 1:
            return 0.0
        steps = ranks - 1
        return steps * self.latency_s + steps / ranks * nbytes / self.bandwidth

    def reduce_scatter_s(self, nbytes: float, ranks: int) -> float:
        """``nbytes`` is the full (reduced) size; each rank ends with 1 / ranks of it."""
        return self.all_gather_s(nbytes, ranks)

    def all_gather_s(self, nbytes: float, ranks: int) -> float:
        """``nbytes`` is the gathered (full) size; each rank contributes 1 / ranks."""
        if ranks <= 1:
            return 0.0
        steps = ranks - 1
        return steps * self.latency_s + steps / ranks * nbytes / self.bandwidth


# Order-of-magnitude defaults; the planner only needs them right to within a factor of
# two or so. Measure your own (nccl-tests all_reduce_perf / sendrecv_perf) and pass them.
LINKS: dict[str, Link] = {
    # H100 SXM NVLink 4: 18 links x 25 GB/s = 450 GB/s each way (NVIDIA H100 datasheet,
    # "900 GB/s" counts both ways); 300 GB/s is a sustained figure below that peak.
    # nccl-tests reports roughly 10-20 us for a tiny all-reduce over 8 NVLink GPUs, about
    # 1 us for each of the ring's 14 steps.
    "nvlink": Link("nvlink", 300e9, 1e-6),
    # PCIe 4.0 x16: 16 GT/s x 16 lanes with 128b/130b coding = 31.5 GB/s each way raw;
    # DMA copies reach about 25 GB/s. A GPU-to-GPU message through the root complex (or
    # bounced through host memory) costs a few microseconds.
    "pcie": Link("pcie", 25e9, 5e-6),
    # HDR InfiniBand: 200 Gb/s = 25 GB/s per port (NDR 400 Gb/s doubles it). RDMA verbs
    # take 1-2 us one way; NCCL's network proxy adds a few more per message.
    "infiniband": Link("infiniband", 25e9, 5e-6),
    # 10 Gb Ethernet: 1.25 GB/s. A TCP message through the kernel stack (NCCL's socket
    # transport, gloo) costs tens of microseconds.
    "ethernet": Link("ethernet", 1.25e9, 50e-6),
}


def make_link(preset: str | Link, bandwidth: float | None = None,
              latency_s: float | None = None) -> Link:
    """A preset by name (or a Link), with the bandwidth and/or latency overridden."""
    if isinstance(preset, str):
        if preset not in LINKS:
            raise PlanningError(f"unknown link {preset!r}; choose one of {', '.join(LINKS)}")
        preset = LINKS[preset]
    return Link(preset.name,
                preset.bandwidth if bandwidth is None else bandwidth,
                preset.latency_s if latency_s is None else latency_s)


# ---- compute and memory of a stage ----------------------------------------
def _prefix(values: list[int]) -> tuple[int, ...]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return tuple(out)


@dataclass(frozen=True)
class CostModel:
    """Memory and time of a stage holding layers [s, e), in O(1) from prefix sums.

    ``batch`` sequences (the default for every method) with KV caches of ``context``
    tokens; decode attends to all ``context`` cached tokens (the worst step). With ``tp``
    > 1 each stage is a tensor-parallel group and ``memory``/``time`` are one device's:
    weights / tp (plus ``extra_layer_bytes`` per layer that TP copies), ``kv_share`` of
    each layer's KV cache.

    Mixture of experts: a layer's experts are split by expert parallelism, one device
    holding ``1 / ep`` of them (llamadist.parallel.expert); tensor parallelism spreads
    them over its ranks the same way (EP = TP) when there are at least ``tp`` experts,
    else keeps them whole on each rank (llamadist.parallel.tensor). Memory counts the rank
    that holds the most: ceil(E / ep) experts per layer with the even shares, or what
    ``placement`` (planning.experts.ExpertPlacement: uneven shares, hot-expert replicas)
    gives its busiest rank over the stage's layers. A decode step reads only the experts
    its tokens were routed to (profile.expected_experts), of those that rank holds."""

    profile: ModelProfile
    batch: int
    context: int
    weights: tuple[int, ...]     # prefix sums over decoder layers: weight bytes
    kv: tuple[int, ...]          # KV bytes per token of one sequence
    matmul: tuple[int, ...]      # matmul FLOPs per token
    attn: tuple[int, ...]        # attention FLOPs per query token per cached token
    tp: int = 1
    kv_share: float = 1.0
    extra_layer_bytes: float = 0
    experts: tuple[int, ...] = ()  # prefix sums over decoder layers: expert bytes (MoE)
    ep: int = 1                    # expert-parallel ranks sharing each layer's experts
    placement: ExpertPlacement | None = None   # each EP rank's experts (None: even shares)
    held: tuple[tuple[int, ...], ...] = ()     # per EP rank: prefix sums of experts held
    # per stage i: the cost model of its weight format (--quantize), from with_formats
    stage_models: tuple["CostModel | None", ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def build(cls, profile: ModelProfile, batch: int, context: int, tp: int = 1,
              config: ModelConfig | None = None, ep: int = 1, cp: int = 1,
              placement: ExpertPlacement | None = None) -> "CostModel":
        """``cp`` > 1: a stage's KV cache is split over that many context-parallel ranks
        (one device holds 1 / cp of every sequence's). ``placement``: each of the ``ep``
        ranks' experts (uneven shares, hot replicas); None: expert_shares'."""
        rows = profile.layers
        held: tuple[tuple[int, ...], ...] = ()
        if placement is not None:
            if placement.ep != ep:
                raise PlanningError(f"the expert placement spans {placement.ep} ranks, "
                                    f"ep={ep}")
            moe = [i for i, r in enumerate(rows) if r.num_experts]
            if moe and placement.num_experts != rows[moe[0]].num_experts:
                raise PlanningError(f"the expert placement is for {placement.num_experts} "
                                    f"experts, the model has {rows[moe[0]].num_experts}")
            held = tuple(_prefix([len(placement.held(r, i)) if rows[i].num_experts else 0
                                  for i in range(len(rows))]) for r in range(ep))
        return cls(profile, batch, context, _prefix([r.weight_bytes for r in rows]),
                   _prefix([r.kv_bytes_per_token for r in rows]),
                   _prefix([r.matmul_flops_per_token for r in rows]),
                   _prefix([r.attn_flops_per_ctx_token for r in rows]), tp,
                   tp_kv_share(config, tp) / max(1, cp),
                   tp_extra_layer_bytes(config, tp, profile.bytes_per_param),
                   _prefix([r.expert_bytes for r in rows]), ep, placement, held)

    def with_formats(self, formats: Sequence[str | None], kinds: Sequence[str]) -> "CostModel":
        """This model with stage i's decoder linears in ``formats[i]`` (None: as the run
        holds them: the profile's dtype, or a quantized checkpoint's own formats under
        --weights native, whose bytes depend on the kind) on a ``kinds[i]`` device
        ("cuda", "cpu"): what ``at(i)`` returns. Each is this model over
        profile.quantized_profile(profile, format, [kind]), embedding and head included."""
        made: dict[tuple[str | None, str], CostModel] = {}
        for fmt, kind in zip(formats, kinds):
            if (fmt is not None or self.profile.has_stored) and (fmt, kind) not in made:
                held = quantized_profile(self.profile, fmt, [kind])
                made[(fmt, kind)] = replace(
                    self, profile=held, weights=_prefix([r.weight_bytes for r in held.layers]),
                    experts=_prefix([r.expert_bytes for r in held.layers]) if self.experts
                    else (), stage_models=())
        return replace(self, stage_models=tuple(made.get((f, k)) for f, k in zip(formats, kinds)))

    def at(self, i: int) -> "CostModel":
        """The cost model of stage i (its weight format's bytes), this one by default."""
        m = self.stage_models[i] if i < len(self.stage_models) else None
        return self if m is None else m

    def _expert_bytes(self, s: int, e: int) -> int:
        return self.experts[e] - self.experts[s] if self.experts else 0

    def rank_experts(self, s: int, e: int, ep: int) -> list[int]:
        """Experts each of ``ep`` ranks holds over layers [s, e), summed over the layers
        (the placement's, when it spans ``ep`` ranks; else expert_shares')."""
        if self.held and ep == len(self.held):
            return [p[e] - p[s] for p in self.held]
        rows = self.profile.layers[s:e]
        moe = sum(1 for r in rows if r.num_experts)
        num = next((r.num_experts for r in rows if r.num_experts), 0)
        base, extra = divmod(num, ep)
        return [moe * (base + (1 if r < extra else 0)) for r in range(ep)]

    def _layer_weights(self, s: int, e: int, tp: int, extra_layer_bytes: float,
                       tokens: int | None = None) -> float:
        """Weights of layers [s, e) on one device: the dense part / tp (plus what TP
        copies), the experts / ep; ``tokens`` given: only the experts a step of that many
        tokens touches (what a decode step reads)."""
        experts = self._expert_bytes(s, e)
        dense = self.weights[e] - self.weights[s] - experts
        if not experts:
            return dense / tp + (e - s) * extra_layer_bytes
        row = next(r for r in self.profile.layers[s:e] if r.num_experts)  # all alike
        # TP ranks share the experts too when each gets one or more (parallel.tensor)
        ep = max(self.ep, tp if tp <= row.num_experts else 1)
        # the busiest rank's experts (uneven shares, hot replicas), not the average
        experts = max(self.rank_experts(s, e, ep)) * row.expert_bytes / row.num_experts
        if tokens is not None:
            experts *= expected_experts(row.num_experts, row.experts_per_token,
                                        tokens) / row.num_experts
        return dense / tp + (e - s) * extra_layer_bytes + experts

    # -- memory (bytes per device) --
    def weight_bytes(self, s: int, e: int, first: bool, last: bool, tp: int = 1,
                     extra_layer_bytes: float = 0) -> float:
        """Weights on one device of the TP group; ``extra_layer_bytes`` per layer is what
        tensor parallelism replicates (k/v_proj when tp > num_kv_heads). An int for tp 1."""
        p = self.profile
        ends = (p.embed.weight_bytes if first else 0) + (p.head.weight_bytes if last else 0)
        if first and last:  # one stage holds both ends: a tied matrix is stored once
            ends -= p.tied_bytes
        if tp == 1 and not extra_layer_bytes and self.ep == 1:
            return self.weights[e] - self.weights[s] + ends  # an int
        return self._layer_weights(s, e, tp, extra_layer_bytes) + ends / tp

    def kv_bytes(self, s: int, e: int, seqs: int | None = None, share: float = 1.0) -> int:
        """KV cache of ``seqs`` sequences x ``context`` tokens; ``share`` is the part of
        each layer's KV heads one device holds (1 / tp, or more when heads are copied)."""
        seqs = self.batch if seqs is None else seqs
        return int((self.kv[e] - self.kv[s]) * self.context * seqs * share)

    def memory(self, s: int, e: int, first: bool, last: bool) -> int:
        """Bytes on one device of the stage (one shard of its TP group)."""
        return (self.weight_bytes(s, e, first, last, self.tp, self.extra_layer_bytes)
                + self.kv_bytes(s, e, share=self.kv_share))

    def rank_memory(self, s: int, e: int, first: bool, last: bool) -> list[float]:
        """Bytes on each EP rank of the stage (``memory`` is the busiest one's): the part
        every rank holds alike (dense weights / tp, embedding / head, KV) plus that rank's
        experts, so devices of different memory are checked rank by rank."""
        total = self.memory(s, e, first, last)
        row = next((r for r in self.profile.layers[s:e] if r.num_experts), None)
        if row is None:
            return [total]
        ep = max(self.ep, self.tp if self.tp <= row.num_experts else 1)
        counts = self.rank_experts(s, e, ep)
        per = row.expert_bytes / row.num_experts
        return [total - (max(counts) - c) * per for c in counts]

    # -- time --
    def decode_flops(self, s: int, e: int, last: bool, batch: int | None = None) -> int:
        b = self.batch if batch is None else batch
        per_token = self.matmul[e] - self.matmul[s] + (self.attn[e] - self.attn[s]) * self.context
        return b * (per_token + (self.profile.head.matmul_flops_per_token if last else 0))

    def decode_time(self, flops: float, bandwidth: float, s: int, e: int, first: bool,
                    last: bool, batch: int | None = None, tp: int = 1, kv_share: float = 1.0,
                    extra_layer_bytes: float = 0) -> float:
        """Seconds for one decode step of ``batch`` tokens through [s, e) on a device of
        ``flops`` FLOP/s and ``bandwidth`` bytes/s (one device of a TP group of ``tp``)."""
        p, b = self.profile, self.batch if batch is None else batch
        read = self._layer_weights(s, e, tp, extra_layer_bytes, tokens=b)
        read += self.kv_bytes(s, e, b, kv_share)
        read += p.head.weight_bytes / tp if last else 0
        read += b * p.hidden_size * p.bytes_per_param if first else 0   # (B, D) gathered rows
        return max(self.decode_flops(s, e, last, b) / tp / flops, read / bandwidth)

    def prefill_flops(self, s: int, e: int, last: bool, prompt_len: int,
                      batch: int | None = None) -> int:
        """FLOPs for ``batch`` prompts of ``prompt_len`` tokens (causal attention; the head
        runs on the last token only, as generation needs no other logits)."""
        b, t = self.batch if batch is None else batch, prompt_len
        per_seq = ((self.matmul[e] - self.matmul[s]) * t
                   + (self.attn[e] - self.attn[s]) * t * (t + 1) // 2)
        return b * (per_seq + (self.profile.head.matmul_flops_per_token if last else 0))

    def prefill_time(self, flops: float, bandwidth: float, s: int, e: int, first: bool,
                     last: bool, prompt_len: int, batch: int | None = None, tp: int = 1,
                     kv_share: float = 1.0, extra_layer_bytes: float = 0) -> float:
        """Seconds to prefill ``batch`` prompts of ``prompt_len`` tokens through [s, e):
        weights read once, the prompts' KV written once, usually compute-bound."""
        p, b = self.profile, self.batch if batch is None else batch
        moved = self._layer_weights(s, e, tp, extra_layer_bytes, tokens=b * prompt_len)
        moved += (self.kv[e] - self.kv[s]) * prompt_len * b * kv_share
        moved += p.head.weight_bytes / tp if last else 0
        moved += b * prompt_len * p.hidden_size * p.bytes_per_param if first else 0
        return max(self.prefill_flops(s, e, last, prompt_len, b) / tp / flops,
                   moved / bandwidth)

    def time(self, dev: DeviceSpec, s: int, e: int, first: bool, last: bool) -> float:
        """Decode time of the whole batch on one device (a DeviceSpec) of the stage's TP
        group (its collectives are the auto planner's business: it knows the links)."""
        return self.decode_time(dev.flops, dev.mem_bandwidth, s, e, first, last, tp=self.tp,
                                kv_share=self.kv_share,
                                extra_layer_bytes=self.extra_layer_bytes)


def tp_kv_share(config: ModelConfig | None, tp: int) -> float:
    """Share of a layer's KV one device holds (KV heads replicated when tp > kv)."""
    if config is None:
        return 1.0 / tp
    return tp_kv_heads(config, tp) / config.num_kv_heads


def tp_extra_layer_bytes(config: ModelConfig | None, tp: int, bytes_per_param: float) -> int:
    """Bytes per layer above weights / tp when replicated KV heads copy k/v_proj."""
    if config is None or config.num_kv_heads % tp == 0:
        return 0
    local = tp_kv_heads(config, tp) - config.num_kv_heads / tp
    return int(2 * config.hidden_size * config.head_dim * local * bytes_per_param)


# ---- communication of a stage ------------------------------------------------
def tp_comm_time(profile: ModelProfile, layers: int, first: bool, last: bool, batch: int,
                 tp: int, link: Link) -> float:
    """Tensor-parallel collectives of one decode step of ``batch`` tokens through a stage
    of ``layers`` layers: two all-reduces of the (B, D) hidden state per layer (after
    o_proj and down_proj), one after the vocab-parallel embedding (first stage), and an
    all-gather of the (B, V) logits (last stage)."""
    if tp <= 1:
        return 0.0
    hidden = batch * profile.hidden_size * profile.bytes_per_param
    t = (2 * layers + first) * link.all_reduce_s(hidden, tp)
    if last:
        t += link.all_gather_s(batch * profile.vocab_size * profile.bytes_per_param, tp)
    return t


# Work of the all-to-all dispatch per MoE layer beyond its messages (the row plan, packing,
# unpacking and the scatter-add back), by device kind. GPU: a dozen small kernels and one
# host read of the counts, ~25 us: an estimate, not measured yet. CPU (gloo):
# benchmarks/moe_dispatch.py saw none above the gather's own host work (RESULTS.md,
# "Expert-parallel dispatch on the CPU"): all_to_all was as fast or faster from 1 token.
A2A_OVERHEAD_S = {"gpu": 25e-6, "cpu": 0.0}
ROUTING_BYTES = 12  # per (row, top-k slot) the all-to-all carries: fp32 weight + int64 id


def a2a_rows_per_token(num_experts: int, k: int, ep: int) -> float:
    """Expected ranks the all-to-all sends one token to: the distinct ranks among its k
    distinct experts, E / ep experts on each rank, routing uniform (two experts of a token
    on one rank share the row)."""
    if ep <= 1:
        return 1.0
    per = num_experts / ep
    miss = 1.0  # P(none of the token's k experts on a given rank)
    for i in range(k):
        miss *= max(0.0, (num_experts - per - i) / (num_experts - i))
    return ep * (1.0 - miss)


def ep_comm_time(profile: ModelProfile, layers: int, batch: int, ep: int, link: Link,
                 dispatch: str = "replicated", overhead_s: float = 0.0) -> float:
    """Expert-parallel collectives of one decode step of ``batch`` tokens per rank through
    ``layers`` MoE layers (llamadist.parallel.expert's dispatches):

    replicated  every rank holds the same B tokens: one all-reduce of (B, D) per layer
    gather      each rank its own B tokens: all-gather (ep B, D), reduce-scatter back
    all_to_all  each token to the ranks of its k experts (a2a_rows_per_token of them,
                with its routing) and the partial sums back: two all-to-alls per layer,
                plus ``overhead_s`` per layer (A2A_OVERHEAD_S)
    auto        the cheaper of the two above at this batch (what the runtime picks)
    """
    if ep <= 1 or not profile.is_moe:
        return 0.0
    row = next(r for r in profile.layers if r.num_experts)
    d = profile.hidden_size * profile.bytes_per_param
    hidden = batch * d
    if dispatch == "replicated":
        per_layer = link.all_reduce_s(hidden, ep)
    elif dispatch == "gather":
        per_layer = link.all_gather_s(ep * hidden, ep) + link.reduce_scatter_s(ep * hidden, ep)
    elif dispatch == "all_to_all":
        rows = batch * a2a_rows_per_token(row.num_experts, row.experts_per_token, ep)
        out = rows * (d + ROUTING_BYTES * row.experts_per_token)
        per_layer = link.all_to_all_s(out, ep) + link.all_to_all_s(rows * d, ep) + overhead_s
    elif dispatch == "auto":
        return min(ep_comm_time(profile, layers, batch, ep, link, "gather"),
                   ep_comm_time(profile, layers, batch, ep, link, "all_to_all", overhead_s))
    else:
        raise PlanningError(f"unknown dispatch {dispatch!r}; choose replicated, gather, "
                            f"all_to_all or auto")
    return layers * per_layer


def ep_dispatch_crossover(profile: ModelProfile, ep: int, link: Link,
                          overhead_s: float = 0.0, limit: int = 1 << 20) -> int:
    """The most tokens per rank for which the gather dispatch is predicted no slower than
    the all-to-all (0: the all-to-all from the first token; ``limit``: the gather up to
    there). Both cost the same latency, so the all-to-all's ``overhead_s`` against the
    gather's extra bytes decides: the difference is linear in the batch, one crossing."""
    if ep <= 1 or not profile.is_moe:
        return limit

    def gather_wins(b: int) -> bool:
        return (ep_comm_time(profile, 1, b, ep, link, "gather")
                <= ep_comm_time(profile, 1, b, ep, link, "all_to_all", overhead_s))

    if not gather_wins(1):
        return 0
    lo, hi = 1, limit  # gather_wins(lo); find the last b <= limit where it holds
    if gather_wins(hi):
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if gather_wins(mid) else (lo, mid)
    return lo


# The link "auto" assumes between the ranks of a token-local dispatch, by device kind: GPUs of
# one host over NVLink; CPU processes over gloo, whose messages cross the TCP stack.
DISPATCH_LINKS = {"gpu": "nvlink", "cpu": "ethernet"}


def ep_auto_crossover(profile: ModelProfile, ranks: int, device_kind: str) -> int:
    """The runtime's "auto" rule (parallel.expert): a step of at most this many tokens
    over the ``ranks`` of the dispatch gathers, a larger one goes all-to-all. The cost
    model's per-rank crossover on the kind's link and overhead, times the ranks."""
    if device_kind not in DISPATCH_LINKS:
        raise PlanningError(f"device kind {device_kind!r}: one of {', '.join(DISPATCH_LINKS)}")
    link = LINKS[DISPATCH_LINKS[device_kind]]
    return ranks * ep_dispatch_crossover(profile, ranks, link, A2A_OVERHEAD_S[device_kind],
                                         limit=1 << 16)


def cp_prefill_comm_time(profile: ModelProfile, layers: int, prompt_len: int, cp: int,
                         link: Link, kv_share: float = 1.0) -> float:
    """Ring-attention traffic of one prompt of ``prompt_len`` tokens split over ``cp``
    context-parallel ranks (llamadist.parallel.context), through ``layers`` layers: per
    layer each rank passes a K/V block of its ceil(L / cp) tokens to the next rank cp - 1
    times (all ranks at once, so one hop's time per step). The sends overlap the block's
    attention; this is the time exposed only when it exceeds that compute (roughly
    prefill FLOPs / cp / cp per step). ``kv_share``: the part of the KV heads a rank
    holds under tensor parallelism."""
    if cp <= 1:
        return 0.0
    per_layer_kv = profile.kv_bytes_per_token / max(1, profile.num_layers)
    block = -(-prompt_len // cp) * per_layer_kv * kv_share
    return layers * (cp - 1) * link.send_s(block)


def cp_decode_comm_time(profile: ModelProfile, layers: int, batch: int, cp: int, link: Link,
                        head_dim: int = 128) -> float:
    """Sharded-KV decode merge of ``batch`` new tokens through ``layers`` layers: every
    CP rank runs the decodes (llamadist.runtime.cp_step), attends its stored stripes, and
    one all-gather per layer of the packed fp32 (B, H, D + 1) partials (output and
    log-sum-exp, merge_across) combines them. The profile knows H * D (from its
    attention FLOPs), not H: ``head_dim`` splits it."""
    if cp <= 1:
        return 0.0
    q_size = profile.layers[0].attn_flops_per_ctx_token // 4 if profile.layers else 0
    heads = max(1, q_size // head_dim)
    per_layer = link.all_gather_s(cp * batch * (q_size + heads) * 4, cp)
    return layers * per_layer


def send_time(profile: ModelProfile, batch: int, link: Link) -> float:
    """The (B, D) hidden state from one pipeline stage to the next: one message."""
    return link.send_s(batch * profile.hidden_size * profile.bytes_per_param)


def headroom_bytes(dev: DeviceSpec, headroom: float | int) -> int:
    """Bytes of ``dev``'s budget kept free for activations: a float in [0, 1) is a fraction
    of the budget; anything else is bytes."""
    if headroom < 0:
        raise PlanningError(f"headroom must not be negative, got {headroom}")
    if isinstance(headroom, float) and headroom < 1:
        return int(dev.memory_bytes * headroom)
    return int(headroom)
