"""The in-process engine: stages on any mix of devices, hidden states passed between them.

Each stage's KV cache stays on its device; only the (B, T, D) hidden state crosses
a boundary. The engine is what generation drives: ``forward`` takes token ids and
returns the last position's logits on the last stage's device.
"""

from __future__ import annotations

import logging

import torch

from llamadist.config import ModelConfig, RuntimeConfig
from llamadist.model.moe import SparseMoE
from llamadist.runtime.compiled_layer import load_done
from llamadist.runtime.cuda_graph import per_stage
from llamadist.runtime.kernel_passes import compile_rows
from llamadist.runtime.mask import attention_mask
from llamadist.runtime.paged_kv import PagedBatch
from llamadist.runtime.stage import Stage, build_stage, parse_dtype, to_stage
from llamadist.weights.checkpoint import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)


__all__ = ["Engine", "attention_mask"]


class Engine:
    """Stages in order on their devices; ``runtime`` (None: ``RuntimeConfig()``) decides
    the decode path once, here: ``cuda_graphs`` (one-token steps through per-stage CUDA
    graphs, llamadist.runtime.cuda_graph, when a stage is on CUDA) and ``compile`` (each
    decoder layer through torch.compile inside them). The stages' kernels were chosen
    from the same config when they were built (``build``/``load`` pass it on)."""

    def __init__(self, config: ModelConfig, stages: list[Stage], ckpt: Checkpoint | None = None,
                 runtime: RuntimeConfig | None = None):
        self.config = config
        self.stages = stages
        self.ckpt = ckpt
        self.runtime = runtime or RuntimeConfig()
        # time each stage's compute and transfers on its device (CUDA events, read without
        # a sync: runtime.work_timer), so a timed run steps as fast as an untimed one
        self.timed = self.runtime.timed
        # Read by the first decode step (the graphs are made then); kept as attributes
        # so tests can compare paths on one engine.
        self.cuda_graphs = self.runtime.cuda_graphs and any(s.device.type == "cuda"
                                                            for s in stages)
        if self.cuda_graphs and not all(m.graph_safe for s in stages
                                        for m in s.model.modules() if isinstance(m, SparseMoE)):
            # The expert loop gathers each expert's tokens (data-dependent shapes, a host
            # sync), which a CUDA graph cannot capture; the grouped-GEMM kernel
            # (kernel_passes.use_grouped_experts: CUDA, bf16, Hopper) can.
            log.info("mixture-of-experts blocks without the grouped kernel: decoding "
                     "without CUDA graphs")
            self.cuda_graphs = False
        # torch.compile inside the graphs, one flag per stage: as the run says, or where
        # it pays, stage by stage (tests may set one bool for all); where it pays only past
        # some rows (compile_rows), the buckets of fewer rows capture the eager layers
        rows = [self._compile_rows(s) for s in stages]
        self.compile_layers: bool | tuple[bool, ...] = tuple(
            r is not None and r <= s.batch_size for r, s in zip(rows, stages))
        self.compile_from: int | tuple[int, ...] = tuple(r or 1 for r in rows)
        if (self.runtime.compile_cache and self.cuda_graphs
                and not any(per_stage(self.compile_layers, len(stages)))):
            log.warning("--compile-cache %s: nothing here compiles (dense float layers, "
                        "and int4 batches of the rows cuda_int4 takes, decode through "
                        "graphs of their eager layers; --compile compiles them)",
                        self.runtime.compile_cache)
        self._graphs = None
        self._paged_graphs = None
        self.graphed = False  # the latest paged step ran through the decode graphs

    def _compile_rows(self, stage: Stage) -> int | None:
        """The fewest rows of a decode step whose layers ``stage`` compiles, None for no
        step: every step with --compile, none with --no-compile, else where it pays on
        CUDA (kernel_passes.compile_rows)."""
        if self.runtime.compile is not None:
            return 1 if self.runtime.compile else None
        return compile_rows(stage.model) if stage.device.type == "cuda" else None

    @property
    def max_seq_len(self) -> int:
        return self.stages[0].max_seq_len

    @property
    def max_batch(self) -> int:
        return self.stages[0].batch_size

    @property
    def device(self) -> torch.device:
        """Where logits (and so sampling) live: the last stage's device."""
        return self.stages[-1].device

    @classmethod
    def load(cls, model: str, *, layer_ranges: list[range] | None = None,
             devices: list[str] | None = None, dtype: str | torch.dtype = "float32",
             max_batch: int = 1, max_seq_len: int | None = None,
             progress: bool = False, runtime: RuntimeConfig | None = None) -> "Engine":
        """Open ``model`` and build its stages. ``runtime`` sets the kernels and the decode
        path; the arguments above it set the shapes (runtime's max_batch, max_seq_len and
        dtype are the CLI's to resolve into them, and are not read here)."""
        ckpt = open_checkpoint(model)
        config = ckpt.config
        devices = devices or ["cpu"]
        if layer_ranges is None:
            if len(devices) != 1:
                raise ValueError("give layer_ranges for more than one device (or use a Plan)")
            layer_ranges = [range(config.num_layers)]
        seq = RuntimeConfig(max_seq_len=max_seq_len).seq_len_for(config.max_position_embeddings)
        return cls.build(ckpt, layer_ranges, devices, parse_dtype(dtype), max_batch, seq,
                         progress=progress, runtime=runtime)

    @classmethod
    def build(cls, ckpt: Checkpoint, layer_ranges: list[range], devices: list[str],
              dtype: torch.dtype, max_batch: int, max_seq_len: int,
              progress: bool = False, runtime: RuntimeConfig | None = None,
              static_cache: bool = True) -> "Engine":
        """One stage per (layer range, device); each reads only its own tensors.
        ``static_cache`` False: no preallocated (max_batch, max_seq_len) KV cache, for an
        engine that only runs paged steps (init_paged gives it its cache)."""
        if len(layer_ranges) != len(devices):
            raise ValueError(f"{len(layer_ranges)} layer ranges but {len(devices)} devices")
        n = len(devices)
        stages = [build_stage(ckpt, layers, dev, dtype, max_batch, max_seq_len,
                              has_embed=i == 0, has_head=i == n - 1, progress=progress,
                              runtime=runtime, lanes=1 if static_cache else 0)
                  for i, (layers, dev) in enumerate(zip(layer_ranges, devices))]
        load_done()  # every stage's weights are in: the host's switch interval as it was
        return cls(ckpt.config, stages, ckpt, runtime)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, start: int,
                valid: torch.Tensor | None = None, logits: str = "last",
                lane: int = 0) -> torch.Tensor:
        """tokens (B, T), positions (B, T), valid (B, S) or None -> logits (B, 1|T, V)."""
        if isinstance(start, torch.Tensor):
            # A device-tensor start (attend over every slot) is the graph path's own
            # business: it builds the full-length mask that such a start needs.
            raise TypeError("Engine.forward takes an int start; the CUDA-graph path owns "
                            "tensor starts")
        t = tokens.shape[1]
        if t == 1 and logits == "last" and lane == 0 and self.cuda_graphs:
            return self.decode_graphs().forward(tokens, positions, start, valid,
                                                timed=self.timed)
        mask = attention_mask(valid, start, t)
        x = tokens
        for stage in self.stages:
            x, pos, m = to_stage(stage, x, positions, mask, self.timed)
            x = stage.forward(x, pos, start, m, lane=lane, logits=logits, timed=self.timed)
        return x

    def init_paged(self, num_blocks: int, block_size: int) -> None:
        """Give every stage a paged KV cache of ``num_blocks`` blocks (the same block ids
        on every stage; size it with llamadist.runtime.paged_kv.num_blocks_for)."""
        for stage in self.stages:
            stage.init_paged(num_blocks, block_size)

    def forward_paged(self, tokens: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """One flat step: tokens (N,) in the batch's order (each chunk's tokens, chunk by
        chunk), ``batch`` from PagedBatch.build on the host -> logits (S, V) of each
        sequence's last token, on the last stage's device. A decode-only step goes through
        the per-bucket CUDA graphs (llamadist.runtime.paged_graphs) when ``cuda_graphs``
        and every stage is on CUDA with the paged kernel; its logits are then a view of a
        static buffer, valid until the next step."""
        graphs = self.paged_graphs() if batch.is_decode and self.cuda_graphs else None
        self.graphed = graphs is not None and graphs.accepts(batch)  # read by step traces
        if self.graphed:
            return graphs.forward(tokens, batch, timed=self.timed)
        x = tokens
        on_device: dict[torch.device, PagedBatch] = {}  # moved (and its groups made) once
        for stage in self.stages:
            if stage.device not in on_device:
                on_device[stage.device] = batch.to(stage.device)
            b = on_device[stage.device]
            x, _, _ = to_stage(stage, x, b.positions, None, self.timed)
            x = stage.forward_paged(x, b, timed=self.timed)
        return x

    def decode_graphs(self):
        """The static decode path (created on first use; captures lazily per bucket)."""
        if self._graphs is None:
            from llamadist.runtime.cuda_graph import DecodeGraphs
            self._graphs = DecodeGraphs(self.stages, compile_layers=self.compile_layers,
                                        compile_from=self.compile_from,
                                        compile_cache=self.runtime.compile_cache)
        return self._graphs

    def paged_graphs(self):
        """The paged decode graphs (made on first use, capturing lazily per bucket), or
        None where the stages do not support them (PagedGraphs.supports)."""
        if self._paged_graphs is None:
            from llamadist.runtime.paged_graphs import PagedGraphs
            if not PagedGraphs.supports(self.stages):
                return None
            self._paged_graphs = PagedGraphs(self.stages, self.max_batch,
                                             compile_layers=self.compile_layers,
                                             compile_from=self.compile_from,
                                             compile_cache=self.runtime.compile_cache)
        return self._paged_graphs

    def captures(self, num_seqs: int) -> int | None:
        """The bucket whose CUDA graphs a decode-only step of ``num_seqs`` sequences would
        first capture (and compile its layers, where compiled: seconds, once a bucket), or
        None."""
        if not self.cuda_graphs:
            return None
        if self._paged_graphs is None:
            from llamadist.runtime.cuda_graph import bucket_sizes
            from llamadist.runtime.paged_graphs import PagedGraphs, bucket_for
            if not PagedGraphs.supports(self.stages):
                return None
            return bucket_for(num_seqs, bucket_sizes(self.max_batch))
        return self._paged_graphs.captures(num_seqs)

    def settle_timing(self, wait: bool = False) -> None:
        """Add the timed work (``timed``) each stage's device has finished to its stats;
        ``wait``: all of it, the host waiting for the devices (once, at the end of a run).
        From the thread that steps (WorkTimer.settle)."""
        for s in self.stages:
            s.timer.settle(wait)

    def stage_stats(self, settle: bool = False) -> list[dict]:
        """Per stage: layers, device, timings; with ``expert_load`` (tokens routed to each
        expert per MoE layer, keyed by layer index) for a mixture-of-experts model.
        ``settle``: first ``settle_timing(wait=True)`` (the end of a timed run, from the
        thread that steps); without, the timed work read so far (safe from any thread)."""
        if settle:
            self.settle_timing(wait=True)
        out = []
        for i, s in enumerate(self.stages):
            d = dict(stage=i, layers=[s.layers.start, s.layers.stop], device=str(s.device),
                     **s.stats.to_dict())
            if self.config.is_moe:
                d["expert_load"] = {str(k): v for k, v in s.expert_load().items()}
            out.append(d)
        return out
