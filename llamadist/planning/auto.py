"""The automatic planner: enumerate (tp, pp, dp, layer split) layouts over a cluster,
predict each one's memory per device and time per token, keep those that fit, rank them.

Every number comes from the one cost model, :mod:`llamadist.planning.cost`:

    stage compute   CostModel.decode_time: max(FLOPs / tp / device FLOP/s,
                    bytes read / device bandwidth), as the strategies charge it
    tensor parallel tp_comm_time: 2 ring all-reduces of the (u, D) hidden state per layer,
                    one for the vocab-parallel embedding, an all-gather of the (u, V)
                    logits; each 2 (tp - 1) messages of latency plus bytes / bandwidth
    pipeline        send_time: one message of u * D * bytes per stage boundary
    context par.    only when no layout without it fits (one sequence's KV cache at
                    max_seq_len too large for the devices): each stage is cp x tp
                    devices, each holding 1 / cp of every sequence's KV cache; a decode
                    step pays cp_decode_comm_time (one all-gather of partials per layer), and
                    ``ring_prefill_s`` reports a max_seq_len prompt's ring traffic
    latency         one micro-batch goes through the stages in turn: the sum (the
                    pipeline bubble: each stage idles while the others work)
    throughput      m = min(pp, batch) micro-batches in flight: a step takes
                    max(sum of stage times, m * slowest stage)

A link is the intra-node one when every device it joins sits on one node, the
inter-node one otherwise (a ring waits for its slowest hop); so TP groups land inside a
node and pipeline cuts across nodes exactly when bandwidth and latency say so. The layer
split of each replica is the min-max dynamic programme of
:mod:`llamadist.planning.strategies` (over contiguous splits, with stages that do not fit
their memory forbidden), so heterogeneous devices get more or fewer layers. Layouts the
model cannot take (tp that does not divide the heads, more stages than layers) are left
out by :func:`llamadist.planning.checks.grid_problems`, the check the run commands use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from llamadist.config import ModelConfig
from llamadist.planning.checks import grid_problems
from llamadist.planning.cost import (CostModel, Link, cp_decode_comm_time, cp_prefill_comm_time,
                                     headroom_bytes, make_link, send_time, tp_comm_time,
                                     tp_extra_layer_bytes, tp_kv_share)
from llamadist.planning.devices import (REFERENCE_BANDWIDTH, REFERENCE_FLOPS, DeviceSpec,
                                        parse_memory)
from llamadist.planning.plan import Plan, Stage
from llamadist.planning.profile import ModelProfile
from llamadist.planning.strategies import partition_dp
from llamadist.planning.units import PlanningError, format_bytes, format_seconds

OBJECTIVES = ("latency", "throughput")
INTRA_LINK, INTER_LINK = "nvlink", "infiniband"    # presets of planning.cost.LINKS


@dataclass(frozen=True)
class Cluster:
    """Devices in rank order and the node each sits on, with the two kinds of link."""

    devices: tuple[DeviceSpec, ...]
    node_of: tuple[int, ...]
    intra: Link = make_link(INTRA_LINK)
    inter: Link = make_link(INTER_LINK)

    def link(self, idx: Sequence[int]) -> Link:
        """The link joining devices ``idx``: a ring or a send over several nodes waits on
        the inter-node link."""
        return self.intra if len({self.node_of[i] for i in idx}) <= 1 else self.inter


def make_cluster(devices: Sequence[DeviceSpec] | None = None, *, gpus: int | None = None,
                 nodes: int = 1, gpu_memory: int | str = "80GiB",
                 intra_link: str | Link = INTRA_LINK, inter_link: str | Link = INTER_LINK,
                 intra_bw: float | None = None, inter_bw: float | None = None,
                 intra_latency_s: float | None = None,
                 inter_latency_s: float | None = None) -> Cluster:
    """``devices`` (in rank order) or ``gpus`` reference GPUs in total, spread evenly over
    ``nodes``; device j sits on node j // (devices per node). Links are presets of
    :data:`llamadist.planning.cost.LINKS` (or Links); a bandwidth (bytes/s) or latency
    (seconds per message) given here overrides the preset's."""
    count = len(devices) if devices is not None else (gpus or 0)
    if count < 1:
        raise PlanningError("give devices or a positive number of GPUs (--gpus N)")
    if nodes < 1 or count % nodes:
        raise PlanningError(f"{count} devices cannot be spread evenly over {nodes} nodes; "
                            f"give a device count that divides by the node count")
    per = count // nodes
    if devices is None:
        mem = parse_memory(gpu_memory)
        devices = [DeviceSpec(f"node{j // per}/cuda:{j % per}" if nodes > 1 else f"cuda:{j}",
                              mem, 1.0, "cuda", REFERENCE_FLOPS, REFERENCE_BANDWIDTH)
                   for j in range(gpus)]
    devices = tuple(devices)
    return Cluster(devices, tuple(j // per for j in range(len(devices))),
                   make_link(intra_link, intra_bw, intra_latency_s),
                   make_link(inter_link, inter_bw, inter_latency_s))


@dataclass(frozen=True)
class StagePlacement:
    """One pipeline stage of one replica: layers [start, end) on a TP group of devices.
    Bytes are per device; times are for one micro-batch."""

    start: int
    end: int
    devices: tuple[str, ...]
    weight_bytes: int
    kv_bytes: int
    usable_bytes: int
    compute_s: float
    tp_comm_s: float
    send_s: float                 # hidden state to the next stage (0 on the last)
    cp_comm_s: float = 0.0        # context-parallel merges of a decode step
    ring_prefill_s: float = 0.0   # ring traffic of one max_seq_len prompt (CP only)

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def time_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.send_s + self.cp_comm_s


@dataclass(frozen=True)
class AutoCandidate:
    """A layout: ``dp`` replicas, each ``pp`` stages of ``tp`` devices. ``step_s`` is the
    time for every sequence of the batch to get one token (the per-sequence latency);
    ``time_per_token_s`` is what the objective ranks by."""

    tp: int
    pp: int
    dp: int
    objective: str
    batch_size: int
    max_seq_len: int
    micro_batches: int
    replicas: tuple[tuple[StagePlacement, ...], ...]
    step_s: float
    tokens_per_s: float
    why: str = ""
    cp: int = 1

    @property
    def label(self) -> str:
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return f"tp={self.tp}{cp} pp={self.pp} dp={self.dp}"

    @property
    def num_devices(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def stages(self) -> tuple[StagePlacement, ...]:
        return self.replicas[0]

    @property
    def splits(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.end) for s in self.stages)

    @property
    def time_per_token_s(self) -> float:
        return self.step_s if self.objective == "latency" else 1.0 / self.tokens_per_s

    @property
    def bottleneck_s(self) -> float:
        """Slowest stage of any replica (what the split's min-max DP minimises)."""
        return max(s.time_s for r in self.replicas for s in r)

    @property
    def memory_per_device(self) -> dict[str, int]:
        return {d: s.memory_bytes for r in self.replicas for s in r for d in s.devices}

    @property
    def max_memory_bytes(self) -> int:
        return max(self.memory_per_device.values())

    def breakdown(self) -> dict[str, float]:
        """Seconds of one micro-batch through the slowest replica, by part: compute and
        memory reads, tensor-parallel all-reduces, pipeline sends (they add up to the
        per-token latency; the bubble is in :attr:`bubble`)."""
        r = max(self.replicas, key=lambda st: sum(s.time_s for s in st))
        parts = {"compute": sum(s.compute_s for s in r), "tp_comm": sum(s.tp_comm_s for s in r),
                 "pp_comm": sum(s.send_s for s in r)}
        if self.cp > 1:
            parts["cp_comm"] = sum(s.cp_comm_s for s in r)
        return parts

    @property
    def bubble(self) -> float:
        """Fraction of device time idle in a step (pipeline bubble)."""
        busy = sum(s.time_s for s in self.stages) * self.micro_batches
        return max(0.0, 1.0 - busy / (self.pp * self.step_s)) if self.step_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(label=self.label, time_per_token_s=self.time_per_token_s,
                 memory_per_device=self.memory_per_device, bubble=self.bubble,
                 breakdown_s=self.breakdown())
        return d

    def to_plan(self, model: str, num_layers: int, dtype: str,
                weight_format: str | None = None) -> Plan:
        """Replica 0's layer split as a Plan: one stage per TP group, named by the group's
        first device, each with ``weight_format`` (planned with that format's bytes). A Plan
        holds only the pipeline split; run it with this candidate's ``--tp`` and ``--dp``
        (see :attr:`label`)."""
        k = len(self.stages)
        stages = tuple(Stage(i, s.start, s.end, s.devices[0], i == 0, i == k - 1,
                             s.weight_bytes, s.kv_bytes, s.time_s,
                             weight_format=weight_format)
                       for i, s in enumerate(self.stages))
        return Plan(model, num_layers, stages, "auto", dtype, self.batch_size,
                    self.max_seq_len).validate()


# ---- cost of one stage ------------------------------------------------------
@dataclass(frozen=True)
class CostContext:
    """What every stage estimate needs: the profile's prefix sums (via a batch-1
    CostModel), the cluster, the config (for TP head checks) and the context length."""

    cm: CostModel               # batch 1: prefix sums of weights, KV/token, FLOPs/token
    cluster: Cluster
    config: ModelConfig | None
    context: int
    headroom: float | int

    def usable(self, group: Sequence[int]) -> int:
        devs = [self.cluster.devices[j] for j in group]
        return min(d.memory_bytes - headroom_bytes(d, self.headroom) for d in devs)


class ReplicaCost:
    """The stages of one replica: ``pp`` TP groups of ``tp`` consecutive devices of
    ``block``; a micro-batch of ``u`` sequences; KV caches for ``seqs`` sequences.
    Per-group constants are computed once, so the split's DP costs O(1) per call."""

    def __init__(self, c: CostContext, tp: int, block: Sequence[int], u: int, seqs: int,
                 cp: int = 1):
        self.c, self.tp, self.u, self.seqs, self.cp = c, tp, u, seqs, cp
        n = tp * cp  # a stage: cp x tp devices
        self.groups = [list(block[i:i + n]) for i in range(0, len(block), n)]
        cl = c.cluster
        self.kvf = tp_kv_share(c.config, tp) / cp
        self.cp_link = [cl.link(g) for g in self.groups]
        self.extra = tp_extra_layer_bytes(c.config, tp, c.cm.profile.bytes_per_param)
        self.rates = [(min(cl.devices[j].flops for j in g),
                       min(cl.devices[j].mem_bandwidth for j in g)) for g in self.groups]
        self.usable = [c.usable(g) for g in self.groups]
        self.tp_link = [cl.link(g) for g in self.groups]
        self.send_link = [cl.link([g[0], h[0]]) for g, h in zip(self.groups, self.groups[1:])]

    @property
    def k(self) -> int:
        return len(self.groups)

    def numbers(self, i: int, s: int, e: int) -> tuple[float, int, float, float, float]:
        """(weight bytes, KV bytes, compute s, TP comm s, send s) of stage i on [s, e),
        per device of its TP group, from the one cost model."""
        cm, p, tp, u = self.c.cm, self.c.cm.profile, self.tp, self.u
        first, last = i == 0, i == self.k - 1
        weights = cm.weight_bytes(s, e, first, last, tp, self.extra)
        compute = cm.decode_time(*self.rates[i], s, e, first, last, batch=u, tp=tp,
                                 kv_share=self.kvf, extra_layer_bytes=self.extra)
        tp_comm = tp_comm_time(p, e - s, first, last, u, tp, self.tp_link[i])
        tp_comm += self.cp_comm(i, s, e)
        send = 0.0 if last else send_time(p, u, self.send_link[i])
        return weights, cm.kv_bytes(s, e, self.seqs, self.kvf), compute, tp_comm, send

    def cp_comm(self, i: int, s: int, e: int) -> float:
        cfg = self.c.config
        return cp_decode_comm_time(self.c.cm.profile, e - s, self.u, self.cp, self.cp_link[i],
                                   cfg.head_dim if cfg else 128)

    def placement(self, i: int, s: int, e: int) -> StagePlacement:
        w, kv, compute, tp_comm, send = self.numbers(i, s, e)
        cp = self.cp_comm(i, s, e)
        ring = cp_prefill_comm_time(self.c.cm.profile, e - s, self.c.context, self.cp,
                                    self.cp_link[i], self.kvf * self.cp)
        names = tuple(self.c.cluster.devices[j].name for j in self.groups[i])
        return StagePlacement(s, e, names, int(w), int(kv), self.usable[i], compute,
                              tp_comm - cp, send, cp, ring)

    def stages(self, ends: Sequence[int]) -> tuple[StagePlacement, ...]:
        return tuple(self.placement(i, s, e) for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends)))

    def time_cost(self, i: int, s: int, e: int) -> float:
        """Stage time, or inf when it does not fit its devices' memory."""
        w, kv, compute, tp_comm, send = self.numbers(i, s, e)
        return compute + tp_comm + send if w + kv <= self.usable[i] else math.inf

    def memory_cost(self, i: int, s: int, e: int) -> float:
        w, kv, *_ = self.numbers(i, s, e)
        return (w + kv) / self.usable[i] if self.usable[i] > 0 else math.inf

    def split(self) -> list[int]:
        """Stage ends minimising the slowest stage among splits that fit ([] if none fits),
        then the most even split with that bottleneck (the strategies' DP, reused)."""
        n = self.c.cm.profile.num_layers
        worst, ends = partition_dp(n, self.k, self.time_cost)
        if worst == math.inf:
            return []
        _, even = partition_dp(n, self.k, self.time_cost, bound=worst)
        return even or ends

    def shortfall(self) -> tuple[int, StagePlacement]:
        """Bytes over budget of the worst device under the most memory-balanced split."""
        n = self.c.cm.profile.num_layers
        _, ends = partition_dp(n, self.k, self.memory_cost)
        stages = self.stages(ends) if ends else (self.placement(0, 0, n),)
        worst = max(stages, key=lambda st: st.memory_bytes - st.usable_bytes)
        return worst.memory_bytes - worst.usable_bytes, worst


# ---- enumeration ------------------------------------------------------------
def layouts(n_devices: int, num_layers: int, batch_size: int,
            config: ModelConfig | None) -> list[tuple[int, int, int]]:
    """Every (tp, pp, dp) with tp * pp * dp <= n_devices that the model allows, by the same
    check the run commands use (:func:`llamadist.planning.checks.grid_problems`)."""
    return [(tp, pp, dp)
            for tp in range(1, n_devices + 1)
            for pp in range(1, n_devices // tp + 1)
            for dp in range(1, min(batch_size, n_devices // (tp * pp)) + 1)
            if not grid_problems(num_layers, None, pp, tp, dp, config)]


def _candidate(c: CostContext, tp: int, pp: int, dp: int, objective: str,
               batch_size: int, cp: int = 1) -> AutoCandidate | None:
    replicas, periods, tokens = [], [], 0.0
    n = tp * cp * pp  # devices per replica
    for r in range(dp):
        seqs = batch_size // dp + (1 if r < batch_size % dp else 0)
        m = min(pp, seqs) if objective == "throughput" else 1
        u = -(-seqs // m)
        rc = ReplicaCost(c, tp, range(r * n, (r + 1) * n), u, seqs, cp)
        ends = rc.split()
        if not ends:
            return None
        stages = rc.stages(ends)
        period = max(sum(s.time_s for s in stages), m * max(s.time_s for s in stages))
        replicas.append(stages)
        periods.append(period)
        tokens += seqs / period
    m = min(pp, batch_size // dp) if objective == "throughput" else 1
    return AutoCandidate(tp, pp, dp, objective, batch_size, c.context, m, tuple(replicas),
                         max(periods), tokens, cp=cp)


def auto_plan(profile: ModelProfile, devices: Sequence[DeviceSpec] | None = None, *,
              gpus: int | None = None, nodes: int = 1, gpu_memory: int | str = "80GiB",
              intra_link: str | Link = INTRA_LINK, inter_link: str | Link = INTER_LINK,
              intra_bw: float | None = None, inter_bw: float | None = None,
              intra_latency_s: float | None = None, inter_latency_s: float | None = None,
              objective: str = "latency", batch_size: int = 1, max_seq_len: int | None = None,
              config: ModelConfig | None = None, headroom: float | int = 0.1,
              top: int = 5) -> list[AutoCandidate]:
    """The ``top`` layouts that fit, best first; the first carries ``why`` it wins.

    ``devices`` in rank order (or ``gpus`` reference GPUs of ``gpu_memory`` each), spread
    evenly over ``nodes``. Links: ``intra_link``/``inter_link`` name presets of
    :data:`llamadist.planning.cost.LINKS` (nvlink, pcie, infiniband, ethernet);
    ``*_bw`` (bytes/s) and ``*_latency_s`` (seconds per message) override them. ``config`` enables the head-count checks
    of tensor parallelism (without it every tp is assumed to divide). Raises PlanningError
    with the shortfall in bytes when no layout fits."""
    if objective not in OBJECTIVES:
        raise PlanningError(f"unknown objective {objective!r}; choose {' or '.join(OBJECTIVES)}")
    if batch_size < 1:
        raise PlanningError(f"batch_size must be positive, got {batch_size}")
    cluster = make_cluster(devices, gpus=gpus, nodes=nodes, gpu_memory=gpu_memory,
                           intra_link=intra_link, inter_link=inter_link,
                           intra_bw=intra_bw, inter_bw=inter_bw,
                           intra_latency_s=intra_latency_s, inter_latency_s=inter_latency_s)
    context = max_seq_len or profile.seq_len
    c = CostContext(CostModel.build(profile, 1, context), cluster, config, context, headroom)
    options = layouts(len(cluster.devices), profile.num_layers, batch_size, config)
    cands = [x for x in (_candidate(c, *o, objective, batch_size) for o in options) if x]
    n = len(cluster.devices)
    for cp in range(2, n + 1) if not cands else ():  # CP only when nothing else fits
        cands += [x for x in (_candidate(c, *o, objective, batch_size, cp)
                              for o in layouts(n // cp, profile.num_layers, batch_size, config))
                  if x]
    if not cands:
        raise _nothing_fits(c, options, batch_size)
    cands.sort(key=lambda x: (x.time_per_token_s, x.num_devices, x.max_memory_bytes))
    best = replace(cands[0], why=_why(cands, len(options) - len(cands), cluster))
    return [best, *cands[1:top]]


def _nothing_fits(c: CostContext, options: list[tuple[int, int, int]], batch: int) -> PlanningError:
    best = None
    for tp, pp, dp in options:
        seqs = -(-batch // dp)
        short, st = ReplicaCost(c, tp, range(tp * pp), 1, seqs).shortfall()
        if best is None or short < best[0]:
            best = (short, st, (tp, pp, dp))
    if best is None:
        return PlanningError("no tensor/pipeline layout is possible for this model on these "
                             f"{len(c.cluster.devices)} devices")
    short, st, (tp, pp, dp) = best
    p = c.cm.profile
    total = p.total_weight_bytes + p.kv_bytes_per_token * c.context * batch
    usable = sum(c.usable([j]) for j in range(len(c.cluster.devices)))
    return PlanningError(
        f"the model fits on no layout of these {len(c.cluster.devices)} devices: the closest, "
        f"tp={tp} pp={pp} dp={dp}, needs {short} bytes ({format_bytes(short)}) more on "
        f"{', '.join(st.devices)} (layers {st.start}..{st.end - 1}: {st.memory_bytes} bytes "
        f"per device, {st.usable_bytes} usable after headroom); the model needs {total} bytes "
        f"(weights {p.dtype} + KV cache for batch {batch} x {c.context} tokens) and the "
        f"devices offer {usable} bytes in all")


def _why(cands: list[AutoCandidate], rejected: int, cluster: Cluster) -> str:
    win = cands[0]
    fit = (f"; {rejected} layout{'s' if rejected > 1 else ''} did not fit in memory"
           if rejected else "")
    if win.cp > 1:
        fit += (f"; context parallelism because no layout without it fits one sequence's KV "
                f"cache of {win.max_seq_len} tokens (ring prefill traffic of such a prompt: "
                f"{format_seconds(sum(s.ring_prefill_s for s in win.stages))})")
    if len(cands) == 1:
        return f"{win.label} is the only layout that fits in memory{fit}"
    run = next((x for x in cands[1:] if x.label != win.label), cands[1])
    wb, rb = win.breakdown(), run.breakdown()
    key = max(wb, key=lambda k: rb.get(k, 0.0) - wb[k])
    what = {"compute": "compute and memory reads", "tp_comm": "tensor-parallel all-reduces",
            "pp_comm": "pipeline sends", "cp_comm": "context-parallel merges"}[key]
    links = ""
    if key != "compute" and len(set(cluster.node_of)) > 1:
        a, b = cluster.intra, cluster.inter
        links = (f" (links: {a.bandwidth / 1e9:g} GB/s and {a.latency_s * 1e6:g} us/message "
                 f"in a node, {b.bandwidth / 1e9:g} GB/s and {b.latency_s * 1e6:g} us/message "
                 f"between nodes)")
    return (f"{win.label} wins with {format_seconds(win.time_per_token_s)}/token against "
            f"{format_seconds(run.time_per_token_s)} for {run.label}, mostly on {what}: "
            f"{format_seconds(wb[key])} vs {format_seconds(rb.get(key, 0.0))} per step{links}"
            f"{fit}")


def format_auto_plans(cands: Sequence[AutoCandidate]) -> str:
    """A table of the candidates (best first) with each prediction's parts (compute and
    memory reads, tensor-parallel all-reduces, pipeline sends, bubble), then the winner's
    stages and why it wins."""
    if not cands:
        return "no layout fits"
    hdr = (f"{'#':>2}  {'layout':<16}{'gpus':>5}  {'split':<20}{'mem/device':>12}"
           f"{'time/token':>12}{'compute':>11}{'all-reduce':>11}{'p2p':>10}{'bubble':>8}"
           f"{'tokens/s':>10}")
    lines = [f"objective: {cands[0].objective}  batch_size={cands[0].batch_size} "
             f"max_seq_len={cands[0].max_seq_len}", hdr, "-" * len(hdr)]
    for i, x in enumerate(cands):
        split = ",".join(f"{s}:{e}" for s, e in x.splits)
        split = split if len(split) <= 18 else split[:15] + "..."
        parts = x.breakdown()
        lines.append(f"{i:>2}  {x.label:<16}{x.num_devices:>5}  {split:<20}"
                     f"{format_bytes(x.max_memory_bytes):>12}"
                     f"{format_seconds(x.time_per_token_s):>12}"
                     f"{format_seconds(parts['compute']):>11}"
                     f"{format_seconds(parts['tp_comm'] + parts.get('cp_comm', 0.0)):>11}"
                     f"{format_seconds(parts['pp_comm']):>10}{x.bubble:>8.0%}"
                     f"{x.tokens_per_s:>10.1f}")
    lines.append("-" * len(hdr))
    lines.append("compute = compute and memory reads, all-reduce = tensor- (and context-) "
                 "parallel collectives, "
                 "p2p = pipeline sends: seconds of one micro-batch through every stage; "
                 "bubble = share of device time idle")
    win = cands[0]
    for r, stages in enumerate(win.replicas):
        for i, s in enumerate(stages):
            lines.append(f"replica {r} stage {i}: layers [{s.start}, {s.end}) on "
                         f"{', '.join(s.devices)}: {format_bytes(s.memory_bytes)}/device of "
                         f"{format_bytes(s.usable_bytes)} usable, {format_seconds(s.time_s)}")
    lines.append(f"why: {win.why}")
    return "\n".join(lines)
