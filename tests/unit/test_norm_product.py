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
    does what else it is asked where it ``takes`` it: "rope" (q's and k's heads rotated,
    the first ``rot`` columns), "kv" (k's and v's heads stored in the paged cache at the
    rows' slots)."""

    def __init__(self, linear: nn.Linear, calls: list, takes: tuple = ("rope", "kv")):
        super().__init__()
        self.inner, self.calls, self.takes = linear, calls, takes

    def forward(self, x):
        return self.inner(x)

    def norm_forward(self, x, residual, weight, eps, glu=False, rope=None, kv=None):
        self.calls.append((tuple(x.shape), residual is not None, glu, rope is not None,
                           kv is not None))
        if not self._takes(rope, kv):
            return None
        s, normed = reference_add_norm(x, residual, weight, eps)
        y = self.inner(normed)
        if glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return s, self._epilogue(y, rope, kv)

    def rope_forward(self, x, rope, kv=None):
        self.calls.append(("rope_forward", tuple(x.shape), kv is not None))
        return self._epilogue(self.inner(x), rope, kv) if self._takes(rope, kv) else None

    def _takes(self, rope, kv):
        return (rope is None or "rope" in self.takes) and (kv is None or "kv" in self.takes)

    @staticmethod
    def _epilogue(y, rope, kv):
        if rope is None:
            return y
        cos, sin, rot = rope
        y2 = y.reshape(-1, y.shape[-1])
        d = cos.shape[-1]
        heads = y2[:, :rot].view(y2.shape[0], rot // d, d)
        q, _ = reference_rope(heads, heads[:, :1], cos, sin)
        y2 = torch.cat([q.flatten(1), y2[:, rot:]], dim=1)
        if kv is not None:  # k's heads, then v's, at each row's slot
            cache, slots, qcols = kv
            bs = cache.shape[3]
            for r, slot in enumerate(slots.tolist()):
                cache[:, slot // bs, :, slot % bs] = y2[r, qcols:].view(2, -1, d)
        return y2.view(y.shape)


class StoringSequence(OneSequence):
    """OneSequence with a paged cache that a projection may store k and v in itself
    (``cache_slots``: the N tokens at slots 0..N-1 of blocks of 2), as the paged decode
    kernel's cache does; ``attend(q, None, None)`` then reads them from it."""

    def __init__(self, tokens: int, kv_heads: int, head_dim: int):
        self.cache = torch.zeros(2, -(-tokens // 2), kv_heads, 2, head_dim)
        self.slots = torch.arange(tokens)

    def cache_slots(self):
        return self.cache, self.slots

    def attend(self, q, k, v):
        if k is None:
            flat = self.cache.transpose(2, 3).reshape(2, -1, *self.cache.shape[2:3],
                                                      self.cache.shape[-1])
            k, v = flat[0, :q.shape[0]], flat[1, :q.shape[0]]
        return super().attend(q, k, v)


def model_and_cache(fused: bool, calls: list, takes: tuple = ("rope", "kv")):
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
            layer.self_attn.qkv_proj = NormLinear(layer.self_attn.qkv_proj, calls, takes)
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
    assert [glu for _, _, glu, _, _ in calls] == [False, True] * 4
    assert [has for _, has, _, _, _ in calls] == [False, True, True, True] * 2
    assert not any(rope or kv for *_, rope, kv in calls)


@pytest.mark.parametrize("takes", [("rope", "kv"), ("rope",), ()], ids=str)
@pytest.mark.parametrize("norm", [True, False])
def test_a_flat_batch_asks_q_k_v_for_the_most_it_takes(takes, norm):
    """A flat batch whose cache offers its slots: q | k | v is asked for RoPE with k and v
    stored in the cache, then RoPE alone, then (with the norm in its kernel) neither, and
    the first answer serves: where it stores k and v, the attention reads them from the
    cache; where it rotates, the RoPE kernel is not called. With ``norm`` the decoder
    layer's norms ride in the projections too (norm_forward), else only RoPE and the
    cache (rope_forward). The logits are those of the layers without any of it."""
    ids, pos = torch.tensor([[3, 7, 11, 2, 9]]), torch.arange(5)[None]
    with torch.no_grad():
        plain = model_and_cache(False, [])[0](ids, pos, OneSequence(), 0, logits="all")
        calls: list = []
        model = model_and_cache(True, calls, takes)[0]
        if not norm:
            for layer in model.model.layers.values():
                for n in (layer.input_layernorm, layer.post_attention_layernorm):
                    n.add_norm = None  # (the norm's own kernel off: no norm_forward asked)
        fused = model(ids, pos, StoringSequence(5, 2, 16), 0, logits="all")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    x, want = (1, 5, 64), []
    for residual in (False, True):  # a layer's asks: the most first, until one is taken
        asks = [(True, True), (True, False)] + ([(False, False)] if norm else [])
        taken = next((a for a in asks if (not a[0] or "rope" in takes)
                      and (not a[1] or "kv" in takes)), None)
        for rope, kv in asks[:asks.index(taken) + 1] if taken else asks:
            want.append((x, residual, False, rope, kv) if norm
                        else ("rope_forward", x, kv))
        if taken is None or not taken[0]:
            want.append("rotary_qk")
        if norm:
            want.append((x, True, True, False, False))  # gate | up
    assert calls == want, calls
