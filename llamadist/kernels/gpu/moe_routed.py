"""The Triton code of llamadist.kernels.moe_routed (see its docstring): the gate/up and
down-sum kernels and their launch. Imported only through llamadist.kernels.gpu.load, on
the custom op's first call."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llamadist.kernels.moe_routed import DOWN_TILE, GATE_UP_TILE, NUM_WARPS


@triton.jit
def _gate_up_kernel(x_ptr, group_ptr, w13_ptr, act_ptr, D, F, K: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (r, a): act[a, r*BLOCK_R : (r+1)*BLOCK_R]
    a = tl.program_id(1)
    g = tl.load(group_ptr + a).to(tl.int64)  # the local expert; -1: not held
    # an expert not held: the loop below runs no step (reads nothing) and act = 0;
    # the masks stay plain bounds (c < D), so the loads keep their 16-byte vectors
    d_held = tl.where(g >= 0, D, 0)
    g = tl.maximum(g, 0)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_K)
    gate_rows = w13_ptr + g * 2 * F * D + rows.to(tl.int64)[:, None] * D  # (BLOCK_R, 1)
    up_rows = gate_rows + F.to(tl.int64) * D
    x_row = x_ptr + (a // K).to(tl.int64) * D
    acc_gate = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, d_held, BLOCK_K):
        c = k0 + cols
        c_ok = c < D  # (BLOCK_K,)
        xv = tl.load(x_row + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        m = (rows < F)[:, None] & c_ok[None, :]
        acc_gate += tl.load(gate_rows + c[None, :], mask=m, other=0.0).to(tl.float32) * xv
        acc_up += tl.load(up_rows + c[None, :], mask=m, other=0.0).to(tl.float32) * xv
    gate = tl.sum(acc_gate, axis=1)  # (BLOCK_R,)
    up = tl.sum(acc_up, axis=1)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up; 0 where not held
    tl.store(act_ptr + a.to(tl.int64) * F + rows, act, mask=rows < F)


@triton.jit
def _down_sum_kernel(act_ptr, group_ptr, weight_ptr, w2_ptr, out_ptr, D, F,
                     K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (r, n): out[n, r*BLOCK_R : (r+1)*BLOCK_R], summed over token n's k slots
    n = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for j in range(K):
        a = n * K + j
        g = tl.load(group_ptr + a).to(tl.int64)
        held = g >= 0
        f_held = tl.where(held, F, 0)  # not held: no step below, reads nothing, adds 0
        g = tl.maximum(g, 0)
        w_rows = w2_ptr + g * D * F + rows.to(tl.int64)[:, None] * F  # (BLOCK_R, 1)
        act_row = act_ptr + a.to(tl.int64) * F
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, f_held, BLOCK_K):
            c = k0 + cols
            c_ok = c < F  # (BLOCK_K,)
            av = tl.load(act_row + c, mask=c_ok, other=0.0)[None, :]
            m = (rows < D)[:, None] & c_ok[None, :]
            acc += tl.load(w_rows + c[None, :], mask=m, other=0.0).to(tl.float32) * av
        w = tl.load(weight_ptr + a).to(tl.float32)
        total += tl.sum(acc, axis=1) * tl.where(held, w, 0.0)
    tl.store(out_ptr + n.to(tl.int64) * D + rows,
             total.to(out_ptr.dtype.element_ty), mask=rows < D)


def launch(x: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
           w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The op's body: x (N, D), weights (A,) float32, group (A,) local experts (-1: not
    held) -> (N, D) (llamadist.kernels.moe_routed.routed_expert_sum)."""
    n, d = x.shape
    a = group.shape[0]
    f = w2.shape[2]
    act = torch.empty(a, f, dtype=torch.float32, device=x.device)  # (A, F)
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)  # (N, D)
    br, bk = GATE_UP_TILE
    _gate_up_kernel[(triton.cdiv(f, br), a)](x, group, w13, act, d, f, K=a // n,
                                             BLOCK_R=br, BLOCK_K=bk, num_warps=NUM_WARPS)
    br, bk = DOWN_TILE
    _down_sum_kernel[(triton.cdiv(d, br), n)](act, group, weights, w2, out, d, f,
                                              K=a // n, BLOCK_R=br, BLOCK_K=bk,
                                              num_warps=NUM_WARPS)
    return out
