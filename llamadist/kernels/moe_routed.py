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
step) and adds 0. Two kernels (three with split-K), no host sync, static shapes: a CUDA
graph captures them.

* ``_gate_up_kernel``, grid (F / BLOCK_R, A): BLOCK_R gate rows and the matching up rows of
  one assignment's expert, a (BLOCK_R, BLOCK_K) tile of each per step along D: each row's
  BLOCK_K contiguous elements are one wide coalesced load, and every weight row is read
  once per assignment. Writes silu(gate) * up in float32.
* ``_down_sum_kernel``, grid (D / BLOCK_R, N, S): BLOCK_R rows of W2 for each of a token's
  k assignments in turn, over the K range s of S (S = 1: all of F), the weighted sum over
  them kept in float32 in registers (one store per output, no atomics: the sum's order is
  fixed); S > 1 stores float32 partials (S, N, D) that ``_split_sum_kernel`` adds in split
  order.

``RoutedConfig`` says how each kernel cuts its GEMV (a ``Cut``: tile, warps, tiles loaded
ahead in registers, split-K of the down kernel, how x is loaded); the default is the best
cut of the H200 sweep of 2026-12-02, ``benchmarks/moe_routed_sweep.py`` times the others.

Accumulation is float32 whatever the weights' dtype (bf16 on the GPU; float32 runs in
Triton's CPU interpreter for the tests). The launch is one torch custom op,
``llamadist::moe_routed``, so torch.compile keeps it opaque inside a compiled layer; the
kernels themselves (and triton) are in llamadist.kernels.gpu.moe_routed, imported on the
op's first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamadist.kernels import gpu


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class Cut:
    """How one kernel cuts its GEMV. A program reduces ``rows`` weight rows, a (rows,
    cols) tile per step along K (powers of two), with ``warps`` warps. ``prefetch`` (0, 1,
    2): weight tiles whose loads are issued that many steps ahead, held in registers
    (Triton does not pipeline a loop without tl.dot: with 0 each step waits on its own
    loads, as llamadist.kernels.gpu.wquant's GEMV found). ``split``: K ranges, one program
    each (the down kernel only: float32 partials, then summed in split order, no atomics;
    gate/up has F / rows programs per assignment, 896 for Mixtral at 16 rows, already
    several per SM). ``x_tile``: x (act) loaded through pointers broadcast to the tile's
    shape, in the tile's own layout, rather than one row broadcast after its load (which
    Triton may route through shared memory and a barrier each step)."""

    rows: int
    cols: int
    warps: int = 4
    prefetch: int = 0
    split: int = 1
    x_tile: bool = False

    def __post_init__(self):
        if not (_pow2(self.rows) and _pow2(self.cols) and _pow2(self.warps)
                and self.prefetch in (0, 1, 2) and self.split >= 1):
            raise ValueError(f"routed kernel cut {self}: rows, cols and warps are powers "
                             "of two, prefetch 0-2, split >= 1")

    def label(self) -> str:
        return (f"{self.rows}x{self.cols}w{self.warps}p{self.prefetch}"
                + (f"s{self.split}" if self.split > 1 else "") + ("x" if self.x_tile else ""))


# A GEMV is memory-bound: enough programs to keep every multiprocessor's loads in flight
# (Mixtral, N = 1: F / 16 = 896 gate/up programs per assignment, D / 4 = 1024 down
# programs), and 16 B per thread per row load. The default: the H200 sweep of 2026-12-02
# (benchmarks/RESULTS.md "... H200 sweep of session 12"), Mixtral-8x7B at N = 1, 2, 3
# tokens: gate/up 16 x 128 the fastest of 37 cuts at each N (4-6% under the first cut,
# 16 x 256); down 4 x 512 within 0.6% of the fastest of 145 at each N (the first, 8 x 512,
# within 0.9-2.9%); both 4 warps, no prefetch, no split, x loaded as a row.
@dataclass(frozen=True)
class RoutedConfig:
    """The two kernels' cuts: ``gate_up`` (split 1) and ``down``."""

    gate_up: Cut = field(default_factory=lambda: Cut(16, 128))
    down: Cut = field(default_factory=lambda: Cut(4, 512))

    def __post_init__(self):
        if self.gate_up.split != 1:
            raise ValueError("the gate/up kernel has no split-K (split=1)")

    def label(self) -> str:
        return f"gu{self.gate_up.label()}_dn{self.down.label()}"

    def ints(self) -> list[int]:
        """The fields as the custom op takes them (``from_ints`` reads them back)."""
        return [int(v) for c in (self.gate_up, self.down)
                for v in (c.rows, c.cols, c.warps, c.prefetch, c.split, c.x_tile)]

    @classmethod
    def from_ints(cls, v: list[int]) -> "RoutedConfig":
        def cut(w):
            return Cut(*w[:5], x_tile=bool(w[5]))
        return cls(cut(v[:6]), cut(v[6:12]))


DEFAULT = RoutedConfig()
_DEFAULT_INTS = DEFAULT.ints()


def usable(device: torch.device) -> bool:
    """Whether the routed kernel runs on ``device``: Triton installed, and a CUDA device (or
    any device under Triton's interpreter, TRITON_INTERPRET=1: the CPU tests)."""
    return gpu.runs_on(device)


def _moe_routed_impl(x: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
                     w13: torch.Tensor, w2: torch.Tensor, config: list[int]) -> torch.Tensor:
    return gpu.load("moe_routed").launch(x, weights, group, w13, w2,
                                         RoutedConfig.from_ints(config))


_moe_routed_op = gpu.custom_op("llamadist::moe_routed", _moe_routed_impl)  # out: x's shape


def routed_expert_sum(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor,
                      slot: torch.Tensor | None = None,
                      config: RoutedConfig | None = None) -> torch.Tensor:
    """grouped_expert_sum's contract: x (N, D), weights (N, k) float32, index (N, k) global
    expert ids, w13 (G, 2F, D) (gate rows then up rows), w2 (G, D, F), slot (E,) long: the
    group of each global expert, -1 where not held (None: expert e is group e) -> (N, D)
    in x's dtype, the weighted sum over the held experts; ``config``: the kernels' cuts
    (None: DEFAULT). Check ``usable`` first."""
    n, k = index.shape
    g, f2, d = w13.shape
    if (x.shape != (n, d) or w2.shape != (g, d, f2 // 2) or x.dtype != w13.dtype
            or w2.dtype != x.dtype):
        raise ValueError(f"routed experts: x {tuple(x.shape)} {x.dtype}, index {(n, k)}, "
                         f"w13 {tuple(w13.shape)} {w13.dtype}, w2 {tuple(w2.shape)}")
    if n * k == 0:  # no tokens (or no slots): nothing to launch
        return torch.zeros_like(x)
    flat = index.flatten()  # (A,) token-major: assignment a is token a // k, slot a % k
    group = flat if slot is None else slot[flat]
    return _moe_routed_op(
        x.contiguous(), weights.float().contiguous().flatten(), group.contiguous(),
        w13.contiguous(), w2.contiguous(),
        _DEFAULT_INTS if config is None else config.ints())
