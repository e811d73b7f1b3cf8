"""huge_pages.move: the weights a CPU decode step streams, copied into one 2 MiB-aligned
arena advised MADV_HUGEPAGE, the same tensor objects pointing at it."""

from __future__ import annotations

import pytest
import torch

from llamadist.kernels import huge_pages, weight_version

needs_thp = pytest.mark.skipif(not huge_pages.available(),
                               reason="no transparent huge pages here (not Linux, or THP off)")


@needs_thp
def test_move_keeps_values_objects_and_shared_storage():
    big = torch.randn(512, 1024)  # 2 MiB: moved
    blocks = torch.randint(0, 255, (300, 4000), dtype=torch.uint8)  # 1.2 MB: moved
    small = torch.randn(16)  # below MIN_BYTES: left where it is
    tied = big  # one object listed twice (a tied head): moved once
    want = (big.clone(), blocks.clone(), small.clone())
    old = (big.data_ptr(), blocks.data_ptr(), small.data_ptr())
    version = weight_version.current()
    moved = huge_pages.move([big, blocks, small, tied])
    assert moved >= big.nbytes + blocks.nbytes
    assert weight_version.current() != version  # a cached plan checks its pointers again
    assert big.data_ptr() != old[0] and blocks.data_ptr() != old[1]
    assert small.data_ptr() == old[2]
    assert tied is big
    # one arena: the first tensor on a 2 MiB boundary, the next one after it
    assert big.data_ptr() % huge_pages.HUGE == 0
    assert blocks.data_ptr() == big.data_ptr() + big.nbytes
    for got, ref in zip((big, blocks, small), want):
        assert torch.equal(got, ref)
    big.add_(1)  # still an ordinary writable tensor
    assert torch.equal(big, want[0] + 1)


@needs_thp
def test_two_tensors_of_one_storage_still_share_it():
    a = torch.randn(1 << 19)
    b = a.view(512, 1024)  # another tensor object over the same storage
    huge_pages.move([a, b])
    assert a.data_ptr() == b.data_ptr()
    b[0, 0] = 7.0
    assert a[0].item() == 7.0


@needs_thp
def test_inference_tensors_and_parameters_move_too():
    with torch.inference_mode():
        inf = torch.randn(1 << 19)  # made under inference_mode (a loader may do so)
    param = torch.nn.Parameter(torch.randn(1 << 19))
    want = (inf.clone(), param.detach().clone())
    huge_pages.move([inf, param])
    assert inf.data_ptr() % huge_pages.HUGE == 0
    assert torch.equal(inf, want[0]) and torch.equal(param.detach(), want[1])
    assert param.requires_grad and param.is_leaf


def test_nothing_to_move_is_a_no_op():
    t = torch.randn(8)
    ptr = t.data_ptr()
    assert huge_pages.move([t, None, torch.randn(1 << 20)[::2]]) == 0
    assert t.data_ptr() == ptr
