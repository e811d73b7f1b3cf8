"""The pure Llama model: embedding, RMSNorm, RoPE, GQA attention over a caller-owned
KV cache, SwiGLU MLP (or Mixtral's sparse MoE block, :mod:`.moe`), final norm and head.

No torch.distributed and no kernels here (DESIGN principle 1): plain ``nn.Linear`` and
SDPA; faster kernels are swapped in by passes over a built model
(:mod:`llamadist.runtime.kernel_passes`), like projection fusion (:mod:`.fuse`).

A ``Llama`` may hold any contiguous range of decoder layers (a pipeline stage); layers
keep their global index, so a stage with layers 12..23 names its parameters
``model.layers.12.…`` exactly like the Hugging Face checkpoint. Build it on the meta
device and let :mod:`llamadist.weights.loader` fill in the tensors the stage owns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import ModelConfig
from llamadist.model.cache import FlatLayerKV, LayerKV, StageKV, Start
from llamadist.model.moe import SparseMoE
from llamadist.model.rope import RotaryTable, apply_rotary

# One-token attention: (q, keys, values, mask, start, cos, sin) -> out, shapes as in
# sdpa_decode_attention. A kernel pass may set another on each Attention (the split-KV
# Triton kernel on CUDA: llamadist.runtime.kernel_passes); it must give the same values.
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                            Start, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor | None, start: Start, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
    """q (B, H_kv, G, D) before RoPE against keys/values (B, H_kv, S, D) -> (B, H_kv, G, D).
    mask (B, 1, 1, S): bool (True = visible) or additive float; None = all visible.
    cos/sin (B, 1, 1, D): q's rotation. ``start`` is unused here (the keys end at the
    live length, or the mask hides the rest); a kernel may read it instead of the mask."""
    return F.scaled_dot_product_attention(apply_rotary(q, cos, sin), keys, values,
                                          attn_mask=mask)


# Fused kernels for eager steps, set on the modules by a kernel pass
# (llamadist.runtime.kernel_passes.use_eager_fused: Triton on CUDA), each giving the
# formula's values it replaces (within an ulp):
# (x, residual or None, weight, eps) -> (x + residual, RMSNorm(x + residual))
AddNorm = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, float],
                   tuple[torch.Tensor, torch.Tensor]]
# gate_up (..., 2F) -> silu(gate) * up (..., F)
SiluMul = Callable[[torch.Tensor], torch.Tensor]
# (q (N, H, D), k (N, H_kv, D), cos (N, D), sin (N, D)) -> (q, k) rotated
RotaryQK = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor]]


def eager(fn: Callable | None) -> Callable | None:
    """``fn``, a fused kernel a pass set, where it serves: outside torch.compile, whose
    Inductor fuses the model's own formula (and must not trace a Triton launch)."""
    return None if fn is None or torch.compiler.is_compiling() else fn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.add_norm: AddNorm | None = None  # a fused kernel (see AddNorm)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(s)) with s = x + residual (x for None): the residual stream and its
        norm, in one kernel where a pass set ``add_norm``."""
        fused = eager(self.add_norm)
        if fused is not None:
            return fused(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return x, self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = eager(self.add_norm)
        if fused is not None:
            return fused(x, None, self.weight, self.eps)[1]
        # Normalise in float32, as the reference does, then cast back before the scale.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, bias = config.hidden_size, config.attention_bias
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, config.q_size, bias=bias)
        self.k_proj = nn.Linear(d, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(d, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, d, bias=bias)
        # Set by llamadist.model.fuse: one (q|k|v) matmul instead of three.
        self.qkv_proj: nn.Linear | None = None
        self.qkv_split: tuple[int, int, int] = (0, 0, 0)
        # The one-token attention; a kernel pass may swap it (see DecodeAttention).
        self.decode_attention: DecodeAttention = sdpa_decode_attention
        self.rotary_qk: RotaryQK | None = None  # a fused kernel for forward_flat
        # Set by a kernel pass: weights into the L2 after a flat batch's attention, before
        # o (llamadist.kernels.l2_prefetch).
        self.l2_prefetch: Callable[[], None] | None = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.qkv_split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKV | FlatLayerKV, start: Start,
                mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v, rotated = self.qkv(x, cos, sin, cache)
        return self.attention(q, k, v, rotated, cos, sin, cache, start, mask)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
                       cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | FlatLayerKV,
                       start: Start, mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(norm(s), ...)) with s = x + residual (x for None): the residual stream
        and this attention over its norm. Where the eager fused kernels run, the norm may
        ride in the q | k | v projection's own kernel (``norm_forward``: int4's decode rows),
        with q and k rotated there too on a flat batch (as ``qkv``)."""
        takes = (eager(norm.add_norm) is not None
                 and getattr(self.qkv_proj, "norm_forward", None) is not None)
        asks = self.asks(x, cos, sin, cache) if takes else None
        found = None if asks is None else self.normed_qkv(norm, x, residual, asks)
        if found is None:  # (the norm apart; the same asks of the projection without it)
            s, normed = norm.add_forward(x, residual)
            q, k, v, rotated = self.qkv(normed, cos, sin, cache, asks)
        else:
            s, (q, k, v, rotated) = found
        return s, self.attention(q, k, v, rotated, cos, sin, cache, start, mask)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            cache: LayerKV | FlatLayerKV, asks: list[dict] | None = None) -> tuple:
        """(q, k, v, rotated): q, k, v (B, T, *) of x and whether q and k leave rotated. On
        a flat batch a fused projection whose kernel rotates them (``rope_forward``: int4's
        decode rows) does, and may store k and v in the paged cache itself too (``asks``,
        made here where not given; k and v are then None)."""
        fused = getattr(self.qkv_proj, "rope_forward", None)
        if fused is not None and asks is None:
            asks = self.asks(x, cos, sin, cache)
        for ask in asks if fused is not None else ():
            y = fused(x, **ask)
            if y is not None:
                return self.answer(y, ask)
        return (*self.project(x), False)

    def normed_qkv(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
                   asks: list[dict]) -> tuple[torch.Tensor, tuple] | None:
        """(s, qkv's answer) of ``norm``(s), s = x + residual, through the fused projection's
        ``norm_forward``, the norm in its own kernel (and RoPE and the cache's K/V where it
        can: ``asks``, as ``qkv``); None where it does not."""
        for ask in [*asks, {}]:
            got = self.qkv_proj.norm_forward(x, residual, norm.weight, norm.eps, **ask)
            if got is not None:
                return got[0], self.answer(got[1], ask)
        return None

    def asks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             cache: LayerKV | FlatLayerKV) -> list[dict]:
        """What a fused q | k | v projection may do in its own kernel on this batch, the
        most first: RoPE with k and v stored in the paged cache (where the batch's
        attention is the paged decode kernel: the cache's ``cache_slots``), then RoPE alone
        (``flat_rope``); nothing where neither applies."""
        rope = self.flat_rope(x, cos, sin, cache)
        if rope is None:
            return []
        slots = getattr(cache, "cache_slots", None)
        store = None if slots is None else slots()
        first = [] if store is None else [dict(rope=rope, kv=(*store, self.qkv_split[0]))]
        return first + [dict(rope=rope)]

    def answer(self, y: torch.Tensor, ask: dict) -> tuple:
        """(q, k, v, rotated) of a fused projection's output y that did what ``ask`` asked:
        k and v None where it stored them in the cache."""
        q, k, v = y.split(self.qkv_split, dim=-1)
        if "kv" in ask:
            return q, None, None, True
        return q, k, v, "rope" in ask

    def flat_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: LayerKV | FlatLayerKV) -> tuple | None:
        """(cos, sin, rot) for a projection that rotates q and k itself: a flat batch's
        cos / sin one row a token (N, D) and the columns of q's and k's heads, where the
        eager fused kernels run (``rotary_qk`` set, outside torch.compile); else None."""
        if getattr(cache, "attend", None) is None or eager(self.rotary_qk) is None:
            return None
        n = x.shape[0] * x.shape[1]
        return (_token_rows(cos, n), _token_rows(sin, n), sum(self.qkv_split[:2]))

    def attention(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                  rotated: bool, cos: torch.Tensor, sin: torch.Tensor,
                  cache: LayerKV | FlatLayerKV, start: Start,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """The attention of q, k, v (B, T, *; q and k ``rotated`` already or not, k and v
        None where stored already: only a flat batch's, forward_flat) and the output
        projection."""
        b, t, _ = q.shape
        attend = getattr(cache, "attend", None)
        if attend is not None:
            return self.forward_flat(q, k, v, rotated, cos, sin, attend)
        # Head counts come from the projection widths, so a tensor-parallel
        # shard of this module (fewer heads) runs through the same code.
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        keys, values = cache.write(apply_rotary(k, cos, sin), v, start)  # (B, H_kv, S, D)
        gqa = q.shape[1] != keys.shape[1]
        if t == 1:
            # Decode: the G query heads that share a KV head become G query rows of one
            # plain attention problem, (B, H_kv, G, D), so a fused SDPA kernel reads each
            # K/V once (enable_gqa with a mask can fall back to the math path, which
            # copies K/V G times). mask (B, 1, 1, S) broadcasts over H_kv and G, cos/sin
            # (B, 1, 1, D) too: q is rotated inside self.decode_attention.
            qg = q.reshape(b, keys.shape[1], -1, self.head_dim)
            out = self.decode_attention(qg, keys, values, mask, start, cos, sin)
            return self.o_proj(out.reshape(b, 1, -1))  # heads in order h = kv * G + g
        q = apply_rotary(q, cos, sin)
        if mask is None:
            # Only a fresh prefill (start == 0, all tokens valid) takes this path:
            # the engine passes an explicit mask whenever start > 0 and t > 1.
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
        return self.o_proj(out)

    def forward_flat(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                     rotated: bool, cos: torch.Tensor, sin: torch.Tensor,
                     attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        """A flat batch: the B*T tokens of q/k/v (B, T, *) are N independent tokens, each
        at its own position; ``attend`` (FlatLayerKV.attend) stores k/v and attends each
        token over its own sequence. cos/sin (B, 1, T, D); q and k ``rotated`` already (by
        the projection's kernel) or not; k and v None: stored already (rotated), by the
        projection's kernel too."""
        b, t, _ = q.shape
        hd = self.head_dim
        h = q.shape[-1] // hd  # explicit: N may be 0 (a CP rank)
        q = q.view(b * t, h, hd)  # (N, H, D)
        if k is None:  # stored in the cache by the projection's kernel (Attention.asks)
            return self.project_out(attend(q, None, None).reshape(b, t, h * hd))
        h_kv = k.shape[-1] // hd
        k = k.view(b * t, h_kv, hd)
        if not rotated:
            cos, sin = _token_rows(cos, b * t), _token_rows(sin, b * t)  # (N, D)
            fused = eager(self.rotary_qk)
            if fused is not None:
                q, k = fused(q, k, cos, sin)
            else:
                q, k = (apply_rotary(z, cos[:, None], sin[:, None]) for z in (q, k))
        out = attend(q, k, v.reshape(b * t, h_kv, hd))  # (N, H, D)
        return self.project_out(out.reshape(b, t, h * hd))

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """o_proj of a flat batch's attention output, the weights after it asked into the
        L2 first where a pass set ``l2_prefetch`` (eager layers)."""
        ask = eager(self.l2_prefetch)
        if ask is not None:
            ask()
        return self.o_proj(out)


def _token_rows(c: torch.Tensor, n: int) -> torch.Tensor:
    """cos or sin (B, 1, T, D) as (N, D), one row a token of a flat batch (a view)."""
    return c.transpose(1, 2).reshape(n, c.shape[-1])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.gate_up_proj: nn.Linear | None = None  # set by llamadist.model.fuse
        self.silu_mul: SiluMul | None = None  # a fused kernel over gate_up_proj's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            fused = eager(self.silu_mul)
            if fused is not None:
                # a quantized product may write silu(gate) * up itself (PackedLinear's
                # silu_mul: None where it does not take x)
                glu = getattr(self.gate_up_proj, "silu_mul", None)
                act = glu(x) if glu is not None else None
                return self.down_proj(act if act is not None else fused(self.gate_up_proj(x)))
            gate_up = self.gate_up_proj(x)  # (..., 2F)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(norm(s))) with s = x + residual (x for None): the residual stream and
        this MLP of its norm. Where the eager fused kernels run, the norm (and silu * up)
        may ride in gate | up's own kernel (``norm_forward``: int4's decode rows)."""
        fused = getattr(self.gate_up_proj, "norm_forward", None)
        got = None if (fused is None or eager(norm.add_norm) is None
                       or eager(self.silu_mul) is None) else fused(
            x, residual, norm.weight, norm.eps, glu=True)
        if got is None:
            s, normed = norm.add_forward(x, residual)
            return s, self(normed)
        s, act = got
        return s, self.down_proj(act)


class DecoderLayer(nn.Module):
    """Attention then the feed-forward block: a dense SwiGLU ``mlp`` (Llama) or a sparse
    ``block_sparse_moe`` (Mixtral, llamadist.model.moe); the other attribute is None, so
    parameter names stay the checkpoint's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = None if config.is_moe else MLP(config)
        self.block_sparse_moe = SparseMoE(config) if config.is_moe else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKV, start: Start, mask: torch.Tensor | None) -> torch.Tensor:
        x, mlp_out = self.forward_deferred(x, None, cos, sin, cache, start, mask)
        return x + mlp_out

    def forward_deferred(self, x: torch.Tensor, pending: torch.Tensor | None,
                         cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV, start: Start,
                         mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer with its last residual add left to the caller: takes the previous
        layer's pending MLP output (added here first) and returns (x, mlp_out) with the
        layer's output = x + mlp_out. Under torch.compile the add then fuses into this
        layer's first RMSNorm instead of costing a kernel of its own (eagerly, each add
        and the norm after it are one kernel where a pass set the norms' ``add_norm``, or
        ride in the next projection's kernel: Attention's and MLP's forward_normed)."""
        x, attn = self.self_attn.forward_normed(self.input_layernorm, x, pending, cos, sin,
                                                cache, start, mask)
        if self.mlp is not None:
            return self.mlp.forward_normed(self.post_attention_layernorm, x, attn)
        x, normed = self.post_attention_layernorm.add_forward(x, attn)
        return x, self.block_sparse_moe(normed)


def _deferred(layer: DecoderLayer, h: torch.Tensor, pending: torch.Tensor | None,
              *args) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.forward_deferred(h, pending, *args)


class Llama(nn.Module):
    """A contiguous slice ``[layers.start, layers.stop)`` of a Llama model.

    The first stage holds the embedding (``has_embed``), the last the final
    norm and head (``has_head``). The full model is ``Llama(config)``.
    """

    def __init__(self, config: ModelConfig, layers: range | None = None,
                 has_embed: bool | None = None, has_head: bool | None = None):
        super().__init__()
        layers = range(config.num_layers) if layers is None else layers
        self.config = config
        self.layer_range = layers
        self.has_embed = layers.start == 0 if has_embed is None else has_embed
        self.has_head = layers.stop == config.num_layers if has_head is None else has_head
        self.model = nn.Module()
        # _weight skips nn.Embedding's normal_ init, which on first use imports
        # torch._dynamo (seconds per process) for values the loader overwrites anyway.
        self.model.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size,
                         _weight=torch.empty(config.vocab_size, config.hidden_size))
            if self.has_embed else None)
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in layers})
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.has_head else None
        self.lm_head = (nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                        if self.has_head else None)
        if config.tie_word_embeddings and self.has_embed and self.has_head:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope: RotaryTable | None = None

    def setup_rope(self, max_positions: int, device: torch.device | str) -> None:
        """Precompute the cos/sin table on the stage's device (after loading)."""
        self.rope = RotaryTable(self.config, max_positions, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: StageKV, start: Start,
                mask: torch.Tensor | None = None, logits: str = "last",
                layer_fn: Callable[..., torch.Tensor] | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage.

        x: token ids (B, T) on the first stage, hidden states (B, T, D) otherwise.
        positions: (B, T) RoPE positions. start: the cache slot of x[:, 0].
        mask: (B, 1, T, S) bool, True where a query may attend; None for no padding.
        logits: on the last stage, "last" (B, 1, V), "all" (B, T, V) or "none" (hidden).
        layer_fn: calls each decoder layer as ``layer_fn(layer, h, pending, cos, sin, cache,
        start, mask) -> (h, pending)``, the contract of ``DecoderLayer.forward_deferred``;
        the CUDA-graph runtime passes a compiled one (same math, fused kernels).
        logits_index: (S,) indices into the B*T flattened tokens (a flat batch: each
        sequence's last token); given, the last stage returns their logits (S, V) only.

        A flat batch (continuous batching) passes a cache whose layers have ``attend``
        (FlatLayerKV): x (1, N) or (N, 1), positions of the same shape, start and mask
        unused.
        """
        h = self.model.embed_tokens(x) if self.has_embed else x
        assert self.rope is not None, "call setup_rope() before forward"
        cos, sin = self.rope.lookup(positions, h.dtype)
        pending = None
        for idx, layer in self.model.layers.items():
            # Each layer's last residual add is left to the next (forward_deferred): with
            # the fused add + RMSNorm kernel (RMSNorm.add_norm) it costs no kernel.
            h, pending = (layer_fn or _deferred)(layer, h, pending, cos, sin,
                                                 cache.layer(int(idx)), start, mask)
        if pending is not None:
            h = h + pending
        if not self.has_head or logits == "none":
            return h
        if logits_index is not None:
            h = h.reshape(-1, h.shape[-1])[logits_index]  # (S, D)
        elif logits == "last":
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))
