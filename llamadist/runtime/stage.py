"""A pipeline stage: a slice of the model on one device, with its own KV caches.

``build_stage`` is where a stage's model gets its passes, in order: build on meta ->
``prepare`` (the tensor-parallel pass) -> load this stage's tensors -> fuse projections ->
the kernel passes of ``RuntimeConfig`` (llamadist.runtime.kernel_passes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamadist.config import RuntimeConfig
from llamadist.model.cache import Start
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.model.moe import count_routing, routing_counts
from llamadist.parallel.tensor import Group, tensor_parallel_pass
from llamadist.runtime.compiled_layer import start_compiler_import
from llamadist.runtime.kernel_passes import (apply_kernel_passes, compile_expected,
                                             decode_layer_fn, decode_step_fn,
                                             dependent_launches, paged_decode_fn)
from llamadist.runtime.kv_cache import KVCache
from llamadist.runtime.paged_attention import PagedStep
from llamadist.runtime.paged_kv import PagedBatch, PagedKVCache
from llamadist.runtime.work_timer import WorkTimer
from llamadist.weights.checkpoint import Checkpoint
from llamadist.weights.loader import LoadStats, ShardFn, load_weights, trim_heap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class StageStats:
    """A stage's run counters. With ``Engine.timed`` ``compute_s`` and ``transfer_s`` are
    its device's seconds (CUDA events, read when the device has passed them: ``WorkTimer``);
    without, nothing is timed."""
    compute_s: float = 0.0
    transfer_s: float = 0.0
    bytes_in: int = 0
    calls: int = 0
    load: LoadStats | None = None

    def to_dict(self) -> dict:
        d = {"compute_s": self.compute_s, "transfer_s": self.transfer_s,
             "bytes_in": self.bytes_in, "calls": self.calls}
        if self.load:
            d["load_s"] = self.load.seconds
            d["weight_bytes"] = self.load.bytes
        return d


class Stage:
    """Layers ``[layers.start, layers.stop)`` on ``device``, with ``lanes`` KV caches
    (static generation; the engine gives it a paged one instead). ``runtime`` picks the eager steps' ``layer_fn``
    (the C decoder layer on the CPU unless ``cpu_kernels`` is off)."""

    def __init__(self, model: Llama, device: torch.device, dtype: torch.dtype, batch_size: int,
                 max_seq_len: int, lanes: int = 1, num_kv_heads: int | None = None,
                 runtime: RuntimeConfig | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.layers = model.layer_range
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.caches = [KVCache(model.config, self.layers, batch_size, max_seq_len, device, dtype,
                               num_kv_heads) for _ in range(lanes)]
        self.stats = StageStats()
        self.timer = WorkTimer()  # the timed runs' seconds (Engine.timed), without a sync
        self.layer_fn = decode_layer_fn(device, runtime or RuntimeConfig())
        # Tried first for a decode step: the whole step in one C call on the CPU, or None.
        self.step_fn = decode_step_fn(device, runtime or RuntimeConfig())
        # The paged cache's decode-only attention (the Triton kernel on CUDA) or None.
        self.paged_decode = paged_decode_fn(device, runtime or RuntimeConfig())
        # Whether its decode graphs capture programmatic dependent launches.
        self.dependent_launches = dependent_launches(device, runtime or RuntimeConfig())
        self.num_kv_heads = num_kv_heads
        self.paged: PagedKVCache | None = None  # made by init_paged
        if model.config.is_moe:  # per-expert load statistics (expert_load)
            count_routing(model)

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert, per MoE layer of this stage, since it was built or
        ``reset_expert_load``; {} for a dense model."""
        return routing_counts(self.model)

    def reset_expert_load(self) -> None:
        if self.model.config.is_moe:
            count_routing(self.model)

    @property
    def has_embed(self) -> bool:
        return self.model.has_embed

    @property
    def has_head(self) -> bool:
        return self.model.has_head

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, start: Start,
                mask: torch.Tensor | None, lane: int = 0, logits: str = "last",
                timed: bool = False) -> torch.Tensor:
        if lane >= len(self.caches):
            raise RuntimeError(f"stage {self.layers.start}:{self.layers.stop} has "
                               f"{len(self.caches)} static KV cache lanes (built for the "
                               f"paged engine: use forward_paged, or build it with a static "
                               f"cache)")
        t0 = self.timer.start(self.device) if timed else None
        # On the CPU a decode step is one C call where it applies (step_fn), else each
        # decoder layer is one C call where it applies (layer_fn).
        out = None
        if self.step_fn is not None and x.shape[1] == 1:
            out = self.step_fn(self.model, x, positions, self.caches[lane], start, mask, logits)
        if out is None:
            out = self.model(x, positions, self.caches[lane], start, mask, logits,
                             self.layer_fn)
        if timed:
            self.timer.stop(t0, self.device, self.stats, "compute_s")
        self.stats.calls += 1
        return out

    def reset_stats(self) -> None:
        """Zero the run counters and the expert load (the load's statistics stay). Timed
        work still in flight adds to the counters it started under, not the new ones."""
        self.stats = StageStats(load=self.stats.load)
        self.reset_expert_load()

    def init_paged(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """Allocate this stage's paged KV cache (its layers, its KV heads, its device)."""
        self.paged = PagedKVCache(self.model.config, self.layers, num_blocks, block_size,
                                  self.device, self.dtype, self.num_kv_heads)
        self.paged.decode_fn = self.paged_decode
        return self.paged

    @torch.inference_mode()
    def forward_paged(self, x: torch.Tensor, batch: PagedBatch,
                      timed: bool = False) -> torch.Tensor:
        """One flat step over the paged cache. x: token ids (N,) on the first stage, the
        previous stage's hidden states (B, T, D) otherwise; ``batch`` on this device.
        Returns hidden (B, T, D) with (B, T) = batch.token_shape, or on the last stage
        the logits (S, V) of each sequence's last token (then the E rows of
        ``batch.logits_index`` beyond them, if any)."""
        if self.paged is None:
            raise RuntimeError("call init_paged() before forward_paged()")
        t0 = self.timer.start(self.device) if timed else None
        b, t = batch.token_shape
        if x.dim() == 1:
            x = x.view(b, t)
        cache, positions, out = PagedStep(self.paged, batch), batch.positions.view(b, t), None
        if self.step_fn is not None and batch.is_decode:  # row s is sequence s's token
            out = self.step_fn(self.model, x, positions, cache, 0, None, "last")
        if out is None:
            out = self.model(x, positions, cache, 0, None, "last", self.layer_fn,
                             logits_index=batch.last_token_index
                             if batch.logits_index is None else batch.logits_index)
        if timed:
            self.timer.stop(t0, self.device, self.stats, "compute_s")
        self.stats.calls += 1
        return out


def build_stage(ckpt: Checkpoint, layers: range, device: torch.device | str, dtype: torch.dtype,
                batch_size: int, max_seq_len: int, *, has_embed: bool | None = None,
                has_head: bool | None = None, lanes: int = 1, progress: bool = False,
                fuse: bool = True, prepare: Callable[[Llama], object] | None = None,
                shard_fn: ShardFn | None = None, num_kv_heads: int | None = None,
                runtime: RuntimeConfig | None = None) -> Stage:
    """Build a stage on the meta device and stream in only its own tensors.
    ``fuse``: concatenate q/k/v and gate/up after loading (default on: one matmul each,
    and the CPU decode layer of llamadist.kernels.cpu_decode needs it).
    ``prepare`` runs on the meta model before loading (the tensor-parallel pass), with
    ``shard_fn`` the slice each parameter reads and ``num_kv_heads`` this rank's KV heads.
    ``runtime``: which kernels serve (``cpu_kernels``, ``decode_attention``); None is
    ``RuntimeConfig()``, every kernel that applies on ``device``."""
    device = torch.device(device)
    runtime = runtime or RuntimeConfig()
    if compile_expected(ckpt.config, runtime, device, batch_size):
        start_compiler_import()  # its seconds of imports beside the load (issue 13)
    with torch.device("meta"):
        model = Llama(ckpt.config, layers, has_embed=has_embed, has_head=has_head)
    if prepare is not None:
        prepare(model)
    stats = load_weights(model, ckpt, device, dtype, shard_fn=shard_fn, progress=progress,
                         native=runtime.weights == "native",
                         quantize=runtime.quantize_for(str(device)),
                         quantize_head=runtime.quantize_head)
    model.setup_rope(max_seq_len, device)
    if fuse:
        fuse_projections(model)
    trim_heap()  # the buffers the load and the fusion freed
    apply_kernel_passes(model, device, runtime, dtype)
    model.eval()
    stage = Stage(model, device, dtype, batch_size, max_seq_len, lanes, num_kv_heads, runtime)
    stage.stats.load = stats
    return stage


def build_tp_stage(ckpt: Checkpoint, layers: range, device: torch.device | str,
                   dtype: torch.dtype, batch_size: int, max_seq_len: int, group: Group,
                   tp_rank: int, tp_size: int, **kw) -> Stage:
    """``build_stage`` of this rank's tensor-parallel shard of ``layers``: the pass of
    llamadist.parallel.tensor between the meta build and the load (each rank reads only
    its slice), its KV cache sized by the rank's KV heads. ``group``: the TP device group
    (NCCL on GPU, gloo on CPU) of this stage's ranks. ``kw``: build_stage's keywords
    (``fuse`` is exact on shards too: column shards have no collective)."""
    return build_stage(ckpt, layers, device, dtype, batch_size, max_seq_len,
                       **tensor_parallel_pass(ckpt.config, group, tp_rank, tp_size), **kw)


def to_stage(stage: Stage, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
             timed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, T[, D]), positions (B, T) and mask onto ``stage``'s device, counting the bytes
    (and, if ``timed``, the seconds) of the hidden state that crossed. The copy is timed
    on a CUDA side of it (towards the CPU: the source's stream, which runs the copy)."""
    if x.device != stage.device:
        on = stage.device if stage.device.type == "cuda" else x.device
        t0 = stage.timer.start(on, after=x.device) if timed else None
        # Non-blocking only towards CUDA: a non-blocking copy to the CPU returns before
        # the data lands, and the CPU stage would read it too early.
        x = x.to(stage.device, non_blocking=stage.device.type == "cuda")
        if timed:
            stage.timer.stop(t0, on, stage.stats, "transfer_s")
        stage.stats.bytes_in += x.nbytes
    return x, positions.to(stage.device), None if mask is None else mask.to(stage.device)
