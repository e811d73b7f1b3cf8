"""The loader's pinned staging onto a GPU (llamadist.weights.loader.PinnedStaging): every
byte arrives, for tensors smaller and larger than a chunk, of any dtype, contiguous or not,
with the buffers reused many times over. Marked ``gpu``, skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from llamadist.weights.loader import PinnedStaging

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_staged_tensors_arrive_whole():
    g = torch.Generator().manual_seed(0)
    staging = PinnedStaging(torch.device("cuda:0"), chunk_bytes=1000, buffers=2)
    host = [torch.randn(37, 41, generator=g).to(torch.bfloat16),  # 3034 bytes: 4 chunks
            torch.randn(7, generator=g),                          # under one chunk
            torch.randint(-128, 127, (3001,), generator=g, dtype=torch.int8),
            torch.randn(64, 33, generator=g)[:, 1:],               # not contiguous
            torch.empty(0, 5)]
    host += [torch.randn(500 + i, generator=g) for i in range(20)]  # the buffers go round
    out = [staging.to_device(t) for t in host]
    staging.finish()
    for t, o in zip(host, out):
        assert o.device.type == "cuda" and o.dtype == t.dtype and o.shape == t.shape
        assert torch.equal(o.cpu(), t)
