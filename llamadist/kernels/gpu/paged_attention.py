"""The Triton code of llamadist.kernels.paged_attention (see its docstring): the K/V write
kernel, the split kernel over the paged cache and the merge kernel, and their launches.
Imported only through llamadist.kernels.gpu.load, on the custom op's first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels import paged_attention as front
from llamadist.kernels.gpu import interpreted
from llamadist.kernels.gpu.dependent import dependent, enter
from llamadist.kernels.paged_attention import BLOCK_N, LOG2E, MAX_SPLITS

# Triton's CPU interpreter (tests) multiplies bf16 tiles as raw bits in tl.dot (triton
# 3.6 with NumPy 2.4: errors of 1e10), so interpreted bf16 tiles are widened to float32
# before each dot; compiled kernels take the bf16 tensor-core dot.
INTERPRETED = interpreted()


@triton.jit
def _write_kernel(K, V, KV, Slots, sk_n, sk_h, sv_n, sv_h, skv_kv, skv_b, skv_h, skv_s,
                  H_KV, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
                  PDL: tl.constexpr):
    # One program per (token, KV head): its k and v rows into its slot.
    enter(PDL)
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


# What changes from step to step (the split count, the sequences x KV heads, the block
# tables' width) is a plain argument Triton does not specialize on: otherwise each new
# value (a power of two, a multiple of 16 or not) compiles another kernel in the middle of
# a step, 0.4-0.6 s each on the H200 (session 14: the slow early mixed steps of a serving
# run). The kernels compile once per model and dtype, DIRECT (one split) or not.
VARYING = ["n_sh", "st_s", "splits"]


@triton.jit
def _per_split(length, splits, GRAIN: tl.constexpr):
    """The slots of each split's range: ceil(length / splits) rounded up to GRAIN (at least
    one grain); the splits past ceil(length / per_split) hold none."""
    return tl.maximum(tl.cdiv(tl.cdiv(length, splits), GRAIN), 1) * GRAIN


@triton.jit
def _slot_rows(table, n, live, skv_b, skv_s, BS: tl.constexpr):
    """(BLOCK,) element offset of each slot ``n`` of a sequence in its block of the cache
    (the block from the sequence's ``table``; 0 where not ``live``)."""
    blk = tl.load(table + n // BS, mask=live, other=0).to(tl.int64)
    return blk * skv_b + (n % BS) * skv_s


@triton.jit
def _tile(q, k, v, live, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """One tile's K (BLOCK, D_PAD) and V into the running softmax (m_i, l_i, acc) of q's
    rows: slots not ``live`` weigh 0."""
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
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
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=VARYING)
def _split_kernel(Q, KV, Tables, SeqLens, Acc, ML, Out,
                  sq_n, sq_h, so_n, so_h, skv_kv, skv_b, skv_h, skv_s, st_s,
                  n_sh, H_KV, G, qk_scale, splits,
                  D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
                  G_PAD: tl.constexpr, BLOCK: tl.constexpr, GRAIN: tl.constexpr,
                  EARLY: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
                  DOT_F32: tl.constexpr, PDL: tl.constexpr):
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // H_KV
    h = sh % H_KV
    # The lengths and block tables may be read before enter's wait: with dependent
    # launches (only inside a decode graph's capture) they are the bucket's static buffer,
    # filled by a copy from the host before the replay, and no kernel of the step writes
    # them (the merge kernel says why that is enough).
    length = tl.load(SeqLens + s).to(tl.int32)  # slots [0, length) hold tokens
    per_split = _per_split(length, splits, GRAIN)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK)
    g_ok = offs_g < G
    d_ok = offs_d < D
    k_head = KV + h * skv_h
    table = Tables + s * st_s
    if EARLY:
        # The first tile of the range before the wait, but for this step's slot (length
        # - 1): a decode step writes only that one (the kernel before this one may be
        # writing it now), so the rest hold what earlier steps wrote. Its loads then
        # overlap the kernel before (a dependent launch) instead of following it. The
        # step's slot is loaded after the wait and replaces the row (``now``), whatever
        # was read before.
        n1 = lo + offs_n
        live1 = n1 < hi
        at1 = k_head + _slot_rows(table, n1, live1, skv_b, skv_s, BS)[:, None] + offs_d[None, :]
        before = (live1 & (n1 < length - 1))[:, None] & d_ok[None, :]
        k1 = tl.load(at1, mask=before, other=0.0)
        v1 = tl.load(at1 + skv_kv, mask=before, other=0.0)
    enter(PDL)
    # Query heads h * G + g of sequence s: (G_PAD, D_PAD)
    q = tl.load(Q + s * sq_n + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    first = lo
    if EARLY:
        now = (live1 & (n1 == length - 1))[:, None] & d_ok[None, :]
        k1 = tl.where(now, tl.load(at1, mask=now, other=0.0), k1)
        v1 = tl.where(now, tl.load(at1 + skv_kv, mask=now, other=0.0), v1)
        m_i, l_i, acc = _tile(q, k1, v1, live1, m_i, l_i, acc, qk_scale, IEEE, DOT_F32)
        first = lo + BLOCK
    for n0 in range(first, hi, BLOCK):
        n = n0 + offs_n  # (BLOCK,) slots of this tile, gathered from their blocks
        live = n < hi
        rows = _slot_rows(table, n, live, skv_b, skv_s, BS)
        tile_mask = live[:, None] & d_ok[None, :]
        k = tl.load(k_head + rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        v = tl.load(k_head + skv_kv + rows[:, None] + offs_d[None, :], mask=tile_mask,
                    other=0.0)
        m_i, l_i, acc = _tile(q, k, v, live, m_i, l_i, acc, qk_scale, IEEE, DOT_F32)

    if DIRECT:  # one split: the softmax is complete here
        out = acc / l_i[:, None]
        tl.store(Out + s * so_n + (h * G + offs_g)[:, None] * so_h + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:  # partials laid out (S * H_kv, splits, G, D_PAD) and (2, S * H_kv, splits, G)
        row = (sh * splits + split) * G + offs_g
        tl.store(Acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(ML + row, m_i, mask=g_ok)
        tl.store(ML + n_sh * splits * G + row, l_i, mask=g_ok)


@triton.jit(do_not_specialize=["n_sh", "splits"])
def _merge_kernel(Acc, ML, Out, SeqLens, so_n, so_h, n_sh, H_KV, G, splits,
                  D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                  GRAIN: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)  # one per (sequence, KV head, query row g)
    g = pid % G
    sh = pid // G
    s = sh // H_KV
    h = sh % H_KV
    # Only the splits that held slots (a bucket's split count is set by its longest
    # sequence: a shorter one leaves the rest empty, their partials not worth reading).
    # The length is read before enter's wait, so its latency overlaps the split kernel's
    # end: no kernel of the step writes it (a decode graph's static buffer, filled from the
    # host before the replay; dependent launches are on only inside those graphs), and this
    # kernel starts only once every program of the split kernel has started, after the
    # kernel before the split kernel's had ended.
    length = tl.load(SeqLens + s).to(tl.int32)
    live = tl.minimum(tl.cdiv(length, _per_split(length, splits, GRAIN)), splits)
    enter(PDL)
    offs_s = tl.arange(0, SPLITS_PAD)  # one tile for every split count (one compile)
    offs_d = tl.arange(0, D_PAD)
    have = offs_s < live
    row = (sh * splits + offs_s) * G + g
    m_s = tl.load(ML + row, mask=have, other=float("-inf"))
    l_s = tl.load(ML + n_sh * splits * G + row, mask=have, other=0.0)
    m = tl.max(m_s, 0)
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m))  # empty splits weigh 0
    acc = tl.load(Acc + row[:, None] * D_PAD + offs_d[None, :], mask=have[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(Out + s * so_n + (h * G + g) * so_h + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < D)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k/v (N, H_kv, D) at slots ``slot_mapping`` (N,) of kv (2, NB, H_kv, bs, D)."""
    n, h_kv, d = k.shape
    dep = dependent(k.device)
    _write_kernel[(n * h_kv,)](
        k, v, kv, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), h_kv,
        D=d, D_PAD=max(16, triton.next_power_of_2(d)), BS=kv.shape[3], num_warps=1, **dep)


def attend(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, splits: int) -> torch.Tensor:
    """q (S, H, D) one token per sequence, rotated, over slots [0, seq_lens[s]) of its
    blocks ``block_tables`` (S, MB) in kv (2, NB, H_kv, bs, D) -> (S, H, D) in q's dtype."""
    s, h, d = q.shape
    h_kv, bs = kv.shape[2], kv.shape[3]
    g = h // h_kv
    if not 1 <= splits <= MAX_SPLITS:  # the merge kernel's tile holds MAX_SPLITS
        raise ValueError(f"paged decode attention takes 1 to {MAX_SPLITS} splits, not {splits}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    d_pad = max(16, triton.next_power_of_2(d))
    n_sh = s * h_kv
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device)
    direct = splits == 1
    dep = dependent(q.device)
    # Partials only with more than one split (never read otherwise: out stands in).
    acc = out if direct else torch.empty(n_sh, splits, g, d_pad, dtype=torch.float32,
                                         device=q.device)
    ml = out if direct else torch.empty(2, n_sh, splits, g, dtype=torch.float32,
                                        device=q.device)
    _split_kernel[(n_sh, splits)](
        q, kv, block_tables, seq_lens, acc, ml, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), block_tables.stride(0),
        n_sh, h_kv, g, d ** -0.5 * LOG2E, splits,
        D=d, D_PAD=d_pad, BS=bs, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK=BLOCK_N,
        GRAIN=front.SPLIT_GRAIN, EARLY=front.EARLY_TILE, DIRECT=direct,
        IEEE=q.dtype == torch.float32 or INTERPRETED,
        DOT_F32=INTERPRETED and q.dtype == torch.bfloat16, num_warps=front.SPLIT_WARPS,
        num_stages=2, **dep)
    if not direct:
        _merge_kernel[(n_sh * g,)](acc, ml, out, seq_lens, out.stride(0), out.stride(1), n_sh,
                                   h_kv, g, splits, D=d, D_PAD=d_pad, SPLITS_PAD=MAX_SPLITS,
                                   GRAIN=front.SPLIT_GRAIN, num_warps=4, **dep)
    return out
