"""Tensor parallelism (Megatron-style) as an explicit pass over a meta-built Llama stage.

How a decoder layer is cut across the ``tp`` ranks of one tensor-parallel group:

    q_proj, k_proj, v_proj   ColumnParallelLinear  rows (output features) split by head
    o_proj                   RowParallelLinear     columns split by head; all-reduce
    gate_proj, up_proj       ColumnParallelLinear  rows split by intermediate feature
    down_proj                RowParallelLinear     columns split; all-reduce
    embed_tokens             VocabParallelEmbedding vocab rows split; masked lookup; all-reduce
    lm_head                  VocabParallelHead      vocab rows split; local logits; all-gather
    norms                    replicated
    block_sparse_moe         not split here: tensor_parallel_pass spreads the experts
                             over the same ranks (llamadist.parallel.expert, EP = TP),
                             whole experts, one all-reduce after the block

So a layer costs two all-reduces of the (B, T, D) hidden state; everything between a
column and its row partner stays local. The Llama module itself is unchanged:
``Attention`` derives head counts from the projection widths, so a rank holding
``H / tp`` query heads runs the same code.

GQA. KV heads are split when ``num_kv_heads % tp == 0``. When ``tp > num_kv_heads``
(and ``tp % num_kv_heads == 0``) they are replicated instead: rank ``r`` holds KV head
``r * num_kv_heads // tp``, the one its query heads attend with, and its KV cache holds
one head (``tp_kv_heads``). Query heads must divide by ``tp``.

The head. Each rank computes logits for its vocab slice and all-gathers them, so every
rank ends with the identical full (B, T, V) logits. A replicated head would cost every
rank the largest matrix of the model (V x D: 1 GiB in bf16 for Llama 3 8B) in memory and
in bandwidth on every decode step; the gather moves only B x V logits. Because the
gathered logits are the same bytes on every rank, greedy decoding picks the same token
everywhere, and sampling does too *provided every rank uses a generator seeded with the
same seed and calls it the same number of times* (the runtime must share the seed:
``SamplingParams(seed=None)`` draws a different random seed per process).

Order of the passes: build on meta -> pipeline cut -> ``apply_tensor_parallel`` ->
``load_weights(..., shard_fn=tp_shard_fn(...))`` (each rank reads only its slice) ->
``setup_rope`` -> optional fusion (fusing q|k|v or gate|up of the *local* shards into one
plain Linear is correct, since column-parallel layers have no collective) -> kernel passes.
``tensor_parallel_pass`` hands the first and the load's arguments to the runtime's
``build_stage`` (llamadist.runtime.stage.build_tp_stage); this package never imports the
runtime. The parallel linears multiply through ``linear_fn`` (F.linear), which the
runtime's CPU kernel pass may swap for the C GEMV.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llamadist.config import ModelConfig
from llamadist.model.llama import Llama
from llamadist.parallel.expert import apply_expert_parallel
from llamadist.parallel.tp_layout import (TensorParallelError, TPSizes, check_tp, tp_kv_heads,
                                          tp_shard_fn, tp_sizes, vocab_range)

Group = dist.ProcessGroup | None

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "VocabParallelHead", "apply_tensor_parallel", "tensor_parallel_pass", "tp_shard_fn",
           "tp_kv_heads", "tp_sizes", "check_tp", "vocab_range", "TPSizes",
           "TensorParallelError"]


# ---- the parallel modules ------------------------------------------------
def _empty_param(*shape: int, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W_local^T + b_local: this rank's slice of the output features.

    weight (out_local, in), bias (out_local,). No collective: the output stays sharded
    (heads or intermediate features) for the row-parallel partner that follows."""

    def __init__(self, in_features: int, out_local: int, bias: bool,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_local
        self.weight = _empty_param(out_local, in_features, device=torch.device(device))
        self.bias = _empty_param(out_local, device=torch.device(device)) if bias else None
        self.linear_fn = F.linear  # a kernel pass may swap it (same signature and values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fn(x, self.weight, self.bias)  # (..., in) -> (..., out_local)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: input features sharded, output replicated.

    weight (out, in_local); bias (out,) replicated and added once, after the reduce."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: Group,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.in_features, self.out_features = in_local, out_features
        self.group = group
        self.weight = _empty_param(out_features, in_local, device=torch.device(device))
        self.bias = _empty_param(out_features, device=torch.device(device)) if bias else None
        self.linear_fn = F.linear  # a kernel pass may swap it (same signature and values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_fn(x, self.weight)  # (..., in_local) -> (..., out) partial sum
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the embedding; ids outside give zeros, and the
    all-reduce adds the one rank that owns each id. weight (V_local, D)."""

    def __init__(self, vocab_size: int, dim: int, tp_rank: int, tp_size: int, group: Group,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.vocab_size, self.dim, self.group = vocab_size, dim, group
        self.vocab_start, self.vocab_end = vocab_range(vocab_size, tp_rank, tp_size)
        self.weight = _empty_param(self.vocab_end - self.vocab_start, dim,
                                  device=torch.device(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)  # (B, T)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        h = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, D)
        dist.all_reduce(h, op=dist.ReduceOp.SUM, group=self.group)
        return h


class VocabParallelHead(nn.Module):
    """Logits for vocab rows [vocab_start, vocab_end), all-gathered into the full (..., V)
    on every rank (see the module docstring for why not a replicated head)."""

    def __init__(self, dim: int, vocab_size: int, tp_rank: int, tp_size: int, group: Group,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.vocab_size, self.tp_size, self.group = vocab_size, tp_size, group
        self.vocab_start, self.vocab_end = vocab_range(vocab_size, tp_rank, tp_size)
        self.per_rank = -(-vocab_size // tp_size)
        self.weight = _empty_param(self.vocab_end - self.vocab_start, dim,
                                  device=torch.device(device))
        self.linear_fn = F.linear  # a kernel pass may swap it (same signature and values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.linear_fn(h, self.weight)  # (B, T, V_local)
        pad = self.per_rank - local.shape[-1]
        if pad:  # all_gather needs equal sizes: pad the short last slice, trim after
            local = F.pad(local, (0, pad))
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]  # (B, T, V)


# ---- the pass ------------------------------------------------------------
def apply_tensor_parallel(model: Llama, group: Group, tp_rank: int, tp_size: int) -> Llama:
    """Swap the linear layers, embedding and head of a meta-built stage for their parallel
    counterparts, in place, before loading; returns ``model``. ``group`` is the
    tensor-parallel ProcessGroup this rank belongs to (rank ``tp_rank`` of ``tp_size``)."""
    config = model.config
    sizes = tp_sizes(config, tp_rank, tp_size)
    if tp_size == 1:
        return model
    if any(not p.is_meta for p in model.parameters()):
        raise TensorParallelError("apply_tensor_parallel must run on a meta-built model, "
                                  "before load_weights (each rank then reads only its shard)")
    d, hd = config.hidden_size, config.head_dim
    for layer in model.model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is not None or (mlp is not None and mlp.gate_up_proj is not None):
            raise TensorParallelError("apply tensor parallel before fusing q|k|v / gate|up")
        ab, mb = config.attention_bias, config.mlp_bias
        attn.q_proj = ColumnParallelLinear(d, sizes.q_heads * hd, ab)
        attn.k_proj = ColumnParallelLinear(d, sizes.kv_heads * hd, ab)
        attn.v_proj = ColumnParallelLinear(d, sizes.kv_heads * hd, ab)
        attn.o_proj = RowParallelLinear(sizes.q_heads * hd, d, ab, group)
        if mlp is None:
            # A mixture-of-experts block: not sliced by this pass (its input is the
            # replicated hidden state); tensor_parallel_pass adds the expert-parallel pass.
            continue
        mlp.gate_proj = ColumnParallelLinear(d, sizes.intermediate, mb)
        mlp.up_proj = ColumnParallelLinear(d, sizes.intermediate, mb)
        mlp.down_proj = RowParallelLinear(sizes.intermediate, d, mb, group)
    tied = (model.lm_head is not None and model.model.embed_tokens is not None
            and model.lm_head.weight is model.model.embed_tokens.weight)
    if model.model.embed_tokens is not None:
        model.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, d, tp_rank,
                                                          tp_size, group)
    if model.lm_head is not None:
        model.lm_head = VocabParallelHead(d, config.vocab_size, tp_rank, tp_size, group)
        if tied:  # both hold the same vocab rows, so the tie survives the split
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


def tensor_parallel_pass(config: ModelConfig, group: Group, tp_rank: int,
                         tp_size: int) -> dict:
    """The keywords of ``runtime.stage.build_stage`` that make a stage this rank's shard:
    ``prepare`` (apply_tensor_parallel on the meta model), ``shard_fn`` (the slice each
    tensor reads) and ``num_kv_heads`` (the KV heads this rank caches).

    A mixture-of-experts model's experts are spread over the same ranks (EP = TP: rank r
    holds and reads only its share of whole experts, ``moe_tp_experts``), so no rank
    holds them all; with fewer experts than ranks they stay whole on every rank."""
    check_tp(config, tp_size)

    def prepare(model: Llama) -> None:
        apply_tensor_parallel(model, group, tp_rank, tp_size)
        if moe_tp_experts(config, tp_size):
            apply_expert_parallel(model, group, tp_rank, tp_size)
    return dict(prepare=prepare, shard_fn=tp_shard_fn(config, tp_rank, tp_size),
                num_kv_heads=tp_kv_heads(config, tp_size))


def moe_tp_experts(config: ModelConfig, tp_size: int) -> bool:
    """Whether tensor parallelism over ``tp_size`` ranks spreads an MoE model's experts over
    them (at least one expert per rank), rather than keeping every expert on every rank."""
    return config.is_moe and 1 < tp_size <= config.num_experts
