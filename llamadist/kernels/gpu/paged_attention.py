"""The Triton code of llamadist.kernels.paged_attention (see its docstring): the decode
kernel over the paged cache (RoPE of the step's q and k, the K/V write, the split's
partial softmax and, in the split that finishes last, the merge) and its launch.
Imported only through llamadist.kernels.gpu.load, on the custom op's first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels.gpu import interpreted
from llamadist.kernels.gpu.dependent import dependent, enter
from llamadist.kernels.gpu.eager_fused import rotated
from llamadist.kernels.paged_attention import BLOCK_N, LOG2E, MAX_SPLITS

# Triton's CPU interpreter (tests) multiplies bf16 tiles as raw bits in tl.dot (triton
# 3.6 with NumPy 2.4: errors of 1e10), so interpreted bf16 tiles are widened to float32
# before each dot; compiled kernels take the bf16 tensor-core dot.
INTERPRETED = interpreted()


# What changes from step to step (the split count, the sequences x KV heads, the block
# tables' width) is a plain argument Triton does not specialize on: otherwise each new
# value (a power of two, a multiple of 16 or not) compiles another kernel in the middle of
# a step, 0.4-0.6 s each on the H200 (session 14: the slow early mixed steps of a serving
# run). The kernels compile once per model and dtype, DIRECT (one split) or not.
VARYING = ["n_sh", "st_s", "splits"]


@triton.jit(do_not_specialize=VARYING)
def _decode_kernel(Q, K, V, CS, SN, KV, Slots, Tables, SeqLens, Acc, ML, Arrivals, Out,
                   sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sc_n, so_n, so_h,
                   skv_kv, skv_b, skv_h, skv_s, st_s, n_sh, H_KV, G, qk_scale, splits,
                   D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
                   G_PAD: tl.constexpr, G_M: tl.constexpr, BLOCK: tl.constexpr,
                   CHUNK: tl.constexpr, ROPE: tl.constexpr,
                   DIRECT: tl.constexpr, MERGE: tl.constexpr, IEEE: tl.constexpr,
                   DOT_F32: tl.constexpr, LATE: tl.constexpr, PDL: tl.constexpr):
    # Program (sequence s, KV head h, split): slots [lo, hi) of s's live slots.
    if LATE:
        if PDL:
            tl.extra.cuda.gdc_wait()
    else:
        enter(PDL)
    sh = tl.program_id(0)
    split = tl.program_id(1)
    s = sh // H_KV
    h = sh % H_KV
    length = tl.load(SeqLens + s).to(tl.int32)  # slots [0, length) hold tokens
    last = length - 1  # this step's token: its K/V come from K and V, not the cache
    per_split = tl.cdiv(tl.cdiv(length, splits), BLOCK) * BLOCK
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)
    mine = split == last // per_split  # this split holds the step's slot

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK)
    g_ok = offs_g < G
    d_ok = offs_d < D
    # Query heads h * G + g of sequence s: (G_PAD, D_PAD); the step's k and v of head h
    q_rows = Q + s * sq_n + (h * G + offs_g)[:, None] * sq_h
    q_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=q_ok, other=0.0)
    k_row = K + s * sk_n + h * sk_h
    k_new = tl.load(k_row + offs_d, mask=d_ok, other=0.0)
    v_new = tl.load(V + s * sv_n + h * sv_h + offs_d, mask=d_ok, other=0.0
                    ).to(KV.dtype.element_ty)
    if ROPE:  # rotate-half RoPE of q and k by token s's cos/sin, as eager_fused.rope
        half_d = D // 2
        partner = tl.where(offs_d < half_d, offs_d + half_d, offs_d - half_d)
        sign = tl.where(offs_d < half_d, -1.0, 1.0)
        cos = tl.load(CS + s * sc_n + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(SN + s * sc_n + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        q = rotated(q, tl.load(q_rows + partner[None, :], mask=q_ok, other=0.0),
                    cos[None, :], sin[None, :], sign[None, :], Q.dtype.element_ty)
        k_new = rotated(k_new, tl.load(k_row + partner, mask=d_ok, other=0.0), cos, sin,
                        sign, K.dtype.element_ty)
    k_new = k_new.to(KV.dtype.element_ty)
    slot = tl.load(Slots + s).to(tl.int64)  # stored at the end: no wait for it here
    if DOT_F32:
        q = q.to(tl.float32)
    k_head = KV + h * skv_h
    table = Tables + s * st_s

    # The online softmax starts from the step's own slot in the split that holds it (its
    # score from registers, p = 1), from nothing in the others.
    sc_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
    m_i = tl.where(mine, sc_new, float("-inf"))
    l_i = tl.where(mine, 1.0, tl.zeros([G_PAD], tl.float32))
    acc = tl.where(mine, v_new.to(tl.float32)[None, :], tl.zeros([G_PAD, D_PAD], tl.float32))
    for n0 in range(lo, tl.minimum(hi, last), BLOCK):  # the cached slots
        n = n0 + offs_n  # (BLOCK,) slots of this tile, gathered from their blocks
        live = n < tl.minimum(hi, last)
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

    if mine:  # the step's K/V into its slot (read by the next steps; this one took them
        # from registers)
        dst = KV + (slot // BS) * skv_b + h * skv_h + (slot % BS) * skv_s + offs_d
        tl.store(dst, k_new, mask=d_ok)
        tl.store(dst + skv_kv, v_new, mask=d_ok)
    if LATE:
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
    # Splits past the last slot (a short sequence, many splits) hold nothing: they store
    # no partials and take no part in the merge, which then reads only the used splits'.
    used = tl.minimum(splits, tl.cdiv(length, per_split))
    if used == 1 or DIRECT:  # one split holds every slot: the softmax is complete here
        if split == 0:
            out = acc / l_i[:, None]
            tl.store(Out + s * so_n + (h * G + offs_g)[:, None] * so_h + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=q_ok)
    elif split < used:
        # partials laid out (S * H_kv, splits, G, D_PAD) and (2, S * H_kv, splits, G)
        row = (sh * splits + split) * G + offs_g
        tl.store(Acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(ML + row, m_i, mask=g_ok)
        tl.store(ML + n_sh * splits * G + row, l_i, mask=g_ok)
        if MERGE:
            # The used split that arrives last merges: the block's stores, then one
            # release (Arrivals[sh] counts the splits done; the last resets it to 0).
            tl.debug_barrier()
            done = tl.atomic_add(Arrivals + sh, 1, sem="acq_rel", scope="gpu")
            if done == used - 1:
                _merge(Acc, ML, Out, s * so_n + h * G * so_h, so_h, sh, n_sh, G, splits,
                       used, D, D_PAD, G_M, CHUNK)
                tl.atomic_xchg(Arrivals + sh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge(Acc, ML, Out, out_at, so_h, sh, n_sh, G, splits, used, D: tl.constexpr,
           D_PAD: tl.constexpr, G_M: tl.constexpr, CHUNK: tl.constexpr):
    # The G rows of (sequence, KV head) ``sh`` from the partials of its ``used`` splits:
    # out = sum_j acc_j w_j / sum_j l_j w_j with w_j = exp2(m_j - max m), all G rows at
    # once, CHUNK splits a step (each step's maxima, sums and partials loaded together,
    # .cg: from L2, where the other splits stored them), rescaled as the maximum grows.
    offs_g = tl.arange(0, G_M)
    offs_d = tl.arange(0, D_PAD)
    offs_c = tl.arange(0, CHUNK)
    g_ok = offs_g < G
    m_run = tl.full([G_M], float("-inf"), tl.float32)
    den = tl.zeros([G_M], tl.float32)
    acc = tl.zeros([G_M, D_PAD], tl.float32)
    for j0 in range(0, used, CHUNK):
        j = j0 + offs_c
        at = (sh * splits + j[:, None]) * G + offs_g[None, :]  # (CHUNK, G_M)
        ok = (j < used)[:, None] & g_ok[None, :]
        m_j = tl.load(ML + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_j = tl.load(ML + n_sh * splits * G + at, mask=ok, other=0.0, cache_modifier=".cg")
        a = tl.load(Acc + at[:, :, None] * D_PAD + offs_d[None, None, :],
                    mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        m_j = tl.where(g_ok[None, :], m_j, 0.0)  # padding rows: finite, never stored
        m_new = tl.maximum(m_run, tl.max(m_j, 0))  # finite: a used split holds a slot
        scale = tl.exp2(m_run - m_new)
        w = tl.where(ok, tl.exp2(m_j - m_new[None, :]), 0.0)
        den = den * scale + tl.sum(l_j * w, 0)
        acc = acc * scale[:, None] + tl.sum(a * w[:, :, None], 0)
        m_run = m_new
    out = acc / den[:, None]
    tl.store(Out + out_at + offs_g[:, None] * so_h + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=g_ok[:, None] & (offs_d < D)[None, :])


@triton.jit(do_not_specialize=["n_sh", "splits"])
def _merge_kernel(Acc, ML, Seqlens, Out, so_n, so_h, n_sh, H_KV, G, splits,
                  D: tl.constexpr, D_PAD: tl.constexpr, G_M: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr):
    # One program per (sequence, KV head) with more than one used split (MERGE off).
    enter(PDL)
    sh = tl.program_id(0)
    s = sh // H_KV
    h = sh % H_KV
    length = tl.load(Seqlens + s).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, splits), BLOCK) * BLOCK
    used = tl.minimum(splits, tl.cdiv(length, per_split))
    if used > 1:
        _merge(Acc, ML, Out, s * so_n + h * G * so_h, so_h, sh, n_sh, G, splits, used,
               D, D_PAD, G_M, CHUNK)


# Whether the split that finishes last merges (one launch a layer), or a merge kernel
# after the split kernel does (two): A/B switch of session 32's measurements.
MERGE_IN_KERNEL = True
LATE_DEPENDENTS = False  # EXPERIMENT
NO_PDL = False  # EXPERIMENT


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
           slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
           splits: int, arrivals: torch.Tensor, cos: torch.Tensor | None,
           sin: torch.Tensor | None) -> torch.Tensor:
    """The front module's paged_decode (llamadist.kernels.paged_attention)."""
    s, h, d = q.shape
    h_kv, bs = kv.shape[2], kv.shape[3]
    g = h // h_kv
    if not 1 <= splits <= MAX_SPLITS:  # the merge's tile holds MAX_SPLITS
        raise ValueError(f"paged decode attention takes 1 to {MAX_SPLITS} splits, not {splits}")
    n_sh = s * h_kv
    if splits > 1 and arrivals.numel() < n_sh:
        raise ValueError(f"{arrivals.numel()} arrival counters for {n_sh} (sequence, KV "
                         "head) rows: give paged_decode a zeroed int32 counter per row")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    rope = cos is not None
    if rope:
        cos, sin = cos.reshape(s, d), sin.reshape(s, d)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    else:
        cos = sin = q  # never read
    d_pad = max(16, triton.next_power_of_2(d))
    g_m = triton.next_power_of_2(g)
    chunk = max(1, 32 // g_m)  # partials a load in the merge: 32 rows of D_PAD floats
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device)
    direct = splits == 1
    # Partials only with more than one split (never read otherwise: out stands in).
    acc = out if direct else torch.empty(n_sh, splits, g, d_pad, dtype=torch.float32,
                                         device=q.device)
    ml = out if direct else torch.empty(2, n_sh, splits, g, dtype=torch.float32,
                                        device=q.device)
    dep = dependent(q.device) if not NO_PDL else {"PDL": False}
    _decode_kernel[(n_sh, splits)](
        q, k, v, cos, sin, kv, slot_mapping, block_tables, seq_lens, acc, ml, arrivals, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), out.stride(0), out.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), block_tables.stride(0),
        n_sh, h_kv, g, d ** -0.5 * LOG2E, splits,
        D=d, D_PAD=d_pad, BS=bs, G_PAD=max(16, triton.next_power_of_2(g)), G_M=g_m,
        BLOCK=BLOCK_N, CHUNK=chunk, ROPE=rope, DIRECT=direct,
        MERGE=MERGE_IN_KERNEL, IEEE=q.dtype == torch.float32 or INTERPRETED,
        DOT_F32=INTERPRETED and q.dtype == torch.bfloat16, LATE=LATE_DEPENDENTS, num_warps=4,
        num_stages=2, enable_fp_fusion=False, **dep)
    if not direct and not MERGE_IN_KERNEL:
        _merge_kernel[(n_sh,)](acc, ml, seq_lens, out, out.stride(0), out.stride(1), n_sh,
                               h_kv, g, splits, D=d, D_PAD=d_pad, G_M=g_m,
                               CHUNK=chunk, BLOCK=BLOCK_N,
                               num_warps=4, **dep)
    return out
