"""The split count of the split-KV decode attention (llamadist/kernels/decode_attention.py):
pure Python, so its promise is checked here without a GPU. The kernel itself is tested
against SDPA in tests/gpu/test_cuda_graph.py."""

from __future__ import annotations

import math

import pytest

from llamadist.kernels.decode_attention import BLOCK_N, MAX_SPLITS, num_splits


def test_num_splits_examples():
    # An H100 (132 SMs), Llama-3-8B at batch 1 (8 KV heads): 33 wanted -> 64, but a
    # 640-slot cache has 10 tiles of 64, so 8 splits, each with a tile to read.
    assert num_splits(132, 8, 640) == 8
    assert num_splits(132, 8, 131072) == 64   # long cache: ~2 per SM, then MAX_SPLITS
    assert num_splits(132, 256, 640) == 2     # batch 32: the rows fill the SMs already
    assert num_splits(132, 8, 10) == 1        # one tile


@pytest.mark.parametrize("sms", [1, 8, 108, 132])
def test_num_splits_keeps_its_promise(sms):
    """A power of two, at most the cache's tiles and MAX_SPLITS, and otherwise at least
    the ~2 programs per multiprocessor it aims for."""
    for rows in (1, 2, 3, 8, 24, 256, 1024):
        want = -(-2 * sms // rows)
        for slots in (1, 63, 64, 65, 128, 640, 1000, 4224, 131072):
            n = num_splits(sms, rows, slots)
            tiles = -(-slots // BLOCK_N)
            assert n >= 1 and n & (n - 1) == 0, (sms, rows, slots, n)
            assert n <= tiles and n <= MAX_SPLITS, (sms, rows, slots, n)
            below_tiles = 1 << int(math.log2(tiles))
            assert n >= min(want, below_tiles, MAX_SPLITS), (sms, rows, slots, n)

