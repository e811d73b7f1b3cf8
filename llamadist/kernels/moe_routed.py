"""Mixture-of-experts experts for a few tokens in Triton: a routed expert GEMV that reads
only the rows of the experts the tokens were routed to.

For A = N * k assignments (token n, slot j) -> group g(a) = slot[index[n, j]] (the local
expert; -1: held elsewhere, an expert-parallel share):

    act[a] = silu(W13[g][:F] @ x[a // k]) * (W13[g][F:] @ x[a // k])   (A, F) float32
    out[n] = sum_j weights[n, j] * (W2[g(n, j)] @ act[n * k + j])      (N, D) x's dtype

as llamadist.kernels.moe_grouped.grouped_expert_sum, whose grouped GEMM reads every held
expert's weights each step whatever its token count: below G assignments (decode at batch
1 to 3 of Mixtral's 8 experts, top-2) this kernel reads fewer bytes (moe_grouped.expert_path
chooses). An assignment to an expert not held reads nothing (its tile loops run no
step) and adds 0. Two kernels, no host sync, static shapes: a CUDA graph captures them.

* ``_gate_up_kernel``, grid (F / BLOCK_R, A): BLOCK_R gate rows and the matching up rows of
  one assignment's expert, a (BLOCK_R, BLOCK_K) tile of each per step along D: each row's
  BLOCK_K contiguous elements are one wide coalesced load, and every weight row is read
  once per assignment. Writes silu(gate) * up in float32.
* ``_down_sum_kernel``, grid (D / BLOCK_R, N): BLOCK_R rows of W2 for each of a token's k
  assignments in turn, the weighted sum over them kept in float32 in registers (one store
  per output, no atomics: the sum's order is fixed).

Accumulation is float32 whatever the weights' dtype (bf16 on the GPU; float32 runs in
Triton's CPU interpreter for the tests). The launch is one torch custom op,
``llamadist::moe_routed``, so torch.compile keeps it opaque inside a compiled layer.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the grouped GEMM / the expert loop serve
    triton = None

# Tiles (rows, columns) of the two kernels. A GEMV is memory-bound: enough programs to
# keep every multiprocessor's loads in flight (Mixtral, N = 1: F / 16 = 896 gate/up
# programs per assignment, D / 8 = 512 down programs), and 16 B per thread per row load.
GATE_UP_TILE = (16, 256)
DOWN_TILE = (8, 512)
NUM_WARPS = 4


def usable(device: torch.device) -> bool:
    """Whether the routed kernel runs on ``device``: Triton present, and a CUDA device (or
    any device under Triton's interpreter, TRITON_INTERPRET=1: the CPU tests)."""
    import os
    return triton is not None and (device.type == "cuda"
                                   or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
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

    def _launch(x: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
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

    @torch.library.custom_op("llamadist::moe_routed", mutates_args=())
    def _moe_routed_op(x: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return _launch(x, weights, group, w13, w2)

    @_moe_routed_op.register_fake
    def _(x, weights, group, w13, w2):
        return x.new_empty(x.shape)


def routed_expert_sum(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor,
                      slot: torch.Tensor | None = None) -> torch.Tensor:
    """grouped_expert_sum's contract: x (N, D), weights (N, k) float32, index (N, k) global
    expert ids, w13 (G, 2F, D) (gate rows then up rows), w2 (G, D, F), slot (E,) long: the
    group of each global expert, -1 where not held (None: expert e is group e) -> (N, D)
    in x's dtype, the weighted sum over the held experts. Check ``usable`` first."""
    n, k = index.shape
    g, f2, d = w13.shape
    if x.shape != (n, d) or w2.shape != (g, d, f2 // 2) or x.dtype != w13.dtype:
        raise ValueError(f"routed experts: x {tuple(x.shape)} {x.dtype}, index {(n, k)}, "
                         f"w13 {tuple(w13.shape)} {w13.dtype}, w2 {tuple(w2.shape)}")
    if n * k == 0:  # no tokens (or no slots): nothing to launch
        return torch.zeros_like(x)
    flat = index.flatten()  # (A,) token-major: assignment a is token a // k, slot a % k
    group = flat if slot is None else slot[flat]
    return torch.ops.llamadist.moe_routed(
        x.contiguous(), weights.float().contiguous().flatten(), group.contiguous(),
        w13.contiguous(), w2.contiguous())
