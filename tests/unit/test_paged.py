"""The paged KV cache and the flat, mixed batch (llamadist.runtime.paged_kv,
paged_attention) against the static path: each sequence of a mixed batch gets the logits
it gets alone through ``Engine.forward`` over the static cache."""

from __future__ import annotations

import ctypes

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.kernels import cpu_decode
from llamadist.runtime.engine import Engine
from llamadist.runtime.paged_attention import PagedStep
from llamadist.runtime.paged_kv import PagedBatch, block_bytes, num_blocks_for

BS = 4  # block size: small, so every sequence spans several blocks
NUM_BLOCKS = 40
TOL = dict(rtol=1e-5, atol=1e-5)


def engines(folder, cpu_kernels=False):
    """(static reference, paged engine) over the same checkpoint, float32 on the CPU."""
    runtime = RuntimeConfig(cpu_kernels=cpu_kernels)
    ref = Engine.load(str(folder), max_seq_len=64, runtime=RuntimeConfig(cpu_kernels=False))
    paged = Engine.load(str(folder), max_seq_len=64, runtime=runtime)
    paged.init_paged(NUM_BLOCKS, BS)
    return ref, paged


def alone(engine: Engine, ids: list[int]) -> torch.Tensor:
    """(V,) logits after ``ids`` through the static path, the sequence alone."""
    t = len(ids)
    with torch.inference_mode():
        return engine.forward(torch.tensor([ids]), torch.arange(t).view(1, t), 0)[0, -1]


def step(engine: Engine, seqs: list[tuple[list[int], list[int], int, int]]) -> torch.Tensor:
    """One paged step of (ids, block_table, start, n): sequence computes ids[start:start+n].
    Returns (S, V)."""
    batch = PagedBatch.build([(table, start, n) for _, table, start, n in seqs], BS)
    tokens = torch.tensor([t for ids, _, start, n in seqs for t in ids[start:start + n]])
    with torch.inference_mode():
        return engine.forward_paged(tokens, batch)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (19, 12, 7)]


# Block tables: not contiguous, scrambled order, disjoint.
TABLES = [[17, 3, 30, 8, 22], [11, 2, 35, 29], [6, 39, 14]]


@pytest.mark.parametrize("kind", ["mha", "gqa_tied", "llama3"])
def test_mixed_batch_equals_each_sequence_alone(tiny_models, kind):
    ref, paged = engines(tiny_models[kind])
    a, b, c = prompts(ref.config.vocab_size)
    # Step 1: A prefills its first 8 tokens, B its whole prompt but the last token.
    out1 = step(paged, [(a, TABLES[0], 0, 8), (b, TABLES[1], 0, 11)])
    torch.testing.assert_close(out1[0], alone(ref, a[:8]), **TOL)
    torch.testing.assert_close(out1[1], alone(ref, b[:11]), **TOL)
    # Step 2, mixed: A a chunk in the middle of its prompt, B decodes, C starts fresh.
    out2 = step(paged, [(a, TABLES[0], 8, 6), (b, TABLES[1], 11, 1), (c, TABLES[2], 0, 5)])
    assert out2.shape == (3, ref.config.vocab_size)
    for row, ids in zip(out2, (a[:14], b[:12], c[:5])):
        torch.testing.assert_close(row, alone(ref, ids), **TOL)
    # Step 3, all decodes (the decode group alone), different lengths.
    out3 = step(paged, [(a, TABLES[0], 14, 1), (c, TABLES[2], 5, 1)])
    torch.testing.assert_close(out3[0], alone(ref, a[:15]), **TOL)
    torch.testing.assert_close(out3[1], alone(ref, c[:6]), **TOL)


def test_a_sequence_does_not_depend_on_its_batch(tiny_models):
    _, solo = engines(tiny_models["gqa_tied"])
    _, crowd = engines(tiny_models["gqa_tied"])
    a, b, c = prompts(solo.config.vocab_size)
    first = step(solo, [(a, TABLES[0], 0, 9)])[0]
    mixed = step(crowd, [(b, TABLES[1], 0, 11), (a, TABLES[0], 0, 9), (c, TABLES[2], 0, 1)])
    torch.testing.assert_close(mixed[1], first, rtol=0, atol=1e-6)
    second = step(solo, [(a, TABLES[0], 9, 1)])[0]
    mixed = step(crowd, [(c, TABLES[2], 1, 4), (a, TABLES[0], 9, 1), (b, TABLES[1], 11, 1)])
    torch.testing.assert_close(mixed[1], second, rtol=0, atol=1e-6)


def test_batch_metadata():
    batch = PagedBatch.build([([7, 3, 5, 0], 8, 6), ([2, 9], 3, 1), ([9, 1], 0, 5)], 4)
    assert batch.positions.tolist() == [8, 9, 10, 11, 12, 13, 3, 0, 1, 2, 3, 4]
    assert batch.slot_mapping.tolist() == [20, 21, 22, 23, 0, 1, 11, 36, 37, 38, 39, 4]
    assert batch.query_start.tolist() == [0, 6, 7, 12]
    assert batch.seq_lens.tolist() == [14, 4, 5]
    # Each table cut to the blocks its length needs, padded with block 0.
    assert batch.block_tables.tolist() == [[7, 3, 5, 0], [2, 0, 0, 0], [9, 1, 0, 0]]
    assert batch.last_token_index.tolist() == [5, 6, 11]
    assert batch.token_shape == (1, 12) and not batch.is_decode
    decode = PagedBatch.build([([1], 0, 1), ([2, 3], 5, 1)], 4)
    assert decode.is_decode and decode.token_shape == (2, 1)
    with pytest.raises(ValueError, match="needs 4 blocks of 4, its table has 3"):
        PagedBatch.build([([7, 3, 5], 8, 6)], 4)


def test_num_blocks_for(tiny_models):
    from llamadist.weights.checkpoint import open_checkpoint
    cfg = open_checkpoint(str(tiny_models["llama3"])).config  # 2 KV heads, head_dim 32
    per_block = 4 * 2 * 16 * 2 * 32 * 4  # layers * (K, V) * tokens * heads * D * fp32
    assert block_bytes(cfg, 4, 16, torch.float32) == per_block
    assert num_blocks_for(cfg, range(4), 10 * per_block + per_block - 1, 16,
                          torch.float32) == 10
    assert num_blocks_for(cfg, [0, 1], per_block, 16, torch.float32) == 2  # half the layers
    assert num_blocks_for(cfg, 4, per_block, 16, torch.bfloat16) == 2
    assert num_blocks_for(cfg, 4, per_block, 16, torch.float32, num_kv_heads=1) == 2
    assert num_blocks_for(cfg, 4, per_block - 1, 16, torch.float32) == 0


def counting_c_layer(monkeypatch) -> dict:
    """Wrap the C decoder layer and the C whole step (llamadist.kernels.cpu_step): counts
    the layers each ran over a static cache and over a paged one (block tables)."""
    from llamadist.kernels import cpu_step
    assert cpu_decode.available()
    inner, inner_step = cpu_decode._layer_fn, cpu_step._bound()
    calls = {"static": 0, "paged": 0}

    def layer_fn(args):
        a = ctypes.cast(args, ctypes.POINTER(cpu_decode.LayerArgs)).contents
        calls["paged" if a.block_table else "static"] += 1
        inner(args)

    def step_fn(args):
        s = ctypes.cast(args, ctypes.POINTER(cpu_step.StepArgs)).contents
        calls["paged" if s.block_table else "static"] += s.n_layers
        inner_step(args)
    monkeypatch.setattr(cpu_decode, "_layer_fn", layer_fn)
    monkeypatch.setattr(cpu_step, "_step_fn", step_fn)
    return calls


@pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler")
@pytest.mark.parametrize("kind", ["mha", "gqa_tied", "llama3"])
def test_c_paged_decode_equals_pytorch_paged(tiny_models, kind, monkeypatch):
    """The C decoder layer in its block-table mode against the PyTorch paged path: the
    same logits and the same K/V written into the blocks, on decode steps only."""
    _, torch_path = engines(tiny_models[kind], cpu_kernels=False)
    _, c_path = engines(tiny_models[kind], cpu_kernels=True)
    a, b, c = prompts(torch_path.config.vocab_size)
    calls = counting_c_layer(monkeypatch)
    prefill = [(a, TABLES[0], 0, 16), (b, TABLES[1], 0, 9), (c, TABLES[2], 0, 3)]
    for engine in (torch_path, c_path):
        step(engine, prefill)
    assert calls["paged"] == 0  # a prefill is not a decode step
    for i in range(3):  # three decode steps, rows of different lengths
        seqs = [(a, TABLES[0], 16 + i, 1), (b, TABLES[1], 9 + i, 1), (c, TABLES[2], 3 + i, 1)]
        torch.testing.assert_close(step(c_path, seqs), step(torch_path, seqs), **TOL)
    layers = c_path.config.num_layers
    assert calls == {"static": 0, "paged": 3 * layers}
    for i in range(layers):
        torch.testing.assert_close(c_path.stages[0].paged.kv(i),
                                   torch_path.stages[0].paged.kv(i), **TOL)


@pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler")
@pytest.mark.parametrize("kind", ["gqa", "mha_bias", "odd"])
def test_c_paged_layer_on_odd_shapes(kind, monkeypatch):
    """One decoder layer, C block-table mode against the PyTorch paged attend: head_dim
    10 and nothing a multiple of 8 ("odd"), biases, block size 3, rows of lengths 1..8
    over scrambled blocks, with history already in the blocks."""
    from llamadist.model.rope import RotaryTable
    from llamadist.runtime.paged_kv import PagedKVCache
    from tests.unit.test_cpu_decode import random_layer_model
    model = random_layer_model(kind)
    cfg, layer = model.config, model.model.layers["1"]
    caches = [PagedKVCache(cfg, [1], 12, 3, "cpu", torch.float32) for _ in range(2)]
    caches[1].kv(1).copy_(caches[0].kv(1).normal_())
    batch = PagedBatch.build([([5, 0, 9], 7, 1), ([11], 0, 1), ([2, 8, 4], 4, 1)], 3)
    h = torch.randn(3, 1, cfg.hidden_size)
    cos, sin = RotaryTable(cfg, 16, "cpu").lookup(batch.positions.view(3, 1), torch.float32)
    calls = counting_c_layer(monkeypatch)
    with torch.inference_mode():
        x, pending = layer.forward_deferred(h, None, cos, sin,
                                            PagedStep(caches[0], batch).layer(1), 0, None)
        out, none = cpu_decode.decode_layer(layer, h, None, cos, sin,
                                            PagedStep(caches[1], batch).layer(1), 0, None)
    assert none is None and calls["paged"] == 1
    torch.testing.assert_close(out, x + pending, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(caches[1].kv(1), caches[0].kv(1), rtol=1e-6, atol=1e-6)
