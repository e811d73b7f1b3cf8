"""The decoder layer's norm inside the next projection's kernel (``norm_product``, where a
linear offers ``norm_forward``: int4's decode rows on CUDA, cuda_int4.launch_norm): the
wiring on the CPU, with stand-in linears that compute the norm and the product by the
reference formula, gives the layers' own outputs, and every linear that can take its norm
does (the kernel itself: tests/gpu/test_cuda_int4_gpu.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import ModelConfig
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.runtime.stage import Stage


def reference_add_norm(x, residual, weight, eps):
    s = x if residual is None else x + residual
    x32 = s.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return s, weight * normed


class NormLinear(nn.Module):
    """A linear that takes its input's norm itself, as a PackedLinear on int4's rows."""

    def __init__(self, linear: nn.Linear, calls: list):
        super().__init__()
        self.inner, self.calls = linear, calls

    def forward(self, x):
        return self.inner(x)

    def norm_forward(self, x, residual, weight, eps, glu=False):
        s, normed = reference_add_norm(x, residual, weight, eps)
        y = self.inner(normed)
        if glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        self.calls.append((x.shape, residual is not None, glu))
        return s, y


def model_and_cache(fused: bool, calls: list):
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(dict(
        architectures=["LlamaForCausalLM"], vocab_size=64, num_hidden_layers=2,
        hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0))
    model = Llama(cfg)
    with torch.no_grad():  # (the embedding is made empty: the loader fills it)
        model.model.embed_tokens.weight.normal_()
    model = fuse_projections(model).eval()
    for layer in model.model.layers.values():
        # the eager fused kernels' stand-ins (a pass sets them on CUDA)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.add_norm = reference_add_norm
        layer.mlp.silu_mul = lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
        if fused:
            layer.self_attn.qkv_proj = NormLinear(layer.self_attn.qkv_proj, calls)
            layer.mlp.gate_up_proj = NormLinear(layer.mlp.gate_up_proj, calls)
    model.setup_rope(32, "cpu")
    cache = Stage(model, torch.device("cpu"), torch.float32, 1, 32).caches[0]
    return model, cache


def test_layers_take_their_norms_in_the_projections_and_give_the_same_logits():
    calls: list = []
    outs = {}
    for fused in (False, True):
        model, cache = model_and_cache(fused, calls)
        ids = torch.tensor([[3, 7, 11]])
        with torch.no_grad():
            first = model(ids, torch.arange(3).view(1, 3), cache, 0, None)
            nxt = model(torch.tensor([[5]]), torch.tensor([[3]]), cache, 3, None)
        outs[fused] = (first, nxt)
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1])
    # two steps x two layers x (q|k|v, gate|up); the first layer's first norm has no
    # residual yet (no pending MLP output), every other one has
    assert len(calls) == 8
    assert [glu for _, _, glu in calls] == [False, True] * 4
    assert [has for _, has, _ in calls] == [False, True, True, True] * 2
