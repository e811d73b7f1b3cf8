"""Paged decode attention in Triton: one query token per sequence over a paged KV cache.

The cache of one layer is (2, num_blocks, H_kv, block_size, D) (llamadist.runtime.paged_kv):
a sequence's slot p lives in block ``block_tables[s, p // block_size]`` at offset
``p % block_size``. The kernel reads each sequence's block table and its live length
(``seq_lens``) from the device, so a CUDA graph captured with block tables padded to a
fixed width stays valid as sequences grow, and a step pays only for the slots each
sequence holds. Like llamadist.kernels.decode_attention it splits a sequence's slots
over SPLITS programs per (sequence, KV head) and merges their partial softmaxes in a
second kernel; with one split the first kernel writes the normalised output itself.
The G query heads of a KV head are the rows of one tile, so each K/V tile is read once
for all of them. A tile is BLOCK_N slots gathered across blocks (any block_size), and
accumulation is in float32 for fp16/bf16/fp32 inputs.

``paged_decode`` also writes the step's K/V at ``slot_mapping`` first (one small kernel;
none where q | k | v's int4 kernel stored them already: k and v None), and the pair is one
custom op, ``llamadist::paged_decode``, that mutates the cache, so
torch.compile keeps it opaque inside a compiled decoder layer and orders it after the
projections that feed it. The kernels themselves (and triton) are in
llamadist.kernels.gpu.paged_attention, imported on the op's first call
(llamadist.kernels.gpu says why).
"""

from __future__ import annotations

import functools

import torch

from llamadist.kernels import gpu

BLOCK_N = 64  # KV slots per tile
MAX_SPLITS = 64
# The slots a split's range is a multiple of: a sequence's slots are cut into ``splits``
# ranges of ceil(length / splits) rounded up to it. Below BLOCK_N a short sequence spreads
# over more programs, each reading part of one tile (the rest of the tile masked: no bytes
# read); a long one's programs walk no more tiles than at a grain of BLOCK_N (a range of
# 80 slots at grain 16: a whole tile and one of 16 rows), though more of them may hold
# slots. On an H200 at 192 slots a 32-slot tile took 0.015 ms off int4's batch-1 step and
# added 0.05 at 4 096 slots, where each program walked two tiles (RESULTS.md, session 37);
# a grain of 32 or 16 under 64-slot tiles is to keep the first without the second. 64
# until timed (gpu_session.sh attn38).
SPLIT_GRAIN = BLOCK_N
# With dependent launches (llamadist.kernels.gpu.dependent_launches), the split kernel
# loads its first tile of K and V before it waits for the kernel before it (q | k | v's
# projection, or the K/V write), all but this step's slot, which it loads after: those
# loads then overlap that kernel instead of following it. Its length, block table and
# tile loads are a chain of three reads before the wait (and before it lets the next
# kernel launch, unless gpu.TRIGGER_FIRST). Off: not yet timed (gpu_session.sh attn38).
EARLY_TILE = False
# The fewest grains (SPLIT_GRAIN slots; tiles until grains were apart from them) a split
# is given at the bucket's longest sequence: each split past one costs the merge kernel
# (its launch, about 2 us of a decode step's chain on an H200), so a short sequence is not
# split into one-grain programs (1: as many splits as grains).
MIN_SPLIT_TILES = 1
# Warps a program of the split kernel. Its K and V tiles already come in through one
# cp.async ring (Triton's 2 stages issue a tile's K and V together); what the warps change
# is how the softmax's row max and sum cross them (through shared memory, barriers). Not
# yet timed against 4 (gpu_session.sh attn37).
SPLIT_WARPS = 4
LOG2E = 1.4426950408889634


def usable(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether the kernel serves q (N, H, D) over kv (2, NB, H_kv, bs, D): Triton installed,
    q and kv on one device of a dtype it takes, D at most 256."""
    return (usable_cache(kv) and q.dim() == 3 and kv.dtype == q.dtype
            and q.device == kv.device and q.shape[-1] == kv.shape[-1]
            and q.shape[1] % kv.shape[2] == 0)


def usable_cache(kv: torch.Tensor) -> bool:
    """Whether the kernel serves a query of kv's own dtype over kv (usable's part that
    does not depend on q)."""
    return (gpu.INSTALLED and kv.dim() == 5 and kv.shape[-1] <= 256 and kv.stride(-1) == 1
            and kv.dtype in (torch.float16, torch.bfloat16, torch.float32))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(rows: int, max_slots: int, multiprocessors: int = 132) -> int:
    """Programs per (sequence, KV head) for ``rows`` = S * H_kv of them over at most
    ``max_slots`` slots a sequence: about two programs per multiprocessor in all, a power
    of two (the merge kernel's tile), never more than the SPLIT_GRAIN grains of
    ``max_slots`` over MIN_SPLIT_TILES nor MAX_SPLITS. Fixed per graph bucket: it depends
    on shapes only."""
    want = max(1, -(-2 * multiprocessors // max(1, rows)))
    tiles = max(1, -(-max_slots // SPLIT_GRAIN) // MIN_SPLIT_TILES)
    up = 1 << (want - 1).bit_length()      # smallest power of two >= want
    down = 1 << (tiles.bit_length() - 1)   # largest power of two <= tiles
    return min(MAX_SPLITS, up, down)


def splits_for(device: torch.device, rows: int, max_slots: int) -> int:
    """num_splits with ``device``'s multiprocessor count (132, an H100/H200, off CUDA)."""
    mp = _multiprocessors(device.index or 0) if device.type == "cuda" else 132
    return num_splits(rows, max_slots, mp)


def _paged_decode_impl(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                       kv: torch.Tensor, slot_mapping: torch.Tensor,
                       block_tables: torch.Tensor, seq_lens: torch.Tensor,
                       splits: int) -> torch.Tensor:
    kernels = gpu.load("paged_attention")
    if k is not None:
        kernels.write_kv(k, v, kv, slot_mapping)
    return kernels.attend(q, kv, block_tables, seq_lens, splits)


_paged_decode_op = gpu.custom_op("llamadist::paged_decode", _paged_decode_impl,
                                 mutates_args=("kv",))  # out: q's shape


def paged_decode(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                 kv: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, splits: int) -> torch.Tensor:
    """A decode step's attention for one layer: write k/v (S, H_kv, D) at ``slot_mapping``
    (S,) into kv (2, NB, H_kv, bs, D) (None: written already, by q | k | v's kernel), then
    attend q (S, H, D) (rotated; heads
    h = kv_head * G + g) over each sequence's slots [0, seq_lens[s]) through its
    ``block_tables`` row (S, MB) -> (S, H, D). ``splits``: see num_splits (a power of two,
    at most MAX_SPLITS). Check ``usable`` first."""
    return _paged_decode_op(q, k, v, kv, slot_mapping, block_tables, seq_lens, splits)
