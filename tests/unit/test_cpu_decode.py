"""The CPU decode kernels (llamadist/kernels/cpu_decode.c) against the PyTorch paths they
replace: the linear against F.linear in float64, the one-call decoder layer against
DecoderLayer.forward_deferred (output and the K/V it writes), and the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llamadist.config import RuntimeConfig
from llamadist.kernels import cpu_decode
from llamadist.model.llama import Llama
from llamadist.model.rope import RotaryTable
from llamadist.runtime.engine import Engine
from llamadist.runtime.kv_cache import KVCache
from tests.tiny import random_fused_llama

pytestmark = pytest.mark.skipif(not cpu_decode.available(),
                                reason="no C compiler: the kernels cannot be built here")


@pytest.mark.parametrize("rows", [1, 2, 5, cpu_decode.MAX_ROWS])
@pytest.mark.parametrize("n,k", [(64, 64), (13, 7), (200, 576), (9, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(rows, n, k, bias):
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    assert cpu_decode.takes(x, w)
    y = cpu_decode.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_linear_keeps_leading_dims_and_strided_input():
    x = torch.randn(2, 1, 24)[..., :16]  # rows of a wider tensor: last dim strided by 24
    w = torch.randn(40, 16)
    y = cpu_decode.linear(x, w)
    assert y.shape == (2, 1, 40)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_leaves_other_calls_to_torch():
    w = torch.randn(32, 16)
    assert not cpu_decode.takes(torch.randn(cpu_decode.MAX_ROWS + 1, 16), w)  # prefill: GEMM
    assert not cpu_decode.takes(torch.randn(1, 16, dtype=torch.bfloat16), w.bfloat16())
    assert not cpu_decode.takes(torch.randn(1, 16), w.t().contiguous().t())  # strided weight
    assert not cpu_decode.takes(torch.randn(1, 15), w)  # shape mismatch: F.linear's error
    with pytest.raises(RuntimeError):
        cpu_decode.linear(torch.randn(1, 15), w)
    x = torch.randn(1, 16, requires_grad=True)
    assert not cpu_decode.takes(x, w)
    cpu_decode.linear(x, w).sum().backward()  # autograd still works: it went to F.linear
    assert x.grad is not None


CONFIGS = {
    "gqa": dict(hidden_size=64, intermediate_size=160, num_attention_heads=8,
                num_key_value_heads=2),
    "mha_bias": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    # nothing a multiple of 8: the kernels' tails
    "odd": dict(hidden_size=36, intermediate_size=44, num_attention_heads=3,
                num_key_value_heads=1, head_dim=10),
    # heads of 76: the attention's value rows 64 at a time, then 8, then one by one
    "wide_heads": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=76),
}


def random_layer_model(kind: str, seed: int = 0) -> Llama:
    return random_fused_llama(seed, **CONFIGS[kind])


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("batch,masked", [(1, False), (3, False), (3, True)])
def test_decode_layer_matches_pytorch_layer(kind, batch, masked):
    model = random_layer_model(kind)
    cfg = model.config
    layer = model.model.layers["1"]
    start = 11
    caches = [KVCache(cfg, [1], batch + 1, 32, "cpu", torch.float32) for _ in range(2)]
    for c in caches[1:]:  # the same history in both caches
        c.layer(1).kv.copy_(caches[0].layer(1).kv.normal_())
    h = torch.randn(batch, 1, cfg.hidden_size)
    pending = torch.randn(batch, 1, cfg.hidden_size)
    rope = RotaryTable(cfg, 64, "cpu")
    positions = torch.tensor([[start - i] for i in range(batch)])
    cos, sin = rope.lookup(positions, torch.float32)
    mask = None
    if masked:  # left padding: sequence i sees slots [i, start]
        mask = torch.arange(start + 1)[None, :] >= torch.arange(batch)[:, None]
        mask = mask[:, None, None, :]
    h_before = h.clone()
    with torch.inference_mode():
        x, p = layer.forward_deferred(h, pending, cos, sin, caches[0].layer(1), start, mask)
        ref = x + p
        out, none = cpu_decode.decode_layer(layer, h, pending, cos, sin, caches[1].layer(1),
                                            start, mask)
    assert none is None
    assert torch.equal(h, h_before)  # the caller's tensor is not written
    assert "_cpu_decode" in layer.__dict__  # it took the C path, not the fallback
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(caches[1].layer(1).kv, caches[0].layer(1).kv, rtol=1e-6, atol=1e-6)


def test_decode_layer_falls_back_where_it_does_not_apply():
    model = random_layer_model("gqa")
    layer = model.model.layers["0"]
    cfg = model.config
    cache = KVCache(cfg, [0], 1, 16, "cpu", torch.float32).layer(0)
    cos, sin = RotaryTable(cfg, 16, "cpu").lookup(torch.tensor([[3, 4]]), torch.float32)
    h = torch.randn(1, 2, cfg.hidden_size)  # two tokens: a prefill, not a decode step
    with torch.inference_mode():
        _, pending = cpu_decode.decode_layer(layer, h, None, cos, sin, cache, 3, None)
    assert pending is not None and "_cpu_decode" not in layer.__dict__
    # A write past the cache's end: the cache's own error, from the fallback.
    with pytest.raises(IndexError, match="KV cache holds 16"), torch.inference_mode():
        cpu_decode.decode_layer(layer, h[:, :1], None, cos[:, :, :1], sin[:, :, :1], cache, 16,
                                None)


def test_layer_args_rebuilt_when_weights_change():
    model = random_layer_model("gqa")
    layer = model.model.layers["0"]
    first = cpu_decode._layer_weights(layer)
    assert cpu_decode._layer_weights(layer) is first
    layer.mlp.down_proj.weight = torch.nn.Parameter(layer.mlp.down_proj.weight.clone(),
                                                    requires_grad=False)
    assert cpu_decode._layer_weights(layer) is not first


def test_without_a_compiler_decode_still_runs_and_says_why(tiny_model, tmp_path):
    """No C compiler: one warning naming the fix, and the same tokens from PyTorch's path."""
    code = ("import sys, json; from llamadist import LLM; "
            "llm = LLM(sys.argv[1]); "
            "r = llm.generate(['The quick brown'], max_new_tokens=8); print(json.dumps(r[0].token_ids))")
    runs = {}
    for name, env in {"kernels": {}, "no compiler": {"CC": "/nonexistent/cc"}}.items():
        full = dict(os.environ, LLAMADIST_CACHE=str(tmp_path / name), **env)
        res = subprocess.run([sys.executable, "-c", code, str(tiny_model)], env=full,
                             capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0, res.stderr
        runs[name] = res
    assert runs["kernels"].stdout == runs["no compiler"].stdout
    err = runs["no compiler"].stderr
    assert "CPU decode kernels are unavailable" in err and "/nonexistent/cc" in err
    assert "Install a C compiler" in err
    assert "unavailable" not in runs["kernels"].stderr
    assert list((tmp_path / "kernels" / "kernels").glob("cpu_decode-*.so"))


def _greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` through the engine's eager steps (batch 1)."""
    ids = torch.tensor([prompt])  # (1, T)
    t = ids.shape[1]
    out = []
    with torch.inference_mode():
        logits = engine.forward(ids, torch.arange(t).view(1, t), 0)  # (1, 1, V)
        for i in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = engine.forward(torch.tensor([[tok]]), torch.tensor([[t + i]]), t + i)
    return out


def test_cpu_kernels_are_the_default_and_change_no_token(tiny_model):
    """The kernel pass runs by default on the CPU (CpuLinear, the C decoder layer as
    layer_fn, and the C layer really serves a decode step); RuntimeConfig(cpu_kernels=False)
    leaves the pure model; both give the same greedy tokens."""
    fast = Engine.load(str(tiny_model), max_seq_len=64)
    plain = Engine.load(str(tiny_model), max_seq_len=64,
                        runtime=RuntimeConfig(cpu_kernels=False))
    model = fast.stages[0].model
    assert fast.stages[0].layer_fn is cpu_decode.decode_layer
    assert type(model.lm_head) is cpu_decode.CpuLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives
    assert all(type(layer.self_attn.qkv_proj) is cpu_decode.CpuLinear
               and type(layer.mlp.down_proj) is cpu_decode.CpuLinear
               for layer in model.model.layers.values())
    assert plain.stages[0].layer_fn is None
    assert not any(isinstance(m, cpu_decode.CpuLinear) for m in plain.stages[0].model.modules())
    prompt = [5, 17, 42, 8, 99, 3]
    tokens = _greedy(fast, prompt, 12)
    assert all("_cpu_decode" in layer.__dict__ for layer in model.model.layers.values())
    assert not any("_cpu_decode" in layer.__dict__
                   for layer in plain.stages[0].model.model.layers.values())
    assert tokens == _greedy(plain, prompt, 12)


@pytest.mark.parametrize("int8_x", [False, True], ids=["float-x", "int8-x"])
@pytest.mark.parametrize("qtype", [3, 8], ids=["Q4_1", "Q8_0"])
def test_quantized_decode_layer_same_at_every_team_size(qtype, int8_x):
    """GGUF-block weights through the C layer: each thread prepares its own normed and
    quantized inputs in its share of the scratch, so 1, 2 or 3 threads (more than this
    machine's cores) give the same bits, and float x equals the PyTorch layer on the
    dequantized weights."""
    import numpy as np

    from llamadist.kernels.quant import QuantizedTensor
    from tests.quant_blocks import random_blocks

    model = random_layer_model("gqa")  # every linear input a multiple of 32
    layer = model.model.layers["1"]
    rng = np.random.default_rng(qtype)
    mods = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)
    for m in mods:  # the reference keeps float Parameters holding the dequantized blocks
        n, k = m.weight.shape
        qt = QuantizedTensor(torch.from_numpy(random_blocks(qtype, n, k, rng)), qtype, (n, k))
        qt.int8_x = int8_x
        with torch.no_grad():
            m.weight.copy_(qt.dequantize())
        m.quantized = qt
    cfg, start, batch = model.config, 11, 2
    cache = KVCache(cfg, [1], batch, 32, "cpu", torch.float32)
    cache.layer(1).kv.normal_()
    history = cache.layer(1).kv.clone()
    h = torch.randn(batch, 1, cfg.hidden_size)
    cos, sin = RotaryTable(cfg, 64, "cpu").lookup(torch.tensor([[start]] * batch), torch.float32)
    with torch.inference_mode():
        ref = sum(layer.forward_deferred(h, None, cos, sin, cache.layer(1), start, None))
    for m in mods:
        m._parameters.pop("weight")
        m.weight = m.quantized
    outs, threads = [], torch.get_num_threads()
    try:
        for team in (1, 2, 3):
            torch.set_num_threads(team)
            cache.layer(1).kv.copy_(history)
            with torch.inference_mode():
                outs.append(cpu_decode.decode_layer(layer, h, None, cos, sin, cache.layer(1),
                                                    start, None)[0])
    finally:
        torch.set_num_threads(threads)
    assert "_cpu_decode" in layer.__dict__  # the C path, over the blocks
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    err = (outs[0] - ref).abs().max() / ref.abs().max()
    assert err <= (3e-2 if int8_x else 1e-5), err
    assert int8_x == (err > 1e-5)  # int8 x rounds: it is not the float path
