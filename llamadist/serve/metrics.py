"""The server's Prometheus metrics: the engine's gauges and counters read at each scrape
(requests running and waiting, KV blocks, preemptions, prompt and generated tokens),
per-stage busy time, the process's and its CUDA devices' memory, a mixture-of-experts
model's tokens routed per expert and layer, and histograms the server fills as requests
finish (time to first token, time per output token, end-to-end latency, queue time).

ServeMetrics lives in the engine's process (serve.engine_host renders it for each scrape);
HttpMetrics in the HTTP process (requests by route and status, that process's own CPU and
memory); GET /metrics answers both texts, one after the other."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    SummaryMetricFamily)

if TYPE_CHECKING:  # the HTTP process imports this module for HttpMetrics, without torch
    from llamadist.engine.async_engine import AsyncEngine
    from llamadist.engine.request import Request

PREFIX = "llamadist"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class EngineCollector:
    """Reads the engine at scrape time (plain counts: safe to read from another thread)."""

    def __init__(self, engine: AsyncEngine, stage_stats: Callable[[], list[dict]] | None,
                 expert_load: Callable[[], dict[int, list[int]]] | None = None):
        self.engine, self.stage_stats, self.expert_load = engine, stage_stats, expert_load

    def collect(self):
        g = self.engine.engine.gauges()
        st = self.engine.engine.stats
        for name, key, doc in (("requests_running", "running", "requests being computed"),
                               ("requests_waiting", "waiting", "requests queued"),
                               ("kv_blocks_used", "kv_blocks_used", "paged KV blocks held"),
                               ("kv_blocks_free", "kv_blocks_free", "paged KV blocks free")):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=g[key])
        total = g["kv_blocks_used"] + g["kv_blocks_free"]
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage", "fraction of KV blocks used",
                                value=g["kv_blocks_used"] / total if total else 0.0)
        yield CounterMetricFamily(f"{PREFIX}_preemptions", "requests preempted",
                                  value=g["preemptions"])
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "prompt tokens computed",
                                  value=st.prompt_tokens)
        yield CounterMetricFamily(f"{PREFIX}_cached_prompt_tokens",
                                  "prompt tokens reused from the prefix cache",
                                  value=st.cached_prompt_tokens)
        yield CounterMetricFamily(f"{PREFIX}_generation_tokens", "tokens generated",
                                  value=st.generated_tokens)
        yield CounterMetricFamily(f"{PREFIX}_engine_steps", "engine steps", value=st.steps)
        # a drained replica's running requests: moved with their KV, or recomputed
        for name, doc, value in (
                ("kv_migrations", "requests moved to another replica with their KV blocks "
                 "(no prefill)", st.migrated_requests),
                ("kv_migrated_blocks", "KV blocks migrated", st.migrated_blocks),
                ("kv_migrated_bytes", "KV bytes migrated", st.migrated_bytes),
                ("kv_relayed_bytes", "of them, relayed through the engine's process (the "
                 "front)", st.kv_relayed_bytes),
                ("kv_direct_bytes", "of them, sent straight from the source replica's "
                 "ranks to the target's", st.kv_direct_bytes),
                ("kv_migration_seconds", "seconds exporting, relaying and importing KV "
                 "blocks", st.migration_s),
                ("drain_replayed_requests", "running requests of a drained replica "
                 "recomputed instead of migrated", st.drain_replayed)):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        yield CounterMetricFamily(f"{PREFIX}_engine_busy_seconds", "seconds inside steps",
                                  value=st.busy_s)
        yield GaugeMetricFamily(f"{PREFIX}_engine_alive", "1 while the engine thread runs",
                                value=1.0 if self.engine.alive else 0.0)
        cuda = _cuda_memory()
        if cuda:
            mem = GaugeMetricFamily(f"{PREFIX}_device_memory_allocated_bytes",
                                    "torch's allocated memory per CUDA device of this process",
                                    labels=["device"])
            for dev, value in cuda:
                mem.add_metric([dev], value)
            yield mem
        if self.stage_stats is not None:
            yield from stage_metrics(self.stage_stats())
        if self.expert_load is not None:
            yield from expert_metrics(self.expert_load())


STAGE_LABELS = ["stage", "layers", "rank", "replica", "device"]
# (metric, key of a stage's statistics, counter?, help); a metric appears where some stage
# reports its key (busy, memory: the workers' live statistics under --nproc)
STAGE_METRICS = (
    ("stage_busy_seconds", "compute_s", True, "compute seconds per pipeline stage (per rank "
     "over processes)"),
    # a worker reports "steps"; a stage in this process counts its forward "calls", one
    # per engine step
    ("stage_steps", ("steps", "calls"), True, "steps run per stage (per rank over "
     "processes)"),
    ("stage_wait_seconds", "wait_s", True, "seconds a worker rank waited for its next step"),
    ("stage_busy_fraction", "busy", False, "fraction of the last heartbeat interval a worker "
     "rank spent computing (utilisation)"),
    ("stage_memory_allocated_bytes", "memory_allocated_bytes", False, "a worker rank's "
     "device memory allocated by tensors (its resident set on the CPU)"),
    ("stage_memory_used_bytes", "memory_used_bytes", False, "a worker rank's device memory "
     "held by its allocator (its resident set on the CPU)"),
)


def stage_metrics(stages: list[dict]):
    """Per-stage statistics labelled by stage, its layers ("start:stop"), rank,
    data-parallel replica and device (one process: every stage is rank 0 of replica 0)."""
    for name, keys, counter, doc in STAGE_METRICS:
        keys = (keys,) if isinstance(keys, str) else keys
        rows = [(s, next(k for k in keys if k in s)) for s in stages
                if any(k in s for k in keys)]
        if not rows:
            continue
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(
            f"{PREFIX}_{name}", doc, labels=STAGE_LABELS)
        for s, key in rows:
            layers = f"{s['layers'][0]}:{s['layers'][1]}" if "layers" in s else ""
            family.add_metric([str(s["stage"]), layers, str(s.get("rank", 0)),
                               str(s.get("dp", 0)), str(s["device"])], float(s[key]))
        yield family


def expert_metrics(load: dict[int, list[int]]):
    """Tokens routed per (layer, expert) as a labelled counter, and each layer's
    imbalance: its busiest expert's tokens over the mean (1.0 is perfectly even; the
    busiest expert's rank sets an expert-parallel step's pace)."""
    routed = CounterMetricFamily(f"{PREFIX}_expert_routed_tokens",
                                 "tokens routed to each expert of each MoE layer (top-k "
                                 "assignments: k per token)", labels=["layer", "expert"])
    imbalance = GaugeMetricFamily(f"{PREFIX}_expert_load_imbalance",
                                  "busiest expert's routed tokens over the mean, per MoE layer",
                                  labels=["layer"])
    for layer, counts in sorted(load.items()):
        for e, n in enumerate(counts):
            routed.add_metric([str(layer), str(e)], n)
        total = sum(counts)
        imbalance.add_metric([str(layer)], max(counts) * len(counts) / total if total else 0.0)
    yield routed
    yield imbalance


def _cuda_memory() -> list[tuple[str, float]]:
    import torch
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [(f"cuda:{i}", float(torch.cuda.memory_allocated(i)))
            for i in range(torch.cuda.device_count())]


class RecoveryCollector:
    """The front's worker processes (--nproc): replicas running, restarts, and each
    recovery's phases (detect, restart, reload, warmup, replay) as summaries."""

    def __init__(self, status: Callable[[], dict]):
        self.status = status

    def collect(self):
        st = self.status()
        yield GaugeMetricFamily(f"{PREFIX}_replicas_running", "data-parallel replicas whose "
                                "workers are all running", value=st["replicas_running"])
        yield GaugeMetricFamily(f"{PREFIX}_recovering", "1 while a lost worker is replaced",
                                value=1.0 if st["status"] == "recovering" else 0.0)
        yield CounterMetricFamily(f"{PREFIX}_worker_restarts", "worker restarts (each "
                                  "restarts a replica's workers)", value=st["restarts"])
        recs = st["recoveries"]
        yield CounterMetricFamily(f"{PREFIX}_recoveries", "replicas recovered after a lost "
                                  "worker", value=len(recs))
        yield CounterMetricFamily(f"{PREFIX}_replayed_requests", "requests replayed or moved "
                                  "by recoveries",
                                  value=sum(r["replayed"] + r["moved"] for r in recs))
        phases = SummaryMetricFamily(f"{PREFIX}_recovery_seconds", "seconds per recovery "
                                     "phase: detect, restart, reload, warmup, replay",
                                     labels=["phase"])
        for phase in ("detect", "restart", "reload", "warmup", "replay"):
            done = [r[f"{phase}_s"] for r in recs if r[f"{phase}_s"] is not None]
            phases.add_metric([phase], count_value=len(done), sum_value=sum(done))
        yield phases


class ServeMetrics:
    def __init__(self, engine: AsyncEngine,
                 stage_stats: Callable[[], list[dict]] | None = None,
                 expert_load: Callable[[], dict[int, list[int]]] | None = None,
                 workers: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, stage_stats, expert_load))
        if workers is not None:
            self.registry.register(RecoveryCollector(workers))
        r = self.registry
        ProcessCollector(registry=r)  # the front process's memory, CPU seconds, open files
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "mean time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "arrival to finish",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram(f"{PREFIX}_queue_time_seconds", "arrival to first admission",
                               buckets=TTFT_BUCKETS, registry=r)
        r.register(_Pid(f"{PREFIX}_engine_pid", "the engine process's id"))
        self.finished = Counter(f"{PREFIX}_requests_finished", "engine requests by finish "
                                "reason", ["reason"], registry=r)

    def observe(self, req: Request | None) -> None:
        """A finished (or cancelled) engine request's timings."""
        if req is None:
            return
        self.finished.labels(req.finish_reason or "cancelled").inc()
        for hist, value in ((self.ttft, req.ttft_s), (self.tpot, req.tpot_s),
                            (self.queue, req.queue_s)):
            if value is not None:
                hist.observe(value)
        if req.finished_s is not None and req.arrival_s is not None:
            self.e2e.observe(req.finished_s - req.arrival_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Pid:
    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc

    def collect(self):
        yield GaugeMetricFamily(self.name, self.doc, value=os.getpid())


class HttpMetrics:
    """The HTTP process's own: requests by route and status, its process id, memory and
    CPU seconds (``llamadist_http_process_*``)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(namespace=f"{PREFIX}_http", registry=r)
        r.register(_Pid(f"{PREFIX}_http_pid", "the HTTP server process's id"))
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and "
                                "status", ["route", "status"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
