"""Attention of a flat batch over the paged KV cache, in PyTorch (CPU or GPU).

``PagedStep`` is what ``Llama.forward`` takes as its cache for a flat batch; each layer's
``PagedLayer.attend`` (llamadist.model.cache.FlatLayerKV) writes the step's K/V at the
batch's slots and attends every token over its own sequence.

The sequences of a step are split in two groups, each one SDPA call over K/V gathered
from the blocks into a padded (S_g, H_kv, L_g, D) view:

* decodes (one token each): the G query heads of a KV head become G query rows,
  q (S_d, H_kv, G, D), as in the static decode path, masked to each sequence's length;
* chunks of more than one token (prefills): queries padded to (S_p, H, T_max, D) with a
  causal mask by position. Padding every sequence of the step to the longest chunk would
  cost S * T_max query rows (a 512-token chunk next to 31 decodes: 16,384 rows for 543
  real ones); split, the decodes cost S_d rows and the prefills their own padding.

A per-sequence loop (one gather and SDPA call per sequence and layer) is the other way
to avoid the padding. Measured on the CPU (SmolLM2 heads, 32 sequences of 100-317
tokens, one layer, 2 shared cores, noisy): decodes 2.1-4.3 ms grouped against 4.7-5.8
ms looped, 32-token chunks 10.3 against 10.2 ms; the gathers and the attention math
dominate, not the calls. The groups stay: never slower here, and their number of calls
does not grow with S (on a GPU each call is kernel launches).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamadist.config import to_device
from llamadist.kernels import paged_attention as paged_kernel
from llamadist.runtime.paged_kv import PagedBatch, PagedKVCache


@dataclass
class AttentionGroup:
    """Some sequences of a batch attended by one SDPA call.
    tokens: (N_g,) flat indices of the group's tokens; None when the group is the whole
    batch in order. pad_index: (N_g,) each token's row in the padded (S_g * T) queries;
    None when T == 1. block_tables (S_g, MB_g); kv_len L_g slots gathered per sequence;
    mask (S_g, 1, T, L_g) bool (True = visible) or None (all visible)."""
    tokens: torch.Tensor | None
    pad_index: torch.Tensor | None
    block_tables: torch.Tensor
    q_len: int
    kv_len: int
    mask: torch.Tensor | None
    fresh: bool = False  # one sequence's whole context is this chunk: causal SDPA on its
    # own k/v, nothing to gather


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers as a long tensor on ``device``, without the host waiting for the work
    queued there (torch.tensor(..., device=cuda) copies from pageable memory and waits: in
    a step prepared ahead, until the previous step has finished)."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def _decode_group(batch: PagedBatch, seqs: list[int], whole: bool) -> AttentionGroup:
    lens = [batch.starts[s] + 1 for s in seqs]
    kv_len = max(lens)
    idx = None if whole else _ids(seqs, batch.device)
    tables = batch.block_tables if whole else batch.block_tables[idx]
    mask = None
    if min(lens) != kv_len:
        seq_lens = batch.seq_lens if whole else batch.seq_lens[idx]
        keys = torch.arange(kv_len, device=batch.device)
        mask = (keys.view(1, kv_len) < seq_lens.view(-1, 1)).view(len(seqs), 1, 1, kv_len)
    tokens = None if whole else batch.last_token_index[idx]
    return AttentionGroup(tokens, None, tables[:, :_blocks(kv_len, batch)], 1, kv_len, mask)


def _prefill_group(batch: PagedBatch, seqs: list[int], whole: bool) -> AttentionGroup:
    dev = batch.device
    q_len = max(batch.query_lens[s] for s in seqs)
    kv_len = max(batch.starts[s] + batch.query_lens[s] for s in seqs)
    idx = _ids(seqs, dev)
    tables = batch.block_tables[idx][:, :_blocks(kv_len, batch)]
    # Each token's flat index and its row in the padded queries, sequence by sequence.
    qlen_t = _ids([batch.query_lens[s] for s in seqs], dev)  # (S_g,)
    n_g = sum(batch.query_lens[s] for s in seqs)
    local = torch.repeat_interleave(torch.arange(len(seqs), device=dev), qlen_t,
                                    output_size=n_g)  # (N_g,) sequence within the group
    first = torch.cumsum(qlen_t, 0) - qlen_t  # (S_g,) group-local index of its first token
    offset = torch.arange(n_g, device=dev) - first[local]  # (N_g,) index within the chunk
    tokens = None if whole else batch.query_start[idx][local] + offset
    # Query i of sequence s sits at position starts[s] + i and sees keys at <= that.
    q_pos = (_ids([batch.starts[s] for s in seqs], dev).view(-1, 1)
             + torch.arange(q_len, device=dev).view(1, -1))  # (S_g, T)
    mask = torch.arange(kv_len, device=dev).view(1, 1, kv_len) <= q_pos.unsqueeze(-1)
    return AttentionGroup(tokens, local * q_len + offset, tables, q_len, kv_len,
                          mask.unsqueeze(1))


def _fresh_group(batch: PagedBatch, seqs: list[int], whole: bool) -> AttentionGroup:
    """Sequences whose context is exactly this step's chunk (start 0): right-padded to the
    longest, so plain causal attention is exact for every real token (a padded key sits
    after every real query)."""
    g = _prefill_group(batch, seqs, whole)
    return AttentionGroup(g.tokens, g.pad_index, g.block_tables, g.q_len, g.q_len, None,
                          fresh=True)


# Chunks of more than one token attend through SDPA's flash or memory-efficient kernels,
# never its cuDNN one: on the H200 (torch 2.11) a 256-request serving run's mixed steps
# took 299 ms each with cuDNN's SDPA disabled against 349-396 ms with it (6 718 against
# 5 423-6 171 tokens/s; benchmarks/RESULTS.md, session 12). sdpa_kernel sets the
# process's backend flags for the call (and restores them after); a backend the user
# turned off stays off.
_CHUNK_BACKENDS = ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
                   (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
                   (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled))


def _chunk_sdpa(q: torch.Tensor):
    """The SDPA backends of a multi-token chunk's attention on ``q``'s device."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    return sdpa_kernel([b for b, enabled in _CHUNK_BACKENDS if enabled()]
                       or [SDPBackend.MATH])


def _blocks(kv_len: int, batch: PagedBatch) -> int:
    return -(-kv_len // batch.block_size)


def attention_groups(batch: PagedBatch) -> list[AttentionGroup]:
    """The batch's groups (decodes, then prefills), built once per batch and device."""
    groups = batch.cached.get("groups")
    if groups is None:
        decode = [s for s, n in enumerate(batch.query_lens) if n == 1]
        prefill = [s for s, n in enumerate(batch.query_lens) if n > 1 and batch.starts[s] > 0]
        fresh = [s for s, n in enumerate(batch.query_lens) if n > 1 and batch.starts[s] == 0]
        groups = []
        if decode:
            groups.append(_decode_group(batch, decode, whole=not (prefill or fresh)))
        if prefill:
            groups.append(_prefill_group(batch, prefill, whole=not (decode or fresh)))
        if fresh:  # prompts' first chunks: causal attention on their own K/V, no gather
            groups.append(_fresh_group(batch, fresh, whole=len(fresh) == len(batch.query_lens)))
        batch.cached["groups"] = groups
    return groups


def gather_rows(block_tables: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(S, MB) block ids -> (S, H_kv, MB) rows of a cache viewed as (blocks * H_kv, bs, D)."""
    heads = torch.arange(num_kv_heads, device=block_tables.device).view(1, -1, 1)
    return block_tables.unsqueeze(1) * num_kv_heads + heads


def gather(cache: torch.Tensor, rows: torch.Tensor, kv_len: int) -> torch.Tensor:
    """cache (num_blocks, H_kv, bs, D), rows (S, H_kv, MB) from gather_rows ->
    (S, H_kv, kv_len, D): one gathered copy, viewed."""
    _, h_kv, bs, d = cache.shape
    s, _, mb = rows.shape
    blocks = cache.view(-1, bs, d)[rows]  # (S, H_kv, MB, bs, D)
    return blocks.view(s, h_kv, mb * bs, d)[:, :, :kv_len]


def fresh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    g: AttentionGroup) -> torch.Tensor:
    """Sequences whose context is exactly their chunk: q (N_g, H, D), k/v (N_g, H_kv, D),
    right-padded to (S_g, T) -> (N_g, H, D), causal, through SDPA's fused kernels (no
    mask tensor, nothing gathered from the cache)."""
    n, h, d = q.shape
    s = len(g.block_tables)  # S_g (the tables only count the sequences here)

    def padded(x: torch.Tensor) -> torch.Tensor:  # (N_g, H_x, D) -> (S_g, H_x, T, D)
        if g.pad_index is not None:
            x = x.new_zeros(s * g.q_len, x.shape[1], d).index_copy_(0, g.pad_index, x)
        return x.view(s, g.q_len, x.shape[1], d).transpose(1, 2)

    with _chunk_sdpa(q):
        out = F.scaled_dot_product_attention(padded(q), padded(k.to(q.dtype)),
                                             padded(v.to(q.dtype)), is_causal=True,
                                             enable_gqa=h != k.shape[1])
    out = out.transpose(1, 2).reshape(s * g.q_len, h, d)
    return out if g.pad_index is None else out.index_select(0, g.pad_index)


def group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    g: AttentionGroup) -> torch.Tensor:
    """q (N_g, H, D) rotated -> (N_g, H, D) over the group's gathered K/V."""
    rows = gather_rows(g.block_tables, k_cache.shape[1])  # (S_g, H_kv, MB)
    keys = gather(k_cache, rows, g.kv_len)  # (S_g, H_kv, L, D)
    values = gather(v_cache, rows, g.kv_len)
    s, h_kv = keys.shape[:2]
    n, h, d = q.shape
    if g.q_len == 1:
        qg = q.view(s, h_kv, h // h_kv, d)  # heads h = kv * G + g: G query rows per KV head
        return F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask).reshape(n, h, d)
    qp = q
    if g.pad_index is not None:
        qp = q.new_zeros(s * g.q_len, h, d).index_copy_(0, g.pad_index, q)
    qp = qp.view(s, g.q_len, h, d).transpose(1, 2)  # (S_g, H, T, D)
    gqa = h != h_kv
    if gqa and q.is_cuda and g.mask is not None:
        # SDPA's fused kernels on CUDA take a mask or grouped heads, not both (flash: no
        # mask; memory-efficient: no GQA): the K/V heads repeated for the query heads let
        # the memory-efficient kernel run instead of the math one, whose float32 scores
        # (S_g, H, T, L) would not fit for a long chunk over a long context
        keys = keys.repeat_interleave(h // h_kv, dim=1)
        values = values.repeat_interleave(h // h_kv, dim=1)
        gqa = False
    with _chunk_sdpa(q):
        out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=g.mask,
                                             enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(s * g.q_len, h, d)
    return out if g.pad_index is None else out.index_select(0, g.pad_index)


class PagedLayer:
    """One layer's view of the paged cache for one batch (a FlatLayerKV). ``k``/``v``
    (num_blocks, H_kv, bs, D) and ``batch`` are what the C decode layer reads too."""

    def __init__(self, kv: torch.Tensor, batch: PagedBatch, decode_fn=None):
        self.kv = kv  # (2, num_blocks, H_kv, bs, D)
        self.k, self.v = kv[0], kv[1]
        self.batch = batch
        self.decode_fn = decode_fn  # PagedKVCache.decode_fn

    def write_rows(self, h_kv: int) -> torch.Tensor:
        """(N * H_kv,) row of each token's K/V per head in the cache viewed as (blocks *
        H_kv * bs, D), token-major; made once per batch."""
        rows = self.batch.cached.get(("write", h_kv))
        if rows is None:
            bs = self.batch.block_size
            slots = self.batch.slot_mapping.view(-1, 1)  # (N, 1)
            heads = torch.arange(h_kv, device=slots.device).view(1, -1)
            rows = (((slots // bs) * h_kv + heads) * bs + slots % bs).view(-1)
            self.batch.cached[("write", h_kv)] = rows
        return rows

    def int32_tables(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For the C decode layer: block tables (S, MB) and sequence lengths (S,) as
        contiguous int32, and the longest length; made once per batch."""
        found = self.batch.cached.get("int32")
        if found is None:
            b = self.batch
            found = (b.block_tables.to(torch.int32).contiguous(),
                     b.seq_lens.to(torch.int32).contiguous(),
                     max(s + n for s, n in zip(b.starts, b.query_lens)))
            b.cached["int32"] = found
        return found

    def kernel_inputs(self, h_kv: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For the paged decode kernel: block tables (S, MB) and sequence lengths (S,) as
        contiguous int32 (the tensors themselves when they already are: a CUDA graph's
        static buffers), and the split count for (S * H_kv) rows over MB blocks; made once
        per batch, outside any compiled region (the graph path makes it before capture)."""
        key = ("kernel", h_kv)
        found = self.batch.cached.get(key)
        if found is None:
            b = self.batch
            tables, lens = b.block_tables, b.seq_lens
            # The kernel takes any row stride of the tables, unit strides otherwise.
            if tables.dtype != torch.int32 or tables.stride(-1) != 1:
                tables = tables.to(torch.int32).contiguous()
            if lens.dtype != torch.int32 or lens.stride(-1) != 1:
                lens = lens.to(torch.int32).contiguous()
            splits = paged_kernel.splits_for(b.device, b.num_seqs * h_kv,
                                             tables.shape[1] * b.block_size)
            found = self.batch.cached[key] = (tables, lens, splits)
        return found

    def cache_slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kv, slots) where this batch's attention is the paged decode kernel (decode only,
        the kernel set, a cache it takes: a query of the cache's dtype then takes it too):
        the cache (2, blocks, H_kv, bs, D) and each token's slot (N,) int32 (made once per
        batch where the batch's are not), for a projection that stores k (rotated) and v
        there itself, then ``attend(q, None, None)``; else None."""
        if (self.decode_fn is None or not self.batch.is_decode
                or not paged_kernel.usable_cache(self.kv)):
            return None
        slots = self.batch.cached.get("slots32")
        if slots is None:
            slots = self.batch.cached["slots32"] = self.batch.slot_mapping.to(torch.int32)
        return self.kv, slots

    def attend(self, q: torch.Tensor, k: torch.Tensor | None,
               v: torch.Tensor | None) -> torch.Tensor:
        """Write k/v (N, H_kv, D) at the batch's slots (None: stored already, at
        ``cache_slots``), then attend q (N, H, D) -> (N, H, D)."""
        if k is None:
            if self.cache_slots() is None or not paged_kernel.usable(q, self.kv):
                raise RuntimeError("attend without k / v takes a decode batch through the "
                                   "paged kernel (cache_slots), for q "
                                   f"{tuple(q.shape)} {q.dtype}")
            tables, lens, splits = self.kernel_inputs(self.kv.shape[2])
            return self.decode_fn(q, None, None, self.kv, self.batch.slot_mapping, tables,
                                  lens, splits)
        n, h_kv, d = k.shape
        if (self.decode_fn is not None and self.batch.is_decode
                and paged_kernel.usable(q, self.kv)):
            # One token per sequence: the kernel writes k/v and reads the block tables and
            # lengths on the device (no host-side lengths: graph-safe).
            tables, lens, splits = self.kernel_inputs(h_kv)
            return self.decode_fn(q, k, v, self.kv, self.batch.slot_mapping, tables, lens,
                                  splits)
        rows = self.write_rows(h_kv)  # (N * H_kv,)
        self.k.view(-1, d).index_copy_(0, rows, k.reshape(n * h_kv, d).to(self.k.dtype))
        self.v.view(-1, d).index_copy_(0, rows, v.reshape(n * h_kv, d).to(self.v.dtype))
        groups = attention_groups(self.batch)
        if len(groups) == 1 and groups[0].tokens is None:
            if groups[0].fresh:
                return fresh_attention(q, k, v, groups[0])
            return group_attention(q, self.k, self.v, groups[0])
        kernel = self.decode_fn is not None and paged_kernel.usable(q, self.kv)
        out = torch.empty_like(q)
        for g in groups:
            if kernel and g.q_len == 1:
                # A mixed step's decodes through the kernel too: gathering their whole
                # contexts for SDPA would read every cached K/V row twice over.
                tokens, slots, tables, lens, splits = self.decode_subset(h_kv)
                part = self.decode_fn(q.index_select(0, tokens), k.index_select(0, tokens),
                                      v.index_select(0, tokens), self.kv, slots, tables,
                                      lens, splits)  # rewrites the same K/V: harmless
            elif g.fresh:
                part = fresh_attention(q.index_select(0, g.tokens), k.index_select(0, g.tokens),
                                       v.index_select(0, g.tokens), g)
            else:
                part = group_attention(q.index_select(0, g.tokens), self.k, self.v, g)
            out.index_copy_(0, g.tokens, part)
        return out

    def decode_subset(self, h_kv: int) -> tuple[torch.Tensor, ...]:
        """The kernel's inputs for the one-token sequences of a mixed batch: their flat
        token indices (S_d,), slots (S_d,), int32 block tables (S_d, MB) and lengths
        (S_d,), and the split count; made once per batch."""
        key = ("decode_subset", h_kv)
        found = self.batch.cached.get(key)
        if found is None:
            b = self.batch
            seqs = _ids([s for s, n in enumerate(b.query_lens) if n == 1], b.device)
            tokens = b.last_token_index[seqs]
            tables = b.block_tables[seqs].to(torch.int32).contiguous()
            lens = b.seq_lens[seqs].to(torch.int32).contiguous()
            splits = paged_kernel.splits_for(b.device, len(seqs) * h_kv,
                                             tables.shape[1] * b.block_size)
            found = b.cached[key] = (tokens, b.slot_mapping[tokens], tables, lens, splits)
        return found


class PagedStep:
    """The StageKV of one step: ``layer(i)`` is layer i's PagedLayer for ``batch``."""

    def __init__(self, cache: PagedKVCache, batch: PagedBatch):
        cache.check(batch)
        self.cache = cache
        self.batch = batch

    def layer(self, i: int) -> PagedLayer:
        return PagedLayer(self.cache.kv(i), self.batch, self.cache.decode_fn)
