"""Projection fusion: a pass over a loaded model, not part of the model's math.

Decode is memory-bound: each decoder layer's q, k and v projections read the same
input and so do gate and up. One matmul over the concatenated weight reads the input
once, launches one kernel instead of three (two) and gives cuBLAS one large matrix
instead of small ones (k/v are a quarter of q under GQA). Run it after the weights
are loaded (and after any tensor-parallel sharding: the split sizes are read from
the weights, so a shard with fewer heads fuses the same way). The original
parameters are dropped, so peak memory grows by one layer's projections only.
"""

from __future__ import annotations

import torch
from torch import nn

from llamadist.model.llama import MLP, Attention
from llamadist.model.moe import Expert


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of ``parts``' outputs, of the parts'
    own class (a kernel pass run before fusion keeps its kernel)."""
    w = torch.cat([p.weight.detach() for p in parts], dim=0)  # (sum out, in)
    has_bias = parts[0].bias is not None
    fused = type(parts[0])(w.shape[1], w.shape[0], bias=has_bias, device="meta")
    if isinstance(w, torch.Tensor):
        fused.weight = nn.Parameter(w, requires_grad=False)
    else:  # a tensor-like weight (quantized blocks, which torch.cat concatenated) as it is
        del fused.weight
        fused.weight = w
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]),
                                  requires_grad=False)
    return fused


def fuse_attention(attn: Attention) -> None:
    if attn.qkv_proj is not None:
        return
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    attn.qkv_split = tuple(p.weight.shape[0] for p in parts)
    attn.qkv_proj = _concat_linear(parts)
    del attn.q_proj, attn.k_proj, attn.v_proj  # free the originals


def fuse_mlp(mlp: MLP) -> None:
    if mlp.gate_up_proj is not None:
        return
    mlp.gate_up_proj = _concat_linear([mlp.gate_proj, mlp.up_proj])
    del mlp.gate_proj, mlp.up_proj


def fuse_expert(expert: Expert) -> None:
    if expert.w13 is not None:
        return
    expert.w13 = _concat_linear([expert.w1, expert.w3])
    del expert.w1, expert.w3


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj`` and each MoE expert's
    w1/w3 into ``w13`` in every layer of ``model`` (in place; returns it). Outputs equal
    the unfused model's up to the matmul library's summation order (bitwise on most
    paths, 1e-6 relative in fp32)."""
    # Collect only the blocks to fuse: a list of every module would keep the replaced
    # Linears (and their weights) alive until the whole pass ends.
    for module in [m for m in model.modules() if isinstance(m, (Attention, MLP, Expert))]:
        if isinstance(module, Attention):
            fuse_attention(module)
        elif isinstance(module, MLP):
            fuse_mlp(module)
        else:
            fuse_expert(module)
    return model


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, Attention) and m.qkv_proj is not None for m in model.modules())
