"""CUDA graphs for decode-only steps over the paged KV cache (continuous batching).

A decode-only step (every sequence computes one token) has the same shapes whatever its
sequences, once its inputs are padded to a batch bucket and its block tables to a fixed
width: each stage captures it once per bucket and replays it. The step's inputs live in
one static int32 device buffer per (stage, bucket), filled by one host-to-device copy:

    [positions (Nb,) | slot_mapping (Nb,) | seq_lens (Nb,) | block_tables (Nb * MB,)]

with MB = ceil(max_seq_len / block_size), each part starting at a multiple of 4 elements
(``section``: 16 bytes, so the Triton kernels that read them see aligned pointers in every
bucket and compile once, not once more for buckets 1 and 2). Padding rows (the bucket's
rows past the step's S sequences) sit at position 0, write their K/V into slot 0 of
block 0 (the null block, which the block pool never hands out), attend over that one
slot (seq_len 1) and their outputs are dropped. The Triton paged kernel
(llamadist.kernels.paged_attention) reads the tables and lengths from the buffer, so the
graph serves any step of its bucket.
The decoder layers run through torch.compile (the one compiled layer of
llamadist.runtime.cuda_graph) when ``compile_layers``, in the buckets of at least
``compile_from`` rows (the engine's: fewer where compiling pays only past some rows,
kernel_passes.compile_rows); if compilation fails, the eager layers are captured
instead. Graphs need every stage on CUDA with the paged kernel
(``PagedGraphs.supports``); otherwise the engine runs the step eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamadist.runtime.cuda_graph import GraphCapture, bucket_sizes, per_stage
from llamadist.runtime.paged_attention import PagedStep
from llamadist.runtime.paged_kv import PagedBatch
from llamadist.runtime.stage import Stage

log = logging.getLogger(__name__)


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket of ``sizes`` holding ``n`` sequences; past the largest, the
    next power of two (a batch larger than planned still gets a graph)."""
    fit = [s for s in sizes if s >= n]
    return min(fit) if fit else 1 << (n - 1).bit_length()


def section(size: int) -> int:
    """Where the second, third and fourth parts of a bucket's buffer start: at 1, 2 and 3
    times ``size`` rounded up to 4 int32 elements (16 bytes)."""
    return -(-size // 4) * 4


def packed_len(size: int, max_blocks: int) -> int:
    return 3 * section(size) + size * max_blocks


def pack_decode(batch: PagedBatch, size: int, max_blocks: int) -> torch.Tensor:
    """A decode-only ``batch`` (host) padded to ``size`` rows: the flat int32 buffer
    [positions | slot_mapping | seq_lens | block_tables (size, max_blocks)] described in
    the module docstring, of ``packed_len(size, max_blocks)``."""
    s, mb = batch.num_seqs, batch.block_tables.shape[1]
    if not batch.is_decode:
        raise ValueError("pack_decode takes decode-only batches (one token per sequence)")
    if s > size or mb > max_blocks:
        raise ValueError(f"{s} sequences of {mb} blocks do not fit a bucket of {size} "
                         f"rows of {max_blocks} blocks")
    r = section(size)
    out = torch.zeros(packed_len(size, max_blocks), dtype=torch.int32)
    out[:s] = batch.positions
    out[r:r + s] = batch.slot_mapping
    lens = out[2 * r:2 * r + size]
    lens.fill_(1)  # padding rows attend over the null block's slot 0 only
    lens[:s] = batch.seq_lens
    out[3 * r:].view(size, max_blocks)[:s, :mb] = batch.block_tables
    return out


def static_batch(packed: torch.Tensor, size: int, max_blocks: int,
                 block_size: int) -> PagedBatch:
    """The PagedBatch whose tensors are views of a bucket's device buffer ``packed``."""
    dev, r = packed.device, section(size)
    rows = torch.arange(size, device=dev)
    return PagedBatch(block_size=block_size, positions=packed[:size],
                      slot_mapping=packed[r:r + size], query_start=torch.arange(
                          size + 1, device=dev),
                      seq_lens=packed[2 * r:2 * r + size],
                      block_tables=packed[3 * r:].view(size, max_blocks),
                      last_token_index=rows, query_lens=(1,) * size, starts=(0,) * size)


@dataclass
class PagedBucket:
    size: int
    x: torch.Tensor        # (Nb, 1) token ids, or (Nb, 1, D) hidden state
    packed: torch.Tensor   # (packed_len(Nb, MB),) int32: see the module docstring
    batch: PagedBatch      # views of ``packed``
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # (Nb, V) logits or (Nb, 1, D) hidden


class PagedStageDecoder(GraphCapture):
    """One stage's paged decode step per bucket, captured on the bucket's first step."""

    kind = "paged decode"

    def __init__(self, stage: Stage, max_blocks: int, *, compile_layers: bool = True,
                 capture: bool = True, compile_cache: str | None = None,
                 compile_from: int = 1):
        if stage.paged is None:
            raise RuntimeError("call init_paged() before making paged graphs")
        super().__init__(stage, compile_layers=compile_layers, capture=capture,
                         compile_cache=compile_cache, compile_from=compile_from)
        self.max_blocks = max_blocks
        self.buckets: dict[int, PagedBucket] = {}

    def bucket(self, size: int, first: bool, hidden: int) -> PagedBucket:
        bk = self.buckets.get(size)
        if bk is None:
            st, dev = self.stage, self.stage.device
            x = (torch.zeros(size, 1, dtype=torch.long, device=dev) if first
                 else torch.zeros(size, 1, hidden, dtype=st.dtype, device=dev))
            packed = torch.zeros(packed_len(size, self.max_blocks), dtype=torch.int32,
                                 device=dev)
            batch = static_batch(packed, size, self.max_blocks, st.paged.block_size)
            # The kernel's inputs, made here (outside torch.compile and capture): the
            # static views themselves and the bucket's split count.
            h_kv = st.paged.num_kv_heads
            from llamadist.kernels.paged_attention import splits_for
            batch.cached[("kernel", h_kv)] = (
                batch.block_tables, batch.seq_lens,
                splits_for(dev, size * h_kv, self.max_blocks * st.paged.block_size))
            bk = self.buckets[size] = PagedBucket(size, x, packed, batch)
        return bk

    def step(self, bk: PagedBucket) -> torch.Tensor:
        """Run (replay) the loaded bucket -> its whole output (Nb rows)."""
        return self.run(bk)

    def _forward(self, bk: PagedBucket) -> torch.Tensor:
        st = self.stage
        return st.model(bk.x, bk.batch.positions.view(bk.size, 1), PagedStep(st.paged, bk.batch),
                        0, None, "last", self.layers(bk),
                        logits_index=bk.batch.last_token_index)


class PagedGraphs:
    """The engine's decode-only paged steps through per-stage graphs (``stages`` in
    pipeline order, each with its paged cache)."""

    def __init__(self, stages: Sequence[Stage], max_batch: int, *,
                 compile_layers: bool | Sequence[bool] = True, capture: bool = True,
                 compile_cache: str | None = None, compile_from: int | Sequence[int] = 1):
        self.stages = list(stages)
        self.sizes = bucket_sizes(max_batch)
        self.block_size = self.stages[0].paged.block_size
        self.max_blocks = -(-max(s.max_seq_len for s in self.stages) // self.block_size)
        n = len(self.stages)
        self.decoders = [PagedStageDecoder(s, self.max_blocks, compile_layers=c,
                                           capture=capture, compile_cache=compile_cache,
                                           compile_from=f)
                         for s, c, f in zip(self.stages, per_stage(compile_layers, n),
                                            per_stage(compile_from, n))]

    @staticmethod
    def supports(stages: Sequence[Stage]) -> bool:
        """Every stage on CUDA with a paged cache and the paged decode kernel."""
        return all(s.device.type == "cuda" and s.paged is not None
                   and s.paged.decode_fn is not None for s in stages)

    def accepts(self, batch: PagedBatch) -> bool:
        return (batch.is_decode and batch.block_size == self.block_size
                and batch.block_tables.shape[1] <= self.max_blocks)

    @property
    def prepare_s(self) -> float:
        return sum(d.prepare_s for d in self.decoders)

    def captures(self, num_seqs: int) -> int | None:
        """The bucket a step of ``num_seqs`` sequences would first capture graphs of (not
        captured yet on some stage), or None."""
        size = bucket_for(num_seqs, self.sizes)
        cold = any(d.capture and (size not in d.buckets or d.buckets[size].graph is None)
                   for d in self.decoders)
        return size if cold else None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, batch: PagedBatch,
                timed: bool = False) -> torch.Tensor:
        """tokens (S,) on the first stage's device (or, when the first stage has no
        embedding, as in a pipeline rank, its input hidden state (S, 1, D)), ``batch``
        decode-only on the host -> logits (S, V) (or the last stage's hidden state), a view
        of a static buffer: read it before the next step."""
        s = batch.num_seqs
        size = bucket_for(s, self.sizes)
        packed = pack_decode(batch.to("cpu"), size, self.max_blocks)  # host, one copy each
        if self.stages[0].device.type == "cuda":
            packed = packed.pin_memory()  # so the copies below do not wait for the device
        x = tokens.view(s, 1) if tokens.dim() == 1 else tokens
        for stage, dec in zip(self.stages, self.decoders):
            bk = dec.bucket(size, stage.has_embed, x.shape[-1])
            crossing = x.device != stage.device
            if crossing:  # timed: the hidden state's crossing is transfer_s, the rest compute_s
                stage.stats.bytes_in += x.nbytes
                t0 = stage.timer.start(stage.device, after=x.device) if timed else None
                bk.x[:s].copy_(x, non_blocking=True)
                if timed:
                    stage.timer.stop(t0, stage.device, stage.stats, "transfer_s")
            t0 = stage.timer.start(stage.device) if timed else None
            bk.packed.copy_(packed, non_blocking=True)
            if not crossing:
                bk.x[:s].copy_(x, non_blocking=True)
            x = dec.step(bk)[:s]
            if timed:
                stage.timer.stop(t0, stage.device, stage.stats, "compute_s")
            stage.stats.calls += 1
        return x
