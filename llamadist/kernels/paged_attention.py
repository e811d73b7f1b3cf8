"""Paged decode attention in Triton: one query token per sequence over a paged KV cache.

The cache of one layer is (2, num_blocks, H_kv, block_size, D) (llamadist.runtime.paged_kv):
a sequence's slot p lives in block ``block_tables[s, p // block_size]`` at offset
``p % block_size``. The kernel reads each sequence's block table and its live length
(``seq_lens``) from the device, so a CUDA graph captured with block tables padded to a
fixed width stays valid as sequences grow, and a step pays only for the slots each
sequence holds. Like llamadist.kernels.decode_attention it splits a sequence's slots
over SPLITS programs per (sequence, KV head) and merges their partial softmaxes in a
second kernel; with one split the first kernel writes the normalised output itself.
The G query heads of a KV head are the rows of one tile, so each K/V tile is read once
for all of them. A tile is BLOCK_N slots gathered across blocks (any block_size), and
accumulation is in float32 for fp16/bf16/fp32 inputs.

``paged_decode`` also writes the step's K/V at ``slot_mapping`` first (one small kernel),
and the pair is one custom op, ``llamadist::paged_decode``, that mutates the cache, so
torch.compile keeps it opaque inside a compiled decoder layer and orders it after the
projections that feed it.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch paged path serves
    triton = None

BLOCK_N = 64  # KV slots per tile
MAX_SPLITS = 64
LOG2E = 1.4426950408889634
# Triton's CPU interpreter (tests) multiplies bf16 tiles as raw bits in tl.dot (triton
# 3.6 with NumPy 2.4: errors of 1e10), so interpreted bf16 tiles are widened to float32
# before each dot; compiled kernels take the bf16 tensor-core dot.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def usable(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether the kernel serves q (N, H, D) over kv (2, NB, H_kv, bs, D): Triton present,
    q and kv on one device of a dtype it takes, D at most 256."""
    return (triton is not None and q.dim() == 3 and kv.dim() == 5
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and kv.dtype == q.dtype and q.device == kv.device and q.shape[-1] <= 256
            and q.shape[1] % kv.shape[2] == 0 and kv.stride(-1) == 1)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(rows: int, max_slots: int, multiprocessors: int = 132) -> int:
    """Programs per (sequence, KV head) for ``rows`` = S * H_kv of them over at most
    ``max_slots`` slots a sequence: about two programs per multiprocessor in all, a power
    of two (the merge kernel's tile), never more than the tiles of ``max_slots`` nor
    MAX_SPLITS. Fixed per graph bucket: it depends on shapes only."""
    want = max(1, -(-2 * multiprocessors // max(1, rows)))
    tiles = max(1, -(-max_slots // BLOCK_N))
    up = 1 << (want - 1).bit_length()      # smallest power of two >= want
    down = 1 << (tiles.bit_length() - 1)   # largest power of two <= tiles
    return min(MAX_SPLITS, up, down)


def splits_for(device: torch.device, rows: int, max_slots: int) -> int:
    """num_splits with ``device``'s multiprocessor count (132, an H100/H200, off CUDA)."""
    mp = _multiprocessors(device.index or 0) if device.type == "cuda" else 132
    return num_splits(rows, max_slots, mp)


if triton is not None:
    @triton.jit
    def _write_kernel(K, V, KV, Slots, sk_n, sk_h, sv_n, sv_h, skv_kv, skv_b, skv_h, skv_s,
                      H_KV, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr):
        # One program per (token, KV head): its k and v rows into its slot.
        pid = tl.program_id(0)
        n = pid // H_KV
        h = pid % H_KV
        slot = tl.load(Slots + n).to(tl.int64)
        offs = tl.arange(0, D_PAD)
        keep = offs < D
        dst = KV + (slot // BS) * skv_b + h * skv_h + (slot % BS) * skv_s + offs
        k = tl.load(K + n * sk_n + h * sk_h + offs, mask=keep)
        v = tl.load(V + n * sv_n + h * sv_h + offs, mask=keep)
        tl.store(dst, k.to(KV.dtype.element_ty), mask=keep)
        tl.store(dst + skv_kv, v.to(KV.dtype.element_ty), mask=keep)

    @triton.jit
    def _split_kernel(Q, KV, Tables, SeqLens, Acc, ML, Out,
                      sq_n, sq_h, so_n, so_h, skv_kv, skv_b, skv_h, skv_s, st_s,
                      n_sh, H_KV, G, qk_scale,
                      D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
                      G_PAD: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                      DIRECT: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
        sh = tl.program_id(0)
        split = tl.program_id(1)
        s = sh // H_KV
        h = sh % H_KV
        length = tl.load(SeqLens + s).to(tl.int32)  # slots [0, length) hold tokens
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        lo = split * per_split
        hi = tl.minimum(lo + per_split, length)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK)
        g_ok = offs_g < G
        d_ok = offs_d < D
        # Query heads h * G + g of sequence s: (G_PAD, D_PAD)
        q = tl.load(Q + s * sq_n + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        k_head = KV + h * skv_h
        table = Tables + s * st_s

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for n0 in range(lo, hi, BLOCK):
            n = n0 + offs_n  # (BLOCK,) slots of this tile, gathered from their blocks
            live = n < hi
            blk = tl.load(table + n // BS, mask=live, other=0).to(tl.int64)
            rows = blk * skv_b + (n % BS) * skv_s  # (BLOCK,) element offset of each slot
            tile_mask = live[:, None] & d_ok[None, :]
            k = tl.load(k_head + rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = sc * qk_scale  # log2 domain: exp2(sc) = e^(q.k / sqrt(D))
            sc = tl.where(live[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # split with no slot yet
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(sc - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(k_head + skv_kv + rows[:, None] + offs_d[None, :], mask=tile_mask,
                        other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if DIRECT:  # one split: the softmax is complete here
            out = acc / l_i[:, None]
            tl.store(Out + s * so_n + (h * G + offs_g)[:, None] * so_h + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        else:  # partials laid out (S * H_kv, SPLITS, G, D_PAD) and (2, S * H_kv, SPLITS, G)
            row = (sh * SPLITS + split) * G + offs_g
            tl.store(Acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=g_ok[:, None])
            tl.store(ML + row, m_i, mask=g_ok)
            tl.store(ML + n_sh * SPLITS * G + row, l_i, mask=g_ok)

    @triton.jit
    def _merge_kernel(Acc, ML, Out, so_n, so_h, n_sh, H_KV, G,
                      D: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr):
        pid = tl.program_id(0)  # one per (sequence, KV head, query row g)
        g = pid % G
        sh = pid // G
        s = sh // H_KV
        h = sh % H_KV
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, D_PAD)
        row = (sh * SPLITS + offs_s) * G + g
        m_s = tl.load(ML + row)
        l_s = tl.load(ML + n_sh * SPLITS * G + row)
        m = tl.max(m_s, 0)
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m))  # empty splits weigh 0
        acc = tl.load(Acc + row[:, None] * D_PAD + offs_d[None, :])
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
        tl.store(Out + s * so_n + (h * G + g) * so_h + offs_d, out.to(Out.dtype.element_ty),
                 mask=offs_d < D)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k/v (N, H_kv, D) at slots ``slot_mapping`` (N,) of kv (2, NB, H_kv, bs, D)."""
    n, h_kv, d = k.shape
    _write_kernel[(n * h_kv,)](
        k, v, kv, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), h_kv,
        D=d, D_PAD=max(16, triton.next_power_of_2(d)), BS=kv.shape[3], num_warps=1)


def attend(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, splits: int) -> torch.Tensor:
    """q (S, H, D) one token per sequence, rotated, over slots [0, seq_lens[s]) of its
    blocks ``block_tables`` (S, MB) in kv (2, NB, H_kv, bs, D) -> (S, H, D) in q's dtype."""
    s, h, d = q.shape
    h_kv, bs = kv.shape[2], kv.shape[3]
    g = h // h_kv
    if q.stride(-1) != 1:
        q = q.contiguous()
    d_pad = max(16, triton.next_power_of_2(d))
    n_sh = s * h_kv
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device)
    direct = splits == 1
    # Partials only with more than one split (never read otherwise: out stands in).
    acc = out if direct else torch.empty(n_sh, splits, g, d_pad, dtype=torch.float32,
                                         device=q.device)
    ml = out if direct else torch.empty(2, n_sh, splits, g, dtype=torch.float32,
                                        device=q.device)
    _split_kernel[(n_sh, splits)](
        q, kv, block_tables, seq_lens, acc, ml, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), block_tables.stride(0),
        n_sh, h_kv, g, d ** -0.5 * LOG2E,
        D=d, D_PAD=d_pad, BS=bs, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK=BLOCK_N,
        SPLITS=splits, DIRECT=direct, IEEE=q.dtype == torch.float32 or INTERPRETED,
        DOT_F32=INTERPRETED and q.dtype == torch.bfloat16, num_warps=4,
        num_stages=2)
    if not direct:
        _merge_kernel[(n_sh * g,)](acc, ml, out, out.stride(0), out.stride(1), n_sh, h_kv, g,
                                   D=d, D_PAD=d_pad, SPLITS=splits, num_warps=4)
    return out


if triton is not None:
    @torch.library.custom_op("llamadist::paged_decode", mutates_args=("kv",))
    def _paged_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                         slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, splits: int) -> torch.Tensor:
        write_kv(k, v, kv, slot_mapping)
        return attend(q, kv, block_tables, seq_lens, splits)

    @_paged_decode_op.register_fake
    def _(q, k, v, kv, slot_mapping, block_tables, seq_lens, splits):
        return q.new_empty(q.shape)


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, splits: int) -> torch.Tensor:
    """A decode step's attention for one layer: write k/v (S, H_kv, D) at ``slot_mapping``
    (S,) into kv (2, NB, H_kv, bs, D), then attend q (S, H, D) (rotated; heads
    h = kv_head * G + g) over each sequence's slots [0, seq_lens[s]) through its
    ``block_tables`` row (S, MB) -> (S, H, D). ``splits``: see num_splits (a power of two,
    at most MAX_SPLITS). Check ``usable`` first."""
    return torch.ops.llamadist.paged_decode(q, k, v, kv, slot_mapping, block_tables,
                                            seq_lens, splits)
