"""The in-process engine: stages on any mix of devices, hidden states passed between them.

Each stage's KV cache stays on its device; only the (B, T, D) hidden state crosses
a boundary. The engine is what generation drives: ``forward`` takes token ids and
returns the last position's logits on the last stage's device.
"""

from __future__ import annotations

import logging
import time

import torch

from llamadist.config import ModelConfig
from llamadist.runtime.stage import Stage, build_stage, parse_dtype, sync
from llamadist.weights.checkpoint import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)


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


class Engine:
    def __init__(self, config: ModelConfig, stages: list[Stage], ckpt: Checkpoint | None = None):
        self.config = config
        self.stages = stages
        self.ckpt = ckpt
        self.timed = False  # sync after each stage to attribute time (costs a little speed)
        # One-token decode through per-stage CUDA graphs (llamadist.runtime.cuda_graph);
        # set before the first decode step. compile_layers: torch.compile each layer first.
        self.cuda_graphs = any(s.device.type == "cuda" for s in stages)
        self.compile_layers = True
        self._graphs = None

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
             progress: bool = False) -> "Engine":
        ckpt = open_checkpoint(model)
        config = ckpt.config
        devices = devices or ["cpu"]
        if layer_ranges is None:
            if len(devices) != 1:
                raise ValueError("give layer_ranges for more than one device (or use a Plan)")
            layer_ranges = [range(config.num_layers)]
        return cls.build(ckpt, layer_ranges, devices, parse_dtype(dtype), max_batch,
                         max_seq_len or config.max_position_embeddings, progress=progress)

    @classmethod
    def build(cls, ckpt: Checkpoint, layer_ranges: list[range], devices: list[str],
              dtype: torch.dtype, max_batch: int, max_seq_len: int,
              progress: bool = False) -> "Engine":
        """One stage per (layer range, device); each reads only its own tensors."""
        if len(layer_ranges) != len(devices):
            raise ValueError(f"{len(layer_ranges)} layer ranges but {len(devices)} devices")
        n = len(devices)
        stages = [build_stage(ckpt, layers, dev, dtype, max_batch, max_seq_len,
                              has_embed=i == 0, has_head=i == n - 1, progress=progress)
                  for i, (layers, dev) in enumerate(zip(layer_ranges, devices))]
        return cls(ckpt.config, stages, ckpt)

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
            return self.decode_graphs().forward(tokens, positions, start, valid)
        mask = attention_mask(valid, start, t)
        x = tokens
        for stage in self.stages:
            x, pos, m = self._to(stage, x, positions, mask)
            x = stage.forward(x, pos, start, m, lane=lane, logits=logits, timed=self.timed)
        return x

    def _to(self, stage: Stage, x: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if x.device != stage.device:
            t0 = time.perf_counter()
            # Non-blocking only towards CUDA: a non-blocking copy to the CPU returns before
            # the data lands, and the CPU stage would read it too early.
            x = x.to(stage.device, non_blocking=stage.device.type == "cuda")
            if self.timed:
                sync(stage.device)
                stage.stats.transfer_s += time.perf_counter() - t0
            stage.stats.bytes_in += x.nbytes
        return x, positions.to(stage.device), None if mask is None else mask.to(stage.device)

    def decode_graphs(self):
        """The static decode path (created on first use; captures lazily per bucket)."""
        if self._graphs is None:
            from llamadist.runtime.cuda_graph import DecodeGraphs
            self._graphs = DecodeGraphs(self, compile_layers=self.compile_layers)
        return self._graphs

    def stage_stats(self) -> list[dict]:
        return [dict(stage=i, layers=[s.layers.start, s.layers.stop], device=str(s.device),
                     **s.stats.to_dict()) for i, s in enumerate(self.stages)]
