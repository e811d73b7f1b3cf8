"""kernel_passes.decode_linears (a stage's linears in the order a decode step runs them) and
chain_prefetch (each int4 decode-rows linear given the next one's weight to prefetch into
L2: cuda_int4.PREFETCH), on tiny models: unfused and fused projections, a middle stage
without embedding or head, a sparse-MoE layer."""

from __future__ import annotations

import torch

from llamadist.config import ModelConfig
from llamadist.kernels import wquant as W
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.runtime.kernel_passes import chain_prefetch, decode_linears


def _cfg(**kw) -> ModelConfig:
    kw = {"num_layers": 3, **kw}
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_heads=2,
                       num_kv_heads=1, head_dim=32, **kw)


def _names(model, mods) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in mods]


def test_order_unfused_and_fused():
    model = Llama(_cfg())
    per = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert _names(model, decode_linears(model)) == \
        [f"model.layers.{i}.{p}" for i in range(3) for p in per] + ["lm_head"]
    fuse_projections(model)
    per = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert _names(model, decode_linears(model)) == \
        [f"model.layers.{i}.{p}" for i in range(3) for p in per] + ["lm_head"]


def test_a_middle_stage_and_a_moe_layer():
    model = Llama(_cfg(), range(1, 2), has_embed=False, has_head=False)
    assert _names(model, decode_linears(model))[-1] == "model.layers.1.mlp.down_proj"
    moe = Llama(_cfg(num_experts=4, num_experts_per_tok=2))
    names = _names(moe, decode_linears(moe))
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert not any("expert" in n for n in names) and names[-1] == "lm_head"
    assert decode_linears(torch.nn.Linear(4, 4)) == []


def _int4(lin: torch.nn.Linear, rows: bool) -> torch.nn.Linear:
    w = lin.weight.detach()
    del lin.weight
    lin.weight = W.quantize_int4(w, 32)
    lin = W.as_packed_linear(lin, "torch", torch.bfloat16)
    assert lin.path == "tinygemm" and lin.tg_next is None
    lin.tg_rows = rows  # as int4_rows_ok says on a GPU (never on the CPU)
    return lin


def test_chain_links_the_decode_rows_linears_in_order_and_wraps():
    model = fuse_projections(Llama(_cfg()))
    mods = decode_linears(model)
    for i, m in enumerate(mods[:-1]):  # the head stays bf16; one o_proj takes no rows
        _int4(m, rows=i != 5)
    chain = [m for i, m in enumerate(mods[:-1]) if i != 5]
    assert chain_prefetch(model) == len(chain) == 11
    for a, b in zip(chain, chain[1:] + chain[:1]):
        assert a.tg_next is b.tg_weight
    assert mods[5].tg_next is None and not hasattr(mods[-1], "tg_next")
    # not a buffer: the next module's own tensor, not counted or moved twice
    assert all("tg_next" not in n for n, _ in model.named_buffers(remove_duplicate=False))


def test_fewer_than_two_links_nothing():
    model = fuse_projections(Llama(_cfg(num_layers=1)))
    only = _int4(decode_linears(model)[0], rows=True)
    assert chain_prefetch(model) == 0 and only.tg_next is None
