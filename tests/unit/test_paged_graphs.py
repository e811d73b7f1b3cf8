"""The paged decode graphs' bookkeeping (llamadist/runtime/paged_graphs.py), without CUDA:
bucket choice, padding rows, the static buffer filled right, and the static batch's views.
The captured graphs themselves: tests/gpu/test_paged_gpu.py."""

from __future__ import annotations

import pytest
import torch

from llamadist.runtime.cuda_graph import bucket_sizes
from llamadist.runtime.paged_graphs import bucket_for, pack_decode, packed_len, static_batch
from llamadist.runtime.paged_kv import PagedBatch


def test_bucket_for():
    sizes = bucket_sizes(24)  # [1, 2, 4, 8, 16, 24]
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 17, 24)] == [1, 2, 4, 8, 16, 24, 24]
    assert bucket_for(25, sizes) == 32 and bucket_for(100, sizes) == 128  # past the plan


def _decode_batch():
    # Three sequences of 5, 17 and 1 tokens (block size 4), each decoding its last one.
    chunks = [([3, 7], 4, 1), ([9, 2, 5, 6, 8], 16, 1), ([4], 0, 1)]
    return PagedBatch.build(chunks, 4)


def test_pack_decode_rows_and_padding():
    batch = _decode_batch()
    size, mb = 4, 6
    packed = pack_decode(batch, size, mb)
    assert packed.dtype == torch.int32 and packed.shape == (packed_len(size, mb),)
    sb = static_batch(packed, size, mb, 4)
    assert sb.positions.tolist() == [4, 16, 0, 0]
    # slot = block * 4 + offset: position 4 -> block 7 offset 0, 16 -> block 8, 0 -> block 4
    assert sb.slot_mapping.tolist() == [28, 32, 16, 0]   # padding: the null block's slot 0
    assert sb.seq_lens.tolist() == [5, 17, 1, 1]         # padding attends over one slot
    assert sb.block_tables.tolist() == [[3, 7, 0, 0, 0, 0], [9, 2, 5, 6, 8, 0],
                                        [4, 0, 0, 0, 0, 0], [0] * 6]
    assert sb.last_token_index.tolist() == [0, 1, 2, 3]
    assert sb.is_decode and sb.token_shape == (4, 1)
    # The static batch's tensors are views of the one buffer a step copies into.
    for t in (sb.positions, sb.slot_mapping, sb.seq_lens, sb.block_tables):
        assert t.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert sb.block_tables.stride() == (mb, 1)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_every_part_of_a_bucket_s_buffer_is_16_byte_aligned(size):
    """The Triton kernels specialize on their pointers' 16-byte alignment: parts of the
    buffer at odd offsets would compile the kernels again for small buckets."""
    batch = PagedBatch.build([([3], 0, 1)], 4)
    sb = static_batch(pack_decode(batch, size, 6), size, 6, 4)
    for t in (sb.positions, sb.slot_mapping, sb.seq_lens, sb.block_tables):
        assert t.data_ptr() % 16 == 0
    assert sb.seq_lens.tolist() == [1] * size and sb.positions.tolist() == [0] * size


def test_pack_decode_refuses_what_does_not_fit():
    batch = _decode_batch()
    with pytest.raises(ValueError):
        pack_decode(batch, 2, 6)        # 3 sequences, 2 rows
    with pytest.raises(ValueError):
        pack_decode(batch, 4, 4)        # 5 blocks, 4 columns
    prefill = PagedBatch.build([([1, 2], 0, 5)], 4)
    with pytest.raises(ValueError):
        pack_decode(prefill, 4, 6)


def test_refilling_a_bucket_clears_the_previous_step():
    """A smaller step after a larger one leaves no stale rows: every row is rewritten."""
    size, mb = 4, 6
    buf = torch.full((packed_len(size, mb),), 99, dtype=torch.int32)
    buf.copy_(pack_decode(_decode_batch(), size, mb))
    buf.copy_(pack_decode(PagedBatch.build([([5], 2, 1)], 4), size, mb))
    sb = static_batch(buf, size, mb, 4)
    assert sb.positions.tolist() == [2, 0, 0, 0]
    assert sb.slot_mapping.tolist() == [22, 0, 0, 0]
    assert sb.seq_lens.tolist() == [3, 1, 1, 1]
    assert sb.block_tables.tolist() == [[5, 0, 0, 0, 0, 0]] + [[0] * 6] * 3


def test_each_stage_compiles_as_its_own_flag_says(tiny_model, monkeypatch):
    """An in-process pipeline decides torch.compile stage by stage (a stage with
    GPU-quantized weights compiles, a dense one beside it need not): the graphs take one
    flag per stage (or one for all), and refuse a count that is not the stages'."""
    from llamadist import config
    from llamadist.runtime import cuda_graph, paged_graphs
    from llamadist.runtime.engine import Engine
    marker = object()
    monkeypatch.setattr(cuda_graph, "compiled_layer_call", lambda pdl=False: marker)
    model = Engine.load(str(tiny_model), devices=["cpu", "cpu"],
                        layer_ranges=[range(0, 2), range(2, 5)], max_batch=2, max_seq_len=32,
                        runtime=config.RuntimeConfig(max_seq_len=32, max_batch=2))
    assert model.compile_layers == (False, False)  # CPU stages: nothing compiles
    model.init_paged(8, 4)
    graphs = paged_graphs.PagedGraphs(model.stages, 2, compile_layers=(True, False),
                                      capture=False)
    assert [d.layer_fn for d in graphs.decoders] == [marker, None]
    graphs = paged_graphs.PagedGraphs(model.stages, 2, compile_layers=False, capture=False)
    assert [d.layer_fn for d in graphs.decoders] == [None, None]
    # where compiling pays only past some rows, the buckets of fewer capture eager layers
    assert model.compile_from == (1, 1)
    graphs = paged_graphs.PagedGraphs(model.stages, 4, compile_layers=True, capture=False,
                                      compile_from=(1, 3))
    rows = [graphs.decoders[i].bucket(b, i == 0, 64) for i in (0, 1) for b in (2, 4)]
    assert [graphs.decoders[0].layers(bk) for bk in rows[:2]] == [marker, marker]
    assert [graphs.decoders[1].layers(bk) for bk in rows[2:]] == [None, marker]
    with pytest.raises(ValueError, match="3 flags for 2 stages"):
        paged_graphs.PagedGraphs(model.stages, 2, compile_layers=(True,) * 3, capture=False)


def test_an_eager_bucket_failing_is_not_taken_for_a_compile_failure():
    """A stage whose layers compile only from some rows on (compile_from): a bucket below
    them that fails raises its error (its eager layers failed, not the compiler) and
    keeps the compiled layer for the larger buckets; a compiled bucket that fails is
    captured over the eager layers instead, as before."""
    from types import SimpleNamespace

    from llamadist.runtime.cuda_graph import GraphCapture
    marker = object()

    class Stub(GraphCapture):
        layer_fn, compile_from = marker, 9

        def __init__(self, fails):
            self.fails, self.ran = fails, []

        def _forward(self, bk):
            layer = self.layers(bk)
            self.ran.append((bk.size, layer))
            if (bk.size, layer) in self.fails:
                raise RuntimeError(f"bucket {bk.size} failed")

    eager = Stub({(4, None)})
    with pytest.raises(RuntimeError, match="bucket 4 failed"):
        eager._warmup(SimpleNamespace(size=4))
    assert eager.layer_fn is marker and eager.ran == [(4, None)]
    compiled = Stub({(16, marker)})
    compiled._warmup(SimpleNamespace(size=16))
    assert compiled.layer_fn is None
    assert compiled.ran == [(16, marker), (16, None), (16, None)]
