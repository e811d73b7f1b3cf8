"""CUDA-graph decode: each stage captures its one-token step once per batch bucket and
replays it, so a decode step costs one graph launch per stage instead of dozens of
kernel launches per layer from Python.

Static shapes: the step reads its inputs from buffers that live as long as its graph
(token ids or hidden state, RoPE positions, the cache slot ``start`` as a 0-d device
tensor, ``valid``) and builds on the device the mask that hides slots not yet written
and padding. On CUDA the split-KV kernel of :mod:`llamadist.kernels.decode_attention`
reads ``start`` and attends over the live slots only; SDPA (its fallback) attends over
the whole preallocated cache, masked. Each stage on its own device has its own graphs
and memory pool; stages not on CUDA (CPU offload) run eagerly in the same loop.
Optionally each decoder layer runs through ``torch.compile`` (regional: one compiled
artifact serves every layer and every stage of the same shapes), which fuses RMSNorm
with the residual adds (each layer's last add into the next layer's first norm), k's
RoPE with the K/V cache write, and SwiGLU into a few kernels; the matmuls stay cuBLAS. The
graph is captured on the first decode step of a bucket, after warm-up runs that compile
and write the same cache slot the replay writes. Where the stage has them
(``Stage.dependent_launches``: sm_90+, RuntimeConfig.dependent_launches) the capture runs
inside ``kernels.gpu.dependent_launches``: llamadist's kernels, and Inductor's in the
compiled layer, are captured as programmatic dependent launches (each may start while the
one before it ends; the same bits).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamadist.kernels import gpu
from llamadist.runtime import compile_cache
from llamadist.runtime.compiled_layer import compiled_layer_call
from llamadist.runtime.kv_cache import KVCache, LayerCache
from llamadist.runtime.mask import attention_mask
from llamadist.runtime.stage import Stage, to_stage

log = logging.getLogger(__name__)

WARMUP_STEPS = 2


def per_stage(flag: bool | int | Sequence[bool | int], n: int) -> list:
    """A stage setting given for all ``n`` stages at once (a bool or int) or one per
    stage."""
    flags = [flag] * n if isinstance(flag, (bool, int)) else list(flag)
    if len(flags) != n:
        raise ValueError(f"{len(flags)} flags for {n} stages")
    return flags


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch``: a batch runs in the
    smallest bucket that holds it (extra rows compute garbage that nobody reads)."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


class _CacheRows:
    """The first ``n`` rows of a stage's KVCache, with KVCache's ``layer(i)``."""

    def __init__(self, cache: KVCache, n: int):
        self.layers = {i: LayerCache(c.k[:n], c.v[:n], None if c.kv is None else c.kv[:, :n])
                       for i, c in cache.layers.items()}

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]


@dataclass
class _Bucket:
    size: int
    x: torch.Tensor          # (N, 1) token ids, or (N, 1, D) hidden state
    positions: torch.Tensor  # (N, 1) long
    start: torch.Tensor      # () long: the cache slot this step writes
    valid: torch.Tensor      # (N, S) bool: slot holds a real token
    cache: _CacheRows
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # (N, 1, V) logits or (N, 1, D) hidden


class GraphCapture:
    """Warm-up and capture of one stage's decode step for one bucket, shared by the static
    and the paged decoders: ``layer_fn`` is the compiled layer call (None: the eager
    layers), from ``compile_from`` rows on (Engine.compile_from). Subclasses provide
    ``_forward(bucket)`` and ``kind`` (for the log); a bucket has ``out``, ``graph`` and
    ``size``."""

    kind = "decode"
    artifacts = None  # the compile-artifact file (llamadist.runtime.compile_cache), or None

    def __init__(self, stage: Stage, *, compile_layers: bool, capture: bool,
                 compile_cache: str | None, compile_from: int):
        self.stage = stage
        self.capture = capture and stage.device.type == "cuda"
        self.layer_fn = compiled_layer_call(stage.dependent_launches) if compile_layers \
            else None
        self.compile_from = compile_from  # buckets of fewer rows capture the eager layers
        self.keep_artifacts(compile_cache)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.prepare_s = 0.0  # warm-up, compilation and capture

    def layers(self, bk) -> object | None:
        """The layer call of bucket ``bk``'s step: the compiled one from compile_from
        rows on, else None (the eager layers)."""
        return self.layer_fn if bk.size >= self.compile_from else None

    def keep_artifacts(self, folder: str | None) -> None:
        """With a compiled layer and a ``folder``: load this stage's artifacts file now
        (before anything compiles), and write it after each bucket's first step."""
        if folder and self.layer_fn is not None:
            self.artifacts = compile_cache.artifact_path(folder, self.stage)
            compile_cache.load(self.artifacts)

    def run(self, bk) -> torch.Tensor:
        """The loaded bucket's step: replayed once captured, captured on its first run
        when capturing, else run eagerly -> its whole output."""
        if bk.graph is not None:
            bk.graph.replay()
            return bk.out
        first = bk.out is None
        if self.capture and first:
            self._capture(bk)
        else:
            bk.out = self._forward(bk)
        if first and self.artifacts is not None and self.layers(bk) is not None:
            compile_cache.save(self.artifacts)  # what this bucket compiled, for the next process
        return bk.out

    def _warmup(self, bk) -> None:
        # Compilation and cuBLAS/attention workspace set-up must happen outside capture.
        # Each run writes the same values into the same cache slot as the replay will.
        for _ in range(WARMUP_STEPS):
            try:
                self._forward(bk)
            except Exception as e:  # a compiler failure must not stop generation
                if self.layers(bk) is None:  # the eager layers failed: not the compiler
                    raise
                log.warning("torch.compile of the %s decoder layer failed (%s: %s); "
                            "capturing the eager layers instead", self.kind,
                            type(e).__name__, e)
                self.layer_fn = None
                self._forward(bk)

    def _capture(self, bk) -> None:
        t0 = time.perf_counter()
        # the step's kernels as programmatic dependent launches where the stage has them
        with torch.cuda.device(self.stage.device), \
                gpu.dependent_launches(self.stage.dependent_launches):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._warmup(bk)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bk.out = self._forward(bk)
            graph.replay()
        bk.graph = graph
        self.prepare_s += time.perf_counter() - t0
        log.info("captured %s graph: layers %d..%d on %s, bucket %d, %.1f s", self.kind,
                 self.stage.layers.start, self.stage.layers.stop - 1, self.stage.device,
                 bk.size, time.perf_counter() - t0)


class StageDecoder(GraphCapture):
    """Static-shape decode of one stage; captured in CUDA graphs when on CUDA."""

    def __init__(self, stage: Stage, *, compile_layers: bool = True, capture: bool = True,
                 compile_cache: str | None = None, compile_from: int = 1):
        super().__init__(stage, compile_layers=compile_layers, capture=capture,
                         compile_cache=compile_cache, compile_from=compile_from)
        self.device = stage.device
        self.sizes = bucket_sizes(stage.batch_size)
        self.buckets: dict[int, _Bucket] = {}
        self.slots = torch.arange(stage.max_seq_len, device=stage.device)  # (S,)

    def _bucket(self, b: int, like: torch.Tensor) -> _Bucket:
        n = next((s for s in self.sizes if s >= b), None)
        if n is None:
            raise IndexError(f"batch of {b} but the KV cache was built for {self.stage.batch_size}")
        if n not in self.buckets:
            dev, s = self.device, self.stage.max_seq_len
            if like.dim() == 2:
                x = torch.zeros(n, 1, dtype=torch.long, device=dev)
            else:
                x = torch.zeros(n, 1, like.shape[-1], dtype=self.stage.dtype, device=dev)
            self.buckets[n] = _Bucket(n, x, torch.zeros(n, 1, dtype=torch.long, device=dev),
                                      torch.zeros((), dtype=torch.long, device=dev),
                                      torch.ones(n, s, dtype=torch.bool, device=dev),
                                      _CacheRows(self.stage.caches[0], n))
        return self.buckets[n]

    def load(self, x: torch.Tensor, positions: torch.Tensor, start: int,
             valid: torch.Tensor | None) -> _Bucket:
        """Copy this step's inputs into the static buffers (across devices if need be)."""
        b = x.shape[0]
        bk = self._bucket(b, x)
        bk.x[:b].copy_(x, non_blocking=True)
        bk.positions[:b].copy_(positions, non_blocking=True)
        bk.start.fill_(start)
        if valid is None:
            bk.valid[:b].fill_(True)
        else:
            bk.valid[:b].copy_(valid, non_blocking=True)
        return bk

    def step(self, bk: _Bucket, b: int) -> torch.Tensor:
        """Run (replay) the step for the loaded bucket -> rows [:b] of its output."""
        return self.run(bk)[:b]

    def _forward(self, bk: _Bucket) -> torch.Tensor:
        n, s = bk.size, self.stage.max_seq_len
        # Slot j is visible to the query at slot `start` if it holds a real token at or
        # before it; the query always sees itself, so padded rows stay finite.
        visible = ((self.slots <= bk.start) & bk.valid) | (self.slots == bk.start)  # (N, S)
        # Additive, once per step: SDPA would otherwise convert a bool mask in every layer.
        mask = torch.zeros(n, 1, 1, s, dtype=self.stage.dtype, device=self.device)
        mask.masked_fill_(~visible.view(n, 1, 1, s), float("-inf"))
        return self.stage.model(bk.x, bk.positions, bk.cache, bk.start, mask,
                                logits="last", layer_fn=self.layers(bk))

class DecodeGraphs:
    """The engine's one-token decode through per-stage static steps (graphs on CUDA);
    ``stages`` in pipeline order (the engine's)."""

    def __init__(self, stages: Sequence[Stage], *, compile_layers: bool | Sequence[bool] = True,
                 capture: bool = True, static_cpu: bool = False,
                 compile_cache: str | None = None, compile_from: int | Sequence[int] = 1):
        self.stages = list(stages)
        n = len(self.stages)
        self.decoders = [StageDecoder(s, compile_layers=c, capture=capture,
                                      compile_cache=compile_cache, compile_from=f)
                         if s.device.type == "cuda" or static_cpu else None
                         for s, c, f in zip(self.stages, per_stage(compile_layers, n),
                                            per_stage(compile_from, n))]

    @property
    def prepare_s(self) -> float:
        return sum(d.prepare_s for d in self.decoders if d is not None)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, start: int,
                valid: torch.Tensor | None, timed: bool = False) -> torch.Tensor:
        """tokens (B, 1), positions (B, 1), valid (B, S) or None -> logits (B, 1, V).
        The logits are a view of a static buffer: read them before the next step.
        ``timed``: each stage's load (transfer_s) and replay (compute_s) timed on its
        device without a sync (Engine.timed, runtime.work_timer)."""
        x, b, mask = tokens, tokens.shape[0], None
        for stage, dec in zip(self.stages, self.decoders):
            if dec is None:  # eager stage (CPU offload)
                if mask is None and valid is not None:
                    mask = attention_mask(valid, start, 1)
                x, pos, m = to_stage(stage, x, positions, mask, timed)
                x = stage.forward(x, pos, start, m, timed=timed)
                continue
            if x.device != stage.device:
                stage.stats.bytes_in += x.nbytes
            t0 = stage.timer.start(stage.device, after=x.device) if timed else None
            bk = dec.load(x, positions, start, valid)
            if timed:
                stage.timer.stop(t0, stage.device, stage.stats, "transfer_s")
                t0 = stage.timer.start(stage.device)
            x = dec.step(bk, b)
            if timed:
                stage.timer.stop(t0, stage.device, stage.stats, "compute_s")
            stage.stats.calls += 1
        return x
