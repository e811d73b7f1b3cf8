"""The decoder layer's norm inside the next projection's kernel (Attention's and MLP's
``forward_normed``, where a linear offers ``norm_forward``: int4's decode rows on CUDA,
cuda_int4.launch_norm), and q | k | v's RoPE with it on a flat batch: the wiring on the
CPU, with stand-in linears that compute the norm, the product and the rotation by the
reference formula, gives the layers' own outputs, every linear that can take its norm
does, and q | k | v is asked to rotate exactly where a flat batch's fused kernels run (the
kernel itself: tests/unit/test_int4_rows_emulated.py, tests/gpu/test_cuda_int4_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import ModelConfig
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.model.rope import apply_rotary
from llamadist.runtime.stage import Stage
from tests.eager_fused_cases import OneSequence


def reference_add_norm(x, residual, weight, eps):
    s = x if residual is None else x + residual
    x32 = s.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return s, weight * normed


def reference_rope(q, k, cos, sin):  # (N, H, D), (N, H_kv, D), (N, D): rotary_qk's contract
    return apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None],
                                                                     sin[:, None])


class NormLinear(nn.Module):
    """A linear that takes its input's norm itself, as a PackedLinear on int4's rows, and
    (``rotates``) q's and k's RoPE with it where asked (the first ``rot`` columns)."""

    def __init__(self, linear: nn.Linear, calls: list, rotates: bool = True):
        super().__init__()
        self.inner, self.calls, self.rotates = linear, calls, rotates

    def forward(self, x):
        return self.inner(x)

    def norm_forward(self, x, residual, weight, eps, glu=False, rope=None):
        self.calls.append((tuple(x.shape), residual is not None, glu, rope is not None))
        if rope is not None and not self.rotates:
            return None
        s, normed = reference_add_norm(x, residual, weight, eps)
        y = self.inner(normed)
        if glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        if rope is not None:
            cos, sin, rot = rope
            y2 = y.reshape(-1, y.shape[-1])
            heads = y2[:, :rot].view(y2.shape[0], rot // cos.shape[-1], -1)
            q, _ = reference_rope(heads, heads[:, :1], cos, sin)
            y = torch.cat([q.flatten(1), y2[:, rot:]], dim=1).view(y.shape)
        return s, y


def model_and_cache(fused: bool, calls: list, rotates: bool = True):
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
        layer.self_attn.rotary_qk = lambda *a: calls.append("rotary_qk") or reference_rope(*a)
        if fused:
            layer.self_attn.qkv_proj = NormLinear(layer.self_attn.qkv_proj, calls, rotates)
            layer.mlp.gate_up_proj = NormLinear(layer.mlp.gate_up_proj, calls)
    model.setup_rope(32, "cpu")
    cache = Stage(model, torch.device("cpu"), torch.float32, 1, 32).caches[0]
    return model, cache


def test_layers_take_their_norms_in_the_projections_and_give_the_same_logits():
    """The contiguous cache's path: the norms ride in the projections, no RoPE asked."""
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
    # residual yet (no pending MLP output), every other one has; RoPE never asked
    assert len(calls) == 8
    assert [glu for _, _, glu, _ in calls] == [False, True] * 4
    assert [has for _, has, _, _ in calls] == [False, True, True, True] * 2
    assert not any(rope for *_, rope in calls)


@pytest.mark.parametrize("rotates", [True, False])
def test_a_flat_batch_takes_the_norm_and_rope_in_q_k_v(rotates):
    """A flat batch: q | k | v is asked for the norm with RoPE (cos / sin a row a token, q's
    and k's columns); where it rotates, the RoPE kernel is not called; where it declines,
    it is asked for the norm alone and the kernel rotates. The logits are those of the
    layers without any of it."""
    ids, pos = torch.tensor([[3, 7, 11, 2]]), torch.arange(4)[None]
    with torch.no_grad():
        plain = model_and_cache(False, [])[0](ids, pos, OneSequence(), 0, logits="all")
        calls: list = []
        fused = model_and_cache(True, calls, rotates)[0](ids, pos, OneSequence(), 0,
                                                          logits="all")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    x, want = (1, 4, 64), []
    for residual in (False, True):  # a layer: (x's shape, residual, glu, RoPE asked)
        want.append((x, residual, False, True))
        if not rotates:
            want += [(x, residual, False, False), "rotary_qk"]
        want.append((x, True, True, False))  # gate | up
    assert calls == want, calls
