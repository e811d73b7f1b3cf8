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


def _tiny_model():
    from llamadist.config import ModelConfig
    from llamadist.model.llama import Llama
    cfg = ModelConfig.from_hf_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=32,
                                        hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, rms_norm_eps=1e-5,
                                        rope_theta=10000.0))
    return Llama(cfg)


def test_decode_attention_is_chosen_by_the_runtime_config():
    """The split-KV attention is a pass over the model, chosen by RuntimeConfig (never an
    environment variable); the model's own is SDPA."""
    import torch

    from llamadist.config import RuntimeConfig
    from llamadist.model.llama import Attention, sdpa_decode_attention
    from llamadist.runtime.kernel_passes import apply_kernel_passes, split_kv_decode_attention

    def attentions(model):
        return {m.decode_attention for m in model.modules() if isinstance(m, Attention)}

    cuda = torch.device("cuda", 0)  # the pass only reads the device type
    model = _tiny_model()
    assert attentions(model) == {sdpa_decode_attention}
    apply_kernel_passes(model, cuda, RuntimeConfig(decode_attention="sdpa"))
    assert attentions(model) == {sdpa_decode_attention}
    apply_kernel_passes(model, torch.device("cpu"), RuntimeConfig(cpu_kernels=False))
    assert attentions(model) == {sdpa_decode_attention}  # no Triton kernel on the CPU
    apply_kernel_passes(model, cuda, RuntimeConfig())
    assert attentions(model) == {split_kv_decode_attention}
    apply_kernel_passes(model, cuda, RuntimeConfig(decode_attention="sdpa"))
    assert attentions(model) == {sdpa_decode_attention}  # and back, on the same model


def test_split_kv_attention_falls_back_to_sdpa_where_the_kernel_cannot_run():
    """On the CPU (or with an int start) the swapped-in attention is exactly SDPA's."""
    import torch

    from llamadist.model.llama import sdpa_decode_attention
    from llamadist.runtime.kernel_passes import split_kv_decode_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 3, 16, generator=g)          # (B, H_kv, G, D)
    k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(2))  # (B, H_kv, S, D)
    angle = torch.rand(2, 1, 1, 8, generator=g)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    for start in (8, torch.tensor(8)):
        got = split_kv_decode_attention(q, k, v, None, start, cos, sin)
        assert torch.equal(got, sdpa_decode_attention(q, k, v, None, start, cos, sin))
