"""The paged KV cache of one stage and the metadata of one flat, mixed batch over it.

The runtime owns the cache (DESIGN principle 6): a pool of fixed-size blocks per layer on
the stage's device. The scheduler (llamadist.engine) hands out block ids; a sequence's
block table lists its blocks in order, so its slot ``p`` (= its token at position ``p``)
lives in block ``table[p // block_size]`` at offset ``p % block_size``. Block ids mean the
same thing on every stage (each stage holds the same number of blocks for its own layers).

Layout per layer: one tensor (2, num_blocks, H_kv, block_size, D), K then V, so one KV
head's keys in one block are block_size * D contiguous floats:

* the C decode layer reads a head's keys block by block as contiguous runs, as it reads
  a static cache's row (measured on SmolLM2, 8 sequences of 1024 tokens, the C layers
  of a decode step: 49 ms static, 70 ms this layout, 80 ms with (block_size, H_kv, D)
  blocks, whose head rows lie H_kv*D apart and drag the other heads' lines along);
* the PyTorch gather is one index over (block, head) rows of (block_size, D):
  (S, H_kv, MB, block_size, D), which is (S, H_kv, L, D) by a free view, the shape SDPA
  takes, contiguous;
* the write of a step is one indexed copy of N * H_kv rows of D (each token's slot in
  each head's run);
* it is the per-block layout of vLLM's original paged-attention kernels (a head's block
  as a tile), which a Triton paged kernel reads as [block_size, D] tiles.

A step is described by a ``PagedBatch`` built from one chunk per sequence,
``(block_table, start, num_tokens)``: the sequence computes positions
[start, start+num_tokens) and its slots below ``start`` already hold its K/V.
``paged_attention.PagedStep(cache, batch)`` is the cache the model's forward takes (its layers have
``attend``: llamadist.model.cache.FlatLayerKV); llamadist.runtime.paged_attention does
the attention.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from llamadist.config import ModelConfig, to_device

# One sequence's work in a step: (block_table, start, num_tokens).
Chunk = tuple[Sequence[int], int, int]


def block_bytes(config: ModelConfig, num_layers: int, block_size: int, dtype: torch.dtype,
                num_kv_heads: int | None = None) -> int:
    """Bytes of one block id across ``num_layers`` layers: K and V of block_size tokens."""
    heads = num_kv_heads or config.num_kv_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * heads * config.head_dim * itemsize


def num_blocks_for(config: ModelConfig, layers: range | Sequence[int] | int,
                   budget_bytes: int, block_size: int, dtype: torch.dtype,
                   num_kv_heads: int | None = None) -> int:
    """How many blocks of ``block_size`` tokens fit in ``budget_bytes`` for ``layers``
    (a count, or the stage's layer ids) of ``config``; ``num_kv_heads``: this rank's
    KV heads under tensor parallelism (default all)."""
    n = layers if isinstance(layers, int) else len(layers)
    if n <= 0 or budget_bytes <= 0:
        return 0
    return budget_bytes // block_bytes(config, n, block_size, dtype, num_kv_heads)


def gather_tables(block_ids: np.ndarray, block_start: np.ndarray,
                  take: np.ndarray) -> np.ndarray:
    """(S, max(take)) int64: the first ``take[s]`` blocks of each table
    block_ids[block_start[s]:block_start[s + 1]], padded with block 0."""
    s = len(take)
    tables = np.zeros((s, int(take.max()) if s else 0), np.int64)
    if s:
        rows = np.repeat(np.arange(s), take)
        cols = np.arange(len(rows)) - np.repeat(np.cumsum(take) - take, take)
        tables[rows, cols] = block_ids[block_start[:-1][rows] + cols]
    return tables


class PagedKVCache:
    """K/V blocks for the given global layer ids: per layer (2, num_blocks, H_kv,
    block_size, D) on ``device``, zero-filled (so a gathered block that no sequence wrote yet
    holds finite values, which masked attention multiplies by zero)."""

    def __init__(self, config: ModelConfig, layer_ids: range | Sequence[int], num_blocks: int,
                 block_size: int, device: torch.device | str, dtype: torch.dtype,
                 num_kv_heads: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} "
                             f"and {block_size}")
        self.num_kv_heads = num_kv_heads or config.num_kv_heads
        self.head_dim = config.head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (2, num_blocks, self.num_kv_heads, block_size, self.head_dim)
        self.layers = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        # Decode-only steps' attention (llamadist.runtime.kernel_passes.paged_decode_fn:
        # the Triton paged kernel on CUDA); None: the PyTorch path for every step.
        self.decode_fn = None

    def kv(self, i: int) -> torch.Tensor:
        """Layer ``i``'s (2, num_blocks, H_kv, block_size, D)."""
        return self.layers[i]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.layers.values())

    def export_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The K/V of ``block_ids`` in every layer of this cache, layer by layer in
        ascending id order, as one flat CPU tensor (L * 2 * n * H_kv * block_size * D
        values): what a migration ships (another replica's same layers take it with
        ``import_blocks``)."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        parts = [self.layers[i][:, ids] for i in sorted(self.layers)]  # (2, n, H, bs, D)
        if not parts:
            return torch.empty(0, dtype=self.dtype)
        return torch.stack(parts).reshape(-1).to("cpu")

    def import_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write ``data`` (``export_blocks`` of the same layers on another replica) into
        ``block_ids``: the n blocks in the order they were exported."""
        n = len(block_ids)
        shape = (len(self.layers), 2, n, self.num_kv_heads, self.block_size, self.head_dim)
        if data.numel() != int(np.prod(shape)):
            raise ValueError(f"KV payload of {data.numel()} values does not fit {n} blocks "
                             f"of layers {sorted(self.layers)} (shape {shape})")
        data = data.to(self.device, self.dtype).reshape(shape)
        ids = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        for j, i in enumerate(sorted(self.layers)):
            self.layers[i][:, ids] = data[j]

    def check(self, batch: "PagedBatch") -> None:
        """Refuse a batch built for another block size or living on another device."""
        if batch.block_size != self.block_size:
            raise ValueError(f"batch built for block_size {batch.block_size}, cache has "
                             f"{self.block_size}")
        if batch.device != self.device:
            raise ValueError(f"batch on {batch.device}, cache on {self.device}: "
                             f"use batch.to(device)")


@dataclass
class PagedBatch:
    """One step's flat batch of N tokens from S sequences, in chunk order (sequence s's
    tokens are flat indices [query_start[s], query_start[s+1])).

    Device tensors (long): positions (N,), slot_mapping (N,) (block * block_size +
    offset of each token's slot), query_start (S+1,), seq_lens (S,) (= start +
    num_tokens), block_tables (S, MB) (each sequence's first ceil(seq_len/block_size)
    blocks, padded with block 0), last_token_index (S,) (the flat index whose logits
    get sampled). Host tuples: query_lens and starts per sequence."""
    block_size: int
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    last_token_index: torch.Tensor
    query_lens: tuple[int, ...]
    starts: tuple[int, ...]
    # (S + E,) the flat indices whose logits the last stage returns: last_token_index,
    # then E more (a request scoring its prompt); None: last_token_index alone
    logits_index: torch.Tensor | None = None
    # Derived per device on first use by llamadist.runtime.paged_attention.
    cached: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, chunks: Sequence[Chunk], block_size: int) -> "PagedBatch":
        """The batch of ``chunks`` (block_table, start, num_tokens), on the CPU."""
        s = len(chunks)
        have = np.fromiter((len(c[0]) for c in chunks), np.int64, s)
        block_start = np.zeros(s + 1, np.int64)
        np.cumsum(have, out=block_start[1:])
        flat = np.fromiter(itertools.chain.from_iterable(c[0] for c in chunks), np.int64,
                           int(block_start[-1]))
        return cls.from_arrays(np.fromiter((c[1] for c in chunks), np.int64, s),
                               np.fromiter((c[2] for c in chunks), np.int64, s),
                               block_start, flat, block_size)

    @classmethod
    def from_arrays(cls, starts: np.ndarray, qlens: np.ndarray, block_start: np.ndarray,
                    block_ids: np.ndarray, block_size: int) -> "PagedBatch":
        """The batch of S sequences given as int64 arrays: starts (S,), qlens (S,), and
        their block tables back to back, block_ids[block_start[s]:block_start[s + 1]]
        ((S + 1,) offsets), on the CPU. No Python object per sequence."""
        # numpy, not torch: torch's per-op overhead (and its threads) made this 8x slower
        # for a step of a few hundred sequences, on the host, every step
        s = len(starts)
        if not s:
            raise ValueError("a batch needs at least one sequence")
        need = -(-(starts + qlens) // block_size)  # blocks holding slots [0, start+n)
        have = np.diff(block_start)
        bad = np.flatnonzero((starts < 0) | (qlens < 1) | (have < need))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"chunk start={starts[i]} num_tokens={qlens[i]} needs {need[i]} "
                             f"blocks of {block_size}, its table has {have[i]}")
        block_tables = gather_tables(block_ids, block_start, need)  # (S, MB), padded with 0
        query_start = np.zeros(s + 1, np.int64)
        np.cumsum(qlens, out=query_start[1:])
        token_seq = np.repeat(np.arange(s), qlens)  # (N,)
        positions = np.arange(query_start[-1]) + (starts - query_start[:-1])[token_seq]
        slots = block_tables[token_seq, positions // block_size] * block_size \
            + positions % block_size  # (N,)
        t = torch.from_numpy
        return cls(block_size=block_size, positions=t(positions), slot_mapping=t(slots),
                   query_start=t(query_start), seq_lens=t(starts + qlens),
                   block_tables=t(block_tables), last_token_index=t(query_start[1:] - 1),
                   query_lens=tuple(qlens.tolist()), starts=tuple(starts.tolist()))

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence computes one token (the C decode layer's case) and only the
        last tokens' logits are wanted (the decode graphs' case)."""
        return self.num_tokens == self.num_seqs and self.logits_index is None

    @property
    def token_shape(self) -> tuple[int, int]:
        """(B, T) the flat batch takes in the model: (N, 1) for a decode step, so each
        sequence is a row as in a static decode step (the C layer's shape), else (1, N)."""
        return (self.num_tokens, 1) if self.is_decode else (1, self.num_tokens)

    def to(self, device: torch.device | str) -> "PagedBatch":
        """This batch with its tensors on ``device`` (itself if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {name: to_device(getattr(self, name), device)
                 for name in ("positions", "slot_mapping", "query_start", "seq_lens",
                              "block_tables", "last_token_index", "logits_index")
                 if getattr(self, name) is not None}
        return replace(self, **moved, cached={})
