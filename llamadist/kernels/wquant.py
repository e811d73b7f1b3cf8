"""Weight-only quantized matrices for GPU stages: int8, int4 and fp8 (``PackedWeight``).

W (N out, K in) is stored as codes plus one scale (and, for int4, one offset) per group of
``group`` consecutive inputs of a row; G = ceil(K / group) groups per row:

    int8  q int8 (N, K),                         w = scale[n, k // group] * q
    int4  q uint8 (N, ceil(K / 2)), two codes    w = scale[n, k // group] * c + offset[...]
          a byte (input 2j low nibble, 2j + 1    (c in 0..15)
          high nibble)
    fp8   q uint8 (N, K): float8 e4m3 bits       w = scale[n, 0] * e4m3(q)  (one scale a row)

``--quantize`` makes them from float weights at load: int8 one scale per output channel
(group = K, symmetric: scale = max|w| / 127), int4 group 128 asymmetric (scale = (max -
min) / 15, offset = min; ``int4-g32``, ``-g64``, ``-g256`` other groups:
config.INT4_GROUPS), fp8 one scale per channel (max|w| / 448). Each stays within
half a step of w (int8, int4: |w - w'| <= scale / 2; fp8: half a unit of e4m3's last place,
|w|/16, plus the subnormal step scale * 2^-10), which the tests check.

A GGUF block tensor on a GPU stage converts without loss where the format allows:
Q8_0 -> int8 group 32 (its f16 d as the scale), Q4_0 -> int4 group 32 (scale d, offset
-8d), Q4_1 -> int4 (d, m), Q4_K -> int4 group 32 (d * sc, -dmin * m, in float32); Q5_K
and Q6_K are requantized to int8 group 32 from their exact values (within half an int8
step). The scales keep the dtype they were made in (float16 from GGUF's d, else float32);
the kernels read them in float32.

``PackedWeight`` sits in a Linear's ``weight`` slot (as kernels.quant.QuantizedTensor
does on CPU stages) and serves ``F.linear`` (the Triton kernels of wquant_triton on CUDA,
a dequantized matmul elsewhere) and ``torch.cat`` along rows (projection fusion). The
kernel pass makes such a Linear a ``PackedLinear``, whose product is torch-native
(wquant_torch: tinygemm for int4, a scaled matmul for int8 / fp8; the default) or the
Triton kernels, as ``RuntimeConfig.wquant`` says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import INT4_GROUP, ConfigError, quantize_group
from llamadist.kernels import cuda_int8, gpu, wquant_torch, wquant_triton
from llamadist.kernels.quant import QuantizedTensor
from llamadist.kernels.quant_ref import FORMATS, TYPE_IDS, dequantize

KINDS = ("int8", "int4", "fp8")
# Triton's interpreter (CPU tensors) stands in for a GPU in tests: the kernels then serve
# CPU tensors too.
INTERPRET = gpu.interpreted()  # a constant: read by forwards torch.compile traces
FP8_MAX = 448.0  # largest finite float8 e4m3fn


class PackedWeight:
    """W (N, K) in one of KINDS: ``q`` codes, ``scale`` (N, G), ``offset`` (N, G) or None,
    ``group`` inputs per scale. Not a torch.Tensor: F.linear and torch.cat take it through
    ``__torch_function__``; anything else raises a TypeError naming the function."""

    def __init__(self, kind: str, q: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None, group: int, shape: tuple[int, int]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown weight format {kind!r}; choose one of {', '.join(KINDS)}")
        n, k = shape
        groups = -(-k // group)
        cols = wquant_triton.code_bytes(kind, k)
        want_q = torch.int8 if kind == "int8" else torch.uint8
        if (q.dtype != want_q or tuple(q.shape) != (n, cols)
                or tuple(scale.shape) != (n, groups)
                or (offset is None) != (kind != "int4")
                or (offset is not None and tuple(offset.shape) != (n, groups))):
            raise ValueError(f"{kind} {shape} group {group}: expected {want_q} codes ({n}, "
                             f"{cols}) and scales ({n}, {groups}), got {q.dtype} "
                             f"{tuple(q.shape)} and {tuple(scale.shape)}")
        self.kind, self.group = kind, group
        self.q, self.scale, self.offset = q.contiguous(), scale.contiguous(), offset
        if offset is not None:
            self.offset = offset.contiguous()
        self.shape = torch.Size(shape)

    dtype = torch.uint8  # never a float: float-only kernels pass it by
    is_meta = False
    requires_grad = False

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.scale, self.offset) if t is not None)

    def dim(self) -> int:
        return 2

    def size(self, d: int | None = None) -> Any:
        return self.shape if d is None else self.shape[d]

    def detach(self) -> "PackedWeight":
        return self

    def to(self, device: torch.device | str) -> "PackedWeight":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return PackedWeight(self.kind, move(self.q), move(self.scale), move(self.offset),
                            self.group, tuple(self.shape))

    def __repr__(self) -> str:
        return f"PackedWeight({self.kind}, group={self.group}, shape={tuple(self.shape)})"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (N, K) in ``dtype``, computed in float64 where asked, else float32."""
        n, k = self.shape
        calc = torch.float64 if dtype == torch.float64 else torch.float32
        if self.kind == "int8":
            codes = self.q.to(calc)
        elif self.kind == "int4":
            codes = unpack_int4(self.q, k).to(calc)
        else:
            codes = self.q.view(torch.float8_e4m3fn).to(calc)
        idx = torch.arange(k, device=self.q.device) // self.group
        w = codes * self.scale.to(calc)[:, idx]
        if self.offset is not None:
            w = w + self.offset.to(calc)[:, idx]
        return w.to(dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        impl = _HANDLED.get(func)
        if impl is None:
            raise TypeError(f"{getattr(func, '__name__', func)} does not take a PackedWeight "
                            f"(it serves F.linear and torch.cat); call .dequantize() first")
        return impl(*args, **(kwargs or {}))


# ---- formats -----------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, ceil(K / 2)) uint8, input 2j in the low nibble."""
    n, k = codes.shape
    c = codes.to(torch.uint8)
    if k % 2:
        c = torch.cat([c, c.new_zeros(n, 1)], dim=1)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(q: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K / 2)) uint8 -> (N, K) codes 0..15 (uint8)."""
    return torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], -1)[:, :k]


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, G, group) float32, a short last group padded with copies of its
    last input (zeros would widen an asymmetric group's range when its inputs share a
    sign; copies leave every group's min, max and max |w| as its own inputs')."""
    n, k = w.shape
    g = -(-k // group)
    w = w.float()
    if g * group != k:
        w = torch.cat([w, w[:, -1:].expand(n, g * group - k)], dim=1)
    return w.view(n, g, group)


def quantize_int8(w: torch.Tensor, group: int | None = None) -> PackedWeight:
    """Symmetric int8, one scale per ``group`` inputs (None: one per output channel)."""
    n, k = w.shape
    group = group or k
    wg = _groups(w, group)
    scale = wg.abs().amax(-1) / 127                                 # (N, G)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return PackedWeight("int8", q.view(n, -1)[:, :k], scale, None, group, (n, k))


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> PackedWeight:
    """Asymmetric int4 per ``group`` inputs: codes 0..15 between the group's min and max."""
    if group % 2:
        raise ValueError(f"int4 groups hold an even number of inputs, got {group}")
    n, k = w.shape
    wg = _groups(w, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    return PackedWeight("int4", pack_int4(codes.view(n, -1)[:, :k]), scale, lo, group, (n, k))


def quantize_fp8(w: torch.Tensor) -> PackedWeight:
    """float8 e4m3 with one float32 scale per output channel (max|w| maps to 448)."""
    n, k = w.shape
    scale = w.float().abs().amax(-1, keepdim=True) / FP8_MAX         # (N, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return PackedWeight("fp8", q.view(torch.uint8), scale, None, k, (n, k))


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}


def quantize(w: torch.Tensor, fmt: str) -> PackedWeight:
    """W (N, K) float -> ``fmt`` (a --quantize format: int8, fp8, int4 or int4-gN) with its
    layout (on w's device)."""
    try:
        kind, group = quantize_group(fmt)
    except ConfigError as e:
        raise ValueError(f"--quantize {fmt!r}: {e}") from None
    return quantize_int4(w, group) if group else QUANTIZERS[kind](w)


# ---- GGUF blocks -> GPU formats -------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (...) float16, little-endian."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n): the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _k_scales_t(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_ref._k_scales in torch ops: 12 bytes -> 6-bit (scales, mins) (..., 8)."""
    sc = sc.to(torch.int32)
    lo_s, lo_m = sc[..., 0:4] & 63, sc[..., 4:8] & 63
    hi_s = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    hi_m = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return torch.cat([lo_s, hi_s], -1).float(), torch.cat([lo_m, hi_m], -1).float()


GPU_CONVERTS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K")  # what from_gguf converts on the blocks' device


def from_gguf(blocks: torch.Tensor, qtype: int, shape: tuple[int, int],
              device: torch.device | str | None = None) -> PackedWeight:
    """A GGUF block matrix (N, row bytes) uint8 of ggml type ``qtype`` -> int8 / int4 (see
    the module docstring for which, and where it is exact). Torch ops on the blocks' own
    device: blocks moved to a GPU first convert there (a 70B file's 40 GB in seconds,
    where the host's numpy took minutes); Q5_K and Q6_K dequantize on the host (give them
    host blocks: GPU_CONVERTS) and requantize on ``device`` (default: the blocks')."""
    name = FORMATS[qtype][0]
    n, k = shape
    b = blocks.reshape(n, k // 32 if name in ("Q8_0", "Q4_0", "Q4_1") else k // 256, -1)
    if name == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return PackedWeight("int8", q, _f16(b[..., 0:2]), None, 32, shape)
    if name in ("Q4_0", "Q4_1"):
        codes = _nibbles(b[..., 2:] if name == "Q4_0" else b[..., 4:]).reshape(n, k)
        d = _f16(b[..., 0:2])
        m = -8 * d if name == "Q4_0" else _f16(b[..., 2:4])
        return PackedWeight("int4", pack_int4(codes), d, m, 32, shape)
    if name == "Q4_K":
        d, dmin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()   # (N, nb)
        sc, mn = _k_scales_t(b[..., 4:16])                                 # (N, nb, 8)
        q = b[..., 16:144].reshape(n, -1, 4, 32)  # chunk i: sub-blocks 2i (low), 2i+1 (high)
        codes = torch.stack([q & 0x0F, q >> 4], dim=-2).reshape(n, k)
        scale = (d[..., None] * sc).reshape(n, -1)
        offset = (-dmin[..., None] * mn).reshape(n, -1)
        return PackedWeight("int4", pack_int4(codes), scale, offset, 32, shape)
    w = torch.from_numpy(dequantize(blocks.cpu().numpy(), qtype, k))  # Q5_K, Q6_K: exact
    w = w.float().to(device or blocks.device)  # (float32, as _groups casts it)
    return quantize_int8(w, group=32)


# ---- torch functions -------------------------------------------------------------------
def _triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take x: installed, and x on CUDA (or the interpreter)."""
    return gpu.INSTALLED and (x.is_cuda or INTERPRET)


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias): x (..., K) -> (..., N) in x's dtype."""
    if x.shape[-1] != w.shape[1]:
        raise RuntimeError(f"linear: x has {x.shape[-1]} features, the weight {tuple(w.shape)}")
    if _triton_runs(x):
        return wquant_triton.packed_linear(x, w, bias)
    return F.linear(x, w.dequantize(x.dtype), bias)


class PackedLinear(nn.Linear):
    """An nn.Linear whose ``weight`` is a PackedWeight, made by ``as_packed_linear``, with
    the tensors its product reads as buffers, so torch.compile traces the module whole (a
    plain object's __torch_function__ would break its graph). ``path`` says which product:

    * "triton": the custom op llamadist::packed_linear (wquant_triton) on ``qweight``,
      ``wscale``, ``woffset``; on tensors Triton cannot take, a dequantized matmul;
    * "tinygemm": int4 through torch's tinygemm (wquant_torch.int4_linear; its decode rows
      through cuda_int4's kernel where ``tg_rows``) on ``tg_weight`` and
      ``tg_scales_zeros``; the PackedWeight's own codes then live in host
      memory (for ``.dequantize()``), so the GPU holds one copy of the weight;
    * "scaled": int8 / fp8 as (x @ q^T) * scale (wquant_torch.scaled_linear) on
      ``qweight`` and ``wscale``, except up to wquant_torch.TRITON_ROWS rows where the
      Triton kernels run (the GEMV, then tl.dot tiles): the scaled product writes W in x's
      dtype before cuBLAS reads it, which decode cannot pay (on an H200, Llama-3-8B's
      batch-1 step in int8 took 10.18 ms against bf16's 4.49 that way, 3.63 ms through
      the GEMV; RESULTS.md sessions 15, 16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "tinygemm":
            return wquant_torch.int4_linear(x, self.tg_weight, self.tg_scales_zeros,
                                            self.group, self.out_features, self.bias,
                                            self.tg_triton, self.tg_rows)
        if self._scaled_rows(x):
            return wquant_torch.scaled_linear(x, self.qweight, self.wscale, self.wkind,
                                              self.group, self.bias)
        if _triton_runs(x):
            return wquant_triton.packed_linear_op(
                x, self.qweight, self.wscale, self.woffset, self.bias, self.kind_id,
                self.group, self.out_features, self.in_features)
        return linear(x, self.weight, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up (..., out_features / 2) of this gate | up product (a fused MLP's
        gate_up_proj) through one call that writes it: the Triton GEMV
        (wquant_triton.launch_glu), or on tinygemm's words cuda_int4's kernel
        (wquant_torch.int4_glu, where ``tg_rows`` and it takes the rows); None where
        neither takes x (tinygemm's other products, the scaled product's rows)."""
        if self.bias is not None or self.out_features % 2:
            return None
        if self.path == "tinygemm":
            return wquant_torch.int4_glu(x, self.tg_weight, self.tg_scales_zeros, self.group,
                                         self.out_features, self.tg_rows)
        if self._scaled_rows(x) or not _triton_runs(x):
            return None
        return wquant_triton.packed_glu_op(x, self.qweight, self.wscale, self.woffset,
                                           self.kind_id, self.group, self.out_features,
                                           self.in_features)

    def norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                     weight: torch.Tensor, eps: float, glu: bool = False,
                     rope: tuple | None = None, kv: tuple | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h, this product of RMSNorm(h)) with h = x + residual (``glu``: silu(gate) * up
        of it, as ``silu_mul``; ``rope``, ``kv``: as ``rope_forward``), the norm inside the
        product's own kernel: on tinygemm's words, cuda_int4's norm variant
        (wquant_torch.int4_norm, where ``tg_rows`` and it takes the rows); None where it
        does not (the caller runs the norm, then this)."""
        if self.path != "tinygemm" or self.bias is not None or (glu and self.out_features % 2):
            return None
        return wquant_torch.int4_norm(x, residual, weight, eps, self.tg_weight,
                                      self.tg_scales_zeros, self.group, self.out_features,
                                      self.tg_rows, glu, rope, kv)

    def rope_forward(self, x: torch.Tensor, rope: tuple, kv: tuple | None = None
                     ) -> torch.Tensor | None:
        """This product of a fused q | k | v projection with its first ``rot`` columns (q's
        and k's heads, D = cos.shape[-1] columns each) rotated, ``rope`` (cos, sin, rot)
        with cos / sin one row a row of x, through one call that writes it: on tinygemm's
        words, cuda_int4's RoPE variant (wquant_torch.int4_rope, where ``tg_rows`` and it
        takes the rows); None where it does not (the caller runs the product, then RoPE).
        ``kv`` (cache, slots, qcols): k's and v's heads also stored in that paged cache at
        the rows' slots (None where the kernel does not)."""
        if self.path != "tinygemm" or self.bias is not None:
            return None
        cos, sin, rot = rope
        return wquant_torch.int4_rope(x, self.tg_weight, self.tg_scales_zeros, self.group,
                                      self.out_features, cos, sin, rot, self.tg_rows, kv)

    def _scaled_rows(self, x: torch.Tensor) -> bool:
        """Whether x's rows go to the scaled product (past its TRITON_ROWS)."""
        return self.path == "scaled" and x.numel() > self.triton_rows * x.shape[-1]


BACKENDS = ("torch", "triton")  # RuntimeConfig.wquant


def product_path(w: PackedWeight, backend: str, act_dtype: torch.dtype | None = None) -> str:
    """Which PackedLinear product serves ``w`` under ``backend`` with activations of
    ``act_dtype`` (None: bfloat16): "torch" takes tinygemm for int4 where it applies (bf16
    activations on CUDA: it computes in bf16), else the Triton kernel; int8 / fp8 the
    scaled product (whose calls of up to wquant_torch.TRITON_ROWS rows take the Triton
    kernels: PackedLinear)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown weight-quantization backend {backend!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    if backend == "triton":
        return "triton"
    if w.kind != "int4":
        return "scaled"
    n, k = w.shape
    bf16 = act_dtype in (None, torch.bfloat16) or w.device.type == "cpu"
    return "tinygemm" if bf16 and wquant_torch.tinygemm_ok("int4", n, k, w.group) else "triton"


def as_packed_linear(module: nn.Linear, backend: str = "triton",
                     act_dtype: torch.dtype | None = None) -> nn.Linear:
    """Turn a plain nn.Linear holding a PackedWeight into a PackedLinear whose product is
    ``product_path(weight, backend, act_dtype)`` (in place; no copy, except tinygemm's
    repacking of int4, whose source codes then move to host memory). Convert after
    placement: the products are chosen for the weight's device."""
    w = module.__dict__.get("weight")
    if type(module) is not nn.Linear or not isinstance(w, PackedWeight):
        return module
    module.__class__ = PackedLinear
    module.path = product_path(w, backend, act_dtype)
    module.kind_id, module.wkind, module.group = wquant_triton.KIND_IDS[w.kind], w.kind, w.group
    triton = gpu.runs_on(w.device)  # installed and importable: else the torch products only
    # rows at most through the Triton kernels on the scaled path (0: none)
    module.triton_rows = wquant_torch.TRITON_ROWS[w.kind] if module.path == "scaled" \
        and triton else 0
    module.tg_triton = (module.path == "tinygemm" and triton
                        and wquant_torch.tinygemm_layout_known(w.device))
    # the decode rows through cuda_int4's kernel (compiled and checked once a device)
    module.tg_rows = module.tg_triton and wquant_torch.ROWS_MAX_M > 0 \
        and wquant_torch.int4_rows_ok(w.device)
    if wquant_triton.INT8_ROWS is not False and w.kind == "int8" and triton \
            and w.device.type == "cuda":  # checked here, not in a graph's capture
        cuda_int8.ok(w.device)
    if module.path == "tinygemm":
        table_dtype = torch.bfloat16 if w.device.type != "cpu" else (act_dtype or torch.float32)
        module.register_buffer("tg_weight", wquant_torch.tinygemm_pack(w.q, w.shape[1]),
                               persistent=False)
        module.register_buffer("tg_scales_zeros", wquant_torch.tinygemm_scales_zeros(
            w.scale, w.offset, table_dtype), persistent=False)
        if w.device.type != "cpu":
            module.weight = PackedWeight(w.kind, w.q.cpu(), w.scale.cpu(), w.offset.cpu(),
                                         w.group, tuple(w.shape))
        return module
    module.register_buffer("qweight", w.q, persistent=False)
    module.register_buffer("wscale", w.scale, persistent=False)
    module.register_buffer("woffset", w.offset, persistent=False)
    return module


# ---- float -> GGUF blocks, for CPU stages ------------------------------------------------
def to_gguf_blocks(w: torch.Tensor, kind: str, act_dtype: torch.dtype = torch.float32,
                   name: str = "weight") -> QuantizedTensor:
    """A float W (N, K) as GGUF blocks the CPU kernels run: int8 -> Q8_0 (d = max|w| / 127
    per 32), int4 (or int4-g32) -> Q4_1 (d = (max - min) / 15, m = min per 32); d and m in
    f16 as ggml stores them, each weight within half a step of its f16 grid."""
    if kind not in ("int8", "int4", "int4-g32"):
        raise ValueError(f"a CPU stage quantizes to int8 (Q8_0) or int4 (Q4_1, groups of "
                         f"32: int4 or int4-g32), not {kind}")
    kind = kind[:4]
    n, k = w.shape
    if k % 32:
        raise ValueError(f"{name} {tuple(w.shape)}: GGUF blocks hold 32 inputs and {k} is "
                         f"not a multiple; leave this stage unquantized (cpu=none)")
    x = w.detach().float().cpu().numpy().reshape(n, k // 32, 32)
    if kind == "int8":
        d = (np.abs(x).max(-1) / 127).astype(np.float16)
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1).astype(np.float32), 0)
        q = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
        out = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)
    else:
        lo = x.min(-1).astype(np.float16)
        d = ((x.max(-1) - lo.astype(np.float32)) / 15).astype(np.float16)
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1).astype(np.float32), 0)
        q = np.clip(np.rint((x - lo.astype(np.float32)[..., None]) * inv[..., None]), 0, 15)
        q = q.astype(np.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)
        out = np.concatenate([d[..., None].view(np.uint8), lo[..., None].view(np.uint8), qs],
                             axis=-1)
    qtype = TYPE_IDS["Q8_0" if kind == "int8" else "Q4_1"]
    return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(out).reshape(n, -1)), qtype,
                           (n, k), act_dtype)


def cat(parts: list[Any] | tuple[Any, ...], dim: int = 0) -> Any:
    """Rows of parts of one kind and group (the projection fusion), as one PackedWeight;
    parts that differ (a Q4_K_M file's int8 v beside its int4 q and k) as a RowStack that
    runs each part (eager only: torch.compile then falls back to the eager layers)."""
    first = parts[0]
    if dim == 0 and all(isinstance(p, (PackedWeight, torch.Tensor)) for p in parts) and not all(
            isinstance(p, PackedWeight) and p.kind == first.kind and p.group == first.group
            and p.shape[1] == first.shape[1] and p.scale.dtype == first.scale.dtype
            for p in parts):
        from llamadist.kernels.quant import RowStack
        return RowStack(list(parts))
    if dim != 0 or not all(isinstance(p, PackedWeight) and p.kind == first.kind
                           and p.group == first.group and p.shape[1] == first.shape[1]
                           and p.scale.dtype == first.scale.dtype for p in parts):
        raise TypeError(f"packed weights concatenate along rows (dim=0) with one kind and "
                        f"group; got {[repr(p) for p in parts]} along dim {dim}")
    join = (lambda ts: None if ts[0] is None else torch.cat(ts))
    return PackedWeight(first.kind, join([p.q for p in parts]), join([p.scale for p in parts]),
                        join([p.offset for p in parts]), first.group,
                        (sum(p.shape[0] for p in parts), first.shape[1]))


_HANDLED = {F.linear: linear, torch.cat: cat}
