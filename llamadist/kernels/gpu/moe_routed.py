"""The Triton code of llamadist.kernels.moe_routed (see its docstring): the gate/up and
down-sum kernels, the split-K sum, and their launches. Imported only through
llamadist.kernels.gpu.load, on the custom op's first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels.gpu.dependent import dependent, enter
from llamadist.kernels.moe_routed import Cut, RoutedConfig


@triton.jit
def _w_tile(row_ptrs, rows_ok, k0, k_end, K_LEN, BLOCK_K: tl.constexpr):
    """The (BLOCK_R, BLOCK_K) weight tile at columns [k0, k0 + BLOCK_K) of the rows, in the
    weights' dtype: zeros past K_LEN, and all zeros (nothing read) when the tile starts at
    or past k_end (a prefetch beyond this program's range, or an expert not held). Tiles
    start at multiples of BLOCK_K, so k_end masks whole tiles: the mask along K stays
    plain bounds (c < K_LEN) and a splat, and the loads keep their 16-byte vectors."""
    c = k0 + tl.arange(0, BLOCK_K)
    live = tl.zeros((BLOCK_K,), dtype=tl.int32) + k0 < k_end  # (a splat: the interpreter's
    m = rows_ok[:, None] & ((c < K_LEN) & live)[None, :]       # & refuses a scalar bool)
    return tl.load(row_ptrs + c[None, :], mask=m, other=0.0)


@triton.jit
def _x_part(row_ptr, k0, K_LEN, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
            X_TILE: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of one row of x (act) in float32, as a (BLOCK_R, BLOCK_K)
    operand (X_TILE: each thread loads the columns of its tile elements, in the tile's
    layout) or a (1, BLOCK_K) one broadcast after the load. One return: Triton's compiler
    (not its interpreter) wants every return of a function to have one type, even one
    under a constexpr if (the two shapes here differ)."""
    c = k0 + tl.arange(0, BLOCK_K)
    if X_TILE:
        p = tl.broadcast_to((row_ptr + c)[None, :], (BLOCK_R, BLOCK_K))
        v = tl.load(p, mask=(c < K_LEN)[None, :], other=0.0).to(tl.float32)
    else:
        v = tl.load(row_ptr + c, mask=c < K_LEN, other=0.0).to(tl.float32)[None, :]
    return v


@triton.jit
def _gate_up_kernel(x_ptr, group_ptr, w13_ptr, act_ptr, D, F, K: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                    X_TILE: tl.constexpr, PDL: tl.constexpr):
    # program (r, a): act[a, r*BLOCK_R : (r+1)*BLOCK_R]
    enter(PDL)
    a = tl.program_id(1)
    g = tl.load(group_ptr + a).to(tl.int64)  # the local expert; -1: not held
    d_held = tl.where(g >= 0, D, 0)  # not held: no step below, nothing read, act = 0
    g = tl.maximum(g, 0)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    rows_ok = rows < F
    gate_rows = w13_ptr + g * 2 * F * D + rows.to(tl.int64)[:, None] * D  # (BLOCK_R, 1)
    up_rows = gate_rows + F.to(tl.int64) * D
    x_row = x_ptr + (a // K).to(tl.int64) * D
    acc_gate = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if PREFETCH >= 1:  # the first tiles, before the loop
        gate_n = _w_tile(gate_rows, rows_ok, 0, d_held, D, BLOCK_K)
        up_n = _w_tile(up_rows, rows_ok, 0, d_held, D, BLOCK_K)
    if PREFETCH == 2:
        gate_n2 = _w_tile(gate_rows, rows_ok, BLOCK_K, d_held, D, BLOCK_K)
        up_n2 = _w_tile(up_rows, rows_ok, BLOCK_K, d_held, D, BLOCK_K)
    for k0 in range(0, d_held, BLOCK_K):
        if PREFETCH == 2:  # issue the loads two tiles ahead, then work on this one
            wg, wu, gate_n, up_n = gate_n, up_n, gate_n2, up_n2
            gate_n2 = _w_tile(gate_rows, rows_ok, k0 + 2 * BLOCK_K, d_held, D, BLOCK_K)
            up_n2 = _w_tile(up_rows, rows_ok, k0 + 2 * BLOCK_K, d_held, D, BLOCK_K)
        elif PREFETCH == 1:
            wg, wu = gate_n, up_n
            gate_n = _w_tile(gate_rows, rows_ok, k0 + BLOCK_K, d_held, D, BLOCK_K)
            up_n = _w_tile(up_rows, rows_ok, k0 + BLOCK_K, d_held, D, BLOCK_K)
        else:
            wg = _w_tile(gate_rows, rows_ok, k0, d_held, D, BLOCK_K)
            wu = _w_tile(up_rows, rows_ok, k0, d_held, D, BLOCK_K)
        xv = _x_part(x_row, k0, D, BLOCK_R, BLOCK_K, X_TILE)
        acc_gate += wg.to(tl.float32) * xv
        acc_up += wu.to(tl.float32) * xv
    gate = tl.sum(acc_gate, axis=1)  # (BLOCK_R,)
    up = tl.sum(acc_up, axis=1)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up; 0 where not held
    tl.store(act_ptr + a.to(tl.int64) * F + rows, act, mask=rows_ok)


@triton.jit
def _down_sum_kernel(act_ptr, group_ptr, weight_ptr, w2_ptr, out_ptr, D, F, KS, N,
                     K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREFETCH: tl.constexpr, X_TILE: tl.constexpr, PARTIAL: tl.constexpr,
                     PDL: tl.constexpr):
    # program (r, n, s): out[n, r*BLOCK_R : (r+1)*BLOCK_R] over columns [s*KS, s*KS + KS)
    # of F (KS: whole tiles), summed over token n's k slots; PARTIAL: float32 into the
    # partials (S, N, D) at out_ptr
    enter(PDL)
    n = tl.program_id(1)
    s = tl.program_id(2)
    lo = s * KS
    hi = tl.minimum(lo + KS, F)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    rows_ok = rows < D
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for j in range(K):
        a = n * K + j
        g = tl.load(group_ptr + a).to(tl.int64)
        held = g >= 0
        end = tl.where(held, hi, lo)  # not held: no step below, reads nothing, adds 0
        g = tl.maximum(g, 0)
        w_rows = w2_ptr + g * D * F + rows.to(tl.int64)[:, None] * F  # (BLOCK_R, 1)
        act_row = act_ptr + a.to(tl.int64) * F
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        if PREFETCH >= 1:
            nxt = _w_tile(w_rows, rows_ok, lo, end, F, BLOCK_K)
        if PREFETCH == 2:
            nxt2 = _w_tile(w_rows, rows_ok, lo + BLOCK_K, end, F, BLOCK_K)
        for k0 in range(lo, end, BLOCK_K):
            if PREFETCH == 2:
                w, nxt = nxt, nxt2
                nxt2 = _w_tile(w_rows, rows_ok, k0 + 2 * BLOCK_K, end, F, BLOCK_K)
            elif PREFETCH == 1:
                w = nxt
                nxt = _w_tile(w_rows, rows_ok, k0 + BLOCK_K, end, F, BLOCK_K)
            else:
                w = _w_tile(w_rows, rows_ok, k0, end, F, BLOCK_K)
            acc += w.to(tl.float32) * _x_part(act_row, k0, F, BLOCK_R, BLOCK_K, X_TILE)
        wt = tl.load(weight_ptr + a).to(tl.float32)
        total += tl.sum(acc, axis=1) * tl.where(held, wt, 0.0)
    if PARTIAL:
        tl.store(out_ptr + (s * N + n).to(tl.int64) * D + rows, total, mask=rows_ok)
    else:
        tl.store(out_ptr + n.to(tl.int64) * D + rows,
                 total.to(out_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def _split_sum_kernel(p_ptr, out_ptr, L, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    """out[i] = the float32 partials p (SPLIT, L) summed over splits in split order."""
    enter(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * L + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


def gate_up(x: torch.Tensor, group: torch.Tensor, w13: torch.Tensor, cut: Cut) -> torch.Tensor:
    """act (A, F) float32 = silu(gate) * up of each assignment (x (N, D), group (A,))."""
    n, d = x.shape
    a = group.shape[0]
    f = w13.shape[1] // 2
    act = torch.empty(a, f, dtype=torch.float32, device=x.device)
    dep = dependent(x.device)
    _gate_up_kernel[(triton.cdiv(f, cut.rows), a)](
        x, group, w13, act, d, f, K=a // n, BLOCK_R=cut.rows, BLOCK_K=cut.cols,
        PREFETCH=cut.prefetch, X_TILE=cut.x_tile, num_warps=cut.warps, **dep)
    return act


def down_sum(act: torch.Tensor, weights: torch.Tensor, group: torch.Tensor, w2: torch.Tensor,
             n: int, cut: Cut) -> torch.Tensor:
    """out (N, D) in w2's dtype: each token's weighted sum of W2[g] @ act over its slots."""
    a, f = act.shape
    d = w2.shape[1]
    split = max(1, min(cut.split, triton.cdiv(f, cut.cols)))
    ks = triton.cdiv(f, split * cut.cols) * cut.cols  # columns per K range, whole tiles
    split = triton.cdiv(f, ks)
    out = torch.empty(n, d, dtype=w2.dtype, device=act.device)  # (N, D)
    part = out if split == 1 else torch.empty(split, n, d, dtype=torch.float32,
                                              device=act.device)  # (S, N, D)
    dep = dependent(act.device)
    _down_sum_kernel[(triton.cdiv(d, cut.rows), n, split)](
        act, group, weights, w2, part, d, f, ks, n, K=a // n, BLOCK_R=cut.rows,
        BLOCK_K=cut.cols, PREFETCH=cut.prefetch, X_TILE=cut.x_tile, PARTIAL=split > 1,
        num_warps=cut.warps, **dep)
    if split > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(n * d, block),)](part, out, n * d, SPLIT=split,
                                                        BLOCK=block, num_warps=4, **dep)
    return out


def launch(x: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
           w13: torch.Tensor, w2: torch.Tensor, config: RoutedConfig) -> torch.Tensor:
    """The op's body: x (N, D), weights (A,) float32, group (A,) local experts (-1: not
    held) -> (N, D) (llamadist.kernels.moe_routed.routed_expert_sum)."""
    act = gate_up(x, group, w13, config.gate_up)  # (A, F)
    return down_sum(act, weights, group, w2, x.shape[0], config.down)
