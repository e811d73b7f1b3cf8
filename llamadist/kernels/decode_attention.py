"""Split-KV ("flash-decoding") attention for one query token over a static KV cache.

The CUDA-graph decode step attends over the whole preallocated cache (static shapes),
and SDPA's kernels give one thread block per (sequence, KV head): at batch 1 the 8 KV
heads of Llama-3-8B keep 8 of an H100's 132 multiprocessors busy, and every step pays
for all ``max_seq_len`` slots whatever the live length. This kernel reads the live
length (``start + 1``) from the device, so a captured graph stays valid as the
sequence grows, splits those slots over ``SPLITS`` programs per (sequence, KV head),
and skips the slots not yet written; a second kernel merges the splits' partial
softmaxes (at one split the split kernel writes the output itself: a one-tile cache, or
B * H_kv >= 2 SMs). The G query heads that share a KV head are the rows of one matrix
product per tile, so each K/V tile is read once for all of them.

Registered as the custom op ``llamadist::decode_attention`` so that torch.compile keeps
it as one opaque call inside the compiled decoder layer. The kernels themselves (and
triton) are in llamadist.kernels.gpu.decode_attention, imported on the op's first call.
"""

from __future__ import annotations

import functools
import math

import torch

from llamadist.kernels import gpu

BLOCK_N = 64  # KV slots per tile
MAX_SPLITS = 64
launches = 0  # calls that ran the kernel (captured graphs replay without calling again)


def usable(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel serves this call: CUDA, Triton installed, a power-of-two head
    size tl.dot accepts, and no mask or an additive (B, 1, 1, S) one."""
    d = q.shape[-1]
    return (gpu.INSTALLED and q.is_cuda and q.dim() == 4
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and keys.dtype == q.dtype and 16 <= d <= 256 and d & (d - 1) == 0
            and (mask is None or (mask.is_floating_point() and mask.dim() == 4
                                  and mask.shape[1] == mask.shape[2] == 1
                                  and mask.stride(-1) == 1)))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(multiprocessors: int, rows: int, max_slots: int) -> int:
    """Programs per (sequence, KV head) for ``rows`` = B * H_kv of them over a cache of
    ``max_slots`` slots: about two per multiprocessor in all (``want`` rounded up), a power
    of two (the merge kernel's tile), never more than the cache has tiles (a split past
    the last tile would only read nothing) nor MAX_SPLITS."""
    want = -(-2 * multiprocessors // rows)
    tiles = -(-max_slots // BLOCK_N)
    up = 1 << math.ceil(math.log2(max(1, want)))   # smallest power of two >= want
    down = 1 << math.floor(math.log2(max(1, tiles)))  # largest power of two <= tiles
    return min(MAX_SPLITS, up, down)


def _decode_attention_impl(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor | None, start: torch.Tensor,
                           cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    global launches
    launches += 1
    return gpu.load("decode_attention").launch(q, keys, values, mask, start, cos, sin)


_decode_attention_op = gpu.custom_op("llamadist::decode_attention",
                                     _decode_attention_impl)  # out: q's shape


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None, start: torch.Tensor,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """q (B, H_kv, G, D) against slots [0, start] of keys/values (B, H_kv, S, D), with
    an additive mask (B, 1, 1, S) or None -> (B, H_kv, G, D). With cos/sin (B, 1, 1, D),
    q is rotated (RoPE, rotate-half convention) in the kernel as it is loaded, which
    saves the separate elementwise kernel. Check ``usable`` first."""
    return _decode_attention_op(q, keys, values, mask, start, cos, sin)
