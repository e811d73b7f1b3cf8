"""Torch-native products for weight-only quantized linears (formats of kernels.wquant),
the default backend; wquant_triton's kernels are the alternative (RuntimeConfig.wquant).

* int4: torch's tinygemm kernel, as gpt-fast uses it (its words also read by
  cuda_int4's CUDA C++ kernel for the decode rows, ROWS_MAX_M, where that runs).
  ``tinygemm_pack`` turns our codes into its tensor-core layout (``aten._convert_weight_to_int4pack``: uint8 (N, K / 2) with
  input 2j in the HIGH nibble, ours has it in the low one; on the CPU
  ``_convert_weight_to_int4pack_for_cpu`` takes the int32 codes (N, K)), and
  ``tinygemm_scales_zeros`` our scale/offset into its (G, N, 2) table. tinygemm reads
  w = (c - 8) * scale + zero, ours w = c * scale + offset, so zero = offset + 8 * scale
  (exact in float32; the table is stored in x's dtype, bfloat16 on CUDA, which rounds
  scale and zero by 2^-9 relative). CUDA wants bf16 x and gives bf16 y; other x dtypes
  are cast to bf16 and back (stated, tested). Shapes it takes: groups of 32/64/128/256,
  K a multiple of the group and of 32, N a multiple of 16 (CUDA asks 8, the CPU
  variant 16; one rule for both: ``tinygemm_ok``).
* int8 and fp8 (e4m3): ``scaled_linear``, y = (x @ q^T) * scale as gpt-fast writes it:
  the codes cast to x's dtype are exact in bf16 (|q| <= 127; every e4m3 value) and the
  per-channel scale applies to the float32 product once, after the matmul. The cast
  materialises W in x's dtype first, under torch.compile too (it does not fold into
  cuBLAS's matmul), so a one-row decode pays W's bytes three times: PackedLinear sends
  calls of up to TRITON_ROWS rows to the Triton kernels instead (kernels.wquant).
  Grouped scales (GGUF Q8_0, group 32) dequantize W in x's dtype, (N, G, group) * scale,
  then matmul. float16 x takes the dequantized form too: x @ q^T before the scale could
  pass float16's 65504 on a wide row.

Everything here is aten ops with shape functions, and the custom ops
``llamadist::tinygemm_mma`` and ``tinygemm_dequant`` (int4 past the rows
``int4_product`` leaves to tinygemm, below): traceable whole by torch.compile and, with
no host synchronisation, captured in CUDA graphs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from llamadist.kernels import cuda_int4, gpu, wquant_triton

log = logging.getLogger(__name__)

TINYGEMM_GROUPS = (32, 64, 128, 256)
# Which product serves an int4 call of M rows on CUDA (where the Triton kernels run and
# tinygemm's layout is known): tinygemm for few rows (a small-batch kernel:
# on an H200 its time grows with the rows, Llama-3-70B's gate_up in int4 g32 4.2x bf16's
# F.linear at 32 rows, 24x at 4 096); then tensor-core tiles that dequantize tinygemm's
# words in registers (wquant_triton.tinygemm_mma) from TINYGEMM_MAX_M + 1 rows
# (WIDE_TINYGEMM_MAX_M + 1 on wide up-projections, below) up to MMA_MAX_M; above, W
# dequantized to bf16 from the same words by a Triton kernel (wquant_triton.
# tinygemm_dequant: one read of the codes, one write of W) and cuBLAS, holding one
# linear's bf16 W at a time. Crossovers measured on an H200 by benchmarks/wquant_rows.py
# (RESULTS.md, session 16: at 128 rows the tiles 4.8-5.6x bf16, dequantize + cuBLAS
# 5.6-5.9x; at 256 the tiles 7.4-9.1x, it 4.6-4.8x). Between 8 and 16 rows the crossover
# depends on the linear (session 17, every row count of 8-16 on Llama-3-8B g128 and 70B
# g32): the tiles run at one speed there while tinygemm's time grows with the rows, and
# on the wide up-projections (N >= 4 K: gate_up) the tiles are slow (~0.5 TB/s), so
# tinygemm keeps those up to WIDE_TINYGEMM_MAX_M rows (the tiles first faster at 15-16
# rows), the other linears up to TINYGEMM_MAX_M (the tiles faster from 8-10 rows on
# 70B's o and down and 8B's qkv and down; 70B's qkv from 12, 8B's o from 11). A layer's
# four linears at 12 rows: 70B 688 us against 767 with the tiles from 9 rows for all and
# 757 with tinygemm for all.
TINYGEMM_MAX_M = 8
WIDE_TINYGEMM_MAX_M = 14
# Calls of up to this many rows take kernels.cuda_int4's int4_rows (CUDA C++ on tinygemm's
# words, compiled by NVRTC) where it runs: the decode rows, in place of tinygemm (0: never).
# 16, its largest form (x the mma's A operand past 8 rows): on an H200, Llama-3-8B int4 +
# head stepped batch 12 in 4.171 ms and batch 16 in 4.948 against 6.756 and 7.577 with 8
# (past it tinygemm and the tiles, in compiled layers), bf16 4.864 at 16 (session 37).
ROWS_MAX_M = 16
# int4_rows's folds of the decode step's small kernels (session 33's batch-1 chain: 13 us
# of a layer's 57 are kernels other than the four linears); a variant serves once its
# check passes on the device (variant_ok). Timed on an H200 in session 36 (RESULTS.md;
# gpu_session.sh fold35, fold35b, fold36), Llama-3-8B int4 + head, ms a decode step:
# - ROPE_EPILOGUE (on): q | k | v's kernel rotates q's and k's heads in its epilogue
#   (int4_rope; eager_fused.rope's kernel, 2.0 us, not launched): 1.897 -> 1.852 at
#   batch 1, 1.984 -> 1.919 at batch 4;
# - KV_EPILOGUE (off; with ROPE_EPILOGUE): it also stores k and v in the paged cache where
#   the step's attention is the paged decode kernel (the K/V write kernel, 1.1 us, not
#   launched): slower than RoPE alone, 1.852 -> 1.889 at batch 1, 1.919 -> 1.968 at 4;
# - NORM_PROLOGUE (on, at one row: NORM_ROWS): the decoder layer's add + RMSNorm before
#   q | k | v and before gate | up runs in those projections' prologue (int4_norm; the
#   norm's kernel, 2.0-2.2 us each, not launched): 1.897 -> 1.864 at batch 1 (RoPE, K/V
#   and the norm together 1.776), but 1.984 -> 2.859 at batch 4; "qkv": before q | k | v
#   only (gate | up's 896 blocks each read x, the residual and the norm's weight, 21 MB a
#   layer from the L2 where its product reads 7): 1.930 at batch 1, 2.195 at 4; "glu":
#   before gate | up only.
# Session 37 (RESULTS.md), batch 1, the defaults (RoPE + the norm) against RoPE alone and
# all three: H200 1.792 / 1.848 / 1.770 (bf16 4.314: 0.415x); H100 2.040 / 2.090 / 2.148
# (bf16 5.82: 0.350x). The K/V store helps on the one and hurts on the other: it stays off.
ROPE_EPILOGUE = True
KV_EPILOGUE = False
NORM_PROLOGUE = True
NORM_ROWS = 1  # the most rows that take NORM_PROLOGUE (cuda_int4.NORM_MAX_ROWS at most)
MMA_MAX_M = 128
# int8 / fp8 calls of up to this many rows take the Triton kernels (wquant_triton: the
# GEMV to 4 rows, then tl.dot tiles) rather than scaled_linear where Triton runs. On an
# H200, Llama-3-8B's linears (benchmarks/wquant_rows.py, RESULTS.md sessions 16-17): int8's
# tiles 0.8-3.1x bf16's F.linear at 8-64 rows against the scaled product's 4.4-6.2x; a
# layer's four linears at 256 / 512 / 1 024 rows 1.8 / 1.6 / 1.4x faster through the
# tiles, at 4 096 within 2% (the scaled product ahead, down 0.77x, the others behind);
# fp8's tiles 2.6-5.0x against 4.9-6.9x at 8-32 rows, a layer 1.5x faster at 64, behind
# from 256 (1.3x slower). The codes were not rotated past the L2, so qkv's and o's low
# ends may be optimistic. Timed with bf16 activations and one scale a row (float16 takes
# the same tiles; float32's IEEE tiles and grouped int8, GGUF Q8_0's, untimed past 256).
TRITON_ROWS = {"int8": 1024, "fp8": 64}


def tinygemm_ok(kind: str, n: int, k: int, group: int) -> bool:
    """Whether tinygemm takes this weight (kind, shape and group) as it is."""
    return kind == "int4" and group in TINYGEMM_GROUPS and k % group == 0 and k % 32 == 0 \
        and n % 16 == 0


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _pair_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> our packed uint8 (N, K / 2), input 2j in the low nibble:
    wquant's pack_int4 (even K), which this module may not import (wquant imports it)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def tinygemm_pack(q: torch.Tensor, k: int) -> torch.Tensor:
    """Our int4 codes (N, K / 2) uint8 (input 2j low nibble) -> tinygemm's int32 layout on
    q's device (CUDA: (N / 8, K / (16 * tiles), 32, tiles / 2))."""
    tiles = _inner_k_tiles(k)
    if q.device.type == "cpu":
        codes = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], k)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), tiles)
    return torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(q), tiles)


def tinygemm_layout(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    """(N, K) codes 0..15 -> the int32 words (N / 8, K / (16 tiles), 32, tiles / 2) of
    CUDA's _convert_weight_to_int4pack, by the rule measured on an H200 (torch 2.11; the
    dequantizing kernel of kernels.gpu.wquant reads it): word [n / 8, k / (16 tiles), lane,
    w] holds in nibble j the code of n = 8 (n / 8) + lane / 4 and k = 16 tiles (k / (16
    tiles)) + 32 w + 2 (lane % 4) + 8 (j % 4) + j / 4."""
    n, k = codes.shape
    nn, kk = torch.meshgrid(torch.arange(n, device=codes.device),
                            torch.arange(k, device=codes.device), indexing="ij")
    r = kk % 32
    lane = (nn % 8) * 4 + (r % 8) // 2
    word = ((nn // 8) * (k // (16 * tiles)) + kk // (16 * tiles)) * (16 * tiles) \
        + lane * (tiles // 2) + (kk % (16 * tiles)) // 32
    j = r // 8 + 4 * (r % 2)
    out = torch.zeros(n * k // 8, dtype=torch.int64, device=codes.device)
    out.index_add_(0, word.reshape(-1), (codes.to(torch.int64) << (4 * j)).reshape(-1))
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.view(n // 8, k // (16 * tiles), 32, tiles // 2)


_LAYOUT_CHECKED: dict[str, bool] = {}


def tinygemm_layout_known(device: torch.device) -> bool:
    """Whether this torch's tinygemm packs by ``tinygemm_layout`` on ``device`` (CUDA, not
    ROCm): index patterns packed by the op against the rule, once a process (each tile
    count; small tensors). False keeps tinygemm for every row count."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    key = str(torch.device(device))
    if key not in _LAYOUT_CHECKED:
        ok = True
        for tiles in (2, 4, 8):
            n, k = 16, 32 * tiles
            idx = torch.arange(n * k, device=device).view(n, k)
            for shift in (0, 4, 8):
                codes = (idx >> shift) & 0xF
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    tinygemm_bytes(_pair_codes(codes)), tiles)
                ok = ok and torch.equal(packed, tinygemm_layout(codes, tiles))
        _LAYOUT_CHECKED[key] = ok
        if not ok:
            log.warning("tinygemm's int4 layout on %s is not the one llamadist reads: int4 "
                        "keeps tinygemm for every row count (slow past %d rows)", key,
                        WIDE_TINYGEMM_MAX_M)
    return _LAYOUT_CHECKED[key]


_ROWS_CHECKED: dict[int, bool] = {}
_GLU_CHECKED: dict[int, bool] = {}  # the GLU variant's check, made beside int4_rows's
_CHECKED: dict[tuple, bool] = {}  # a variant's check (variant_ok): (device, norm, rope, kv)


def int4_rows_ok(device: torch.device) -> bool:
    """Whether cuda_int4's kernel serves int4 on ``device``: CUDA (not ROCm) sm_80+,
    ``tinygemm_layout_known``, NVRTC found, and a small case packed by tinygemm compiled,
    run and checked against its float64 product at 3 rows and at ROWS_MAX_M (_rows_case;
    once a device; a reason is logged once
    where not: int4 then keeps tinygemm). Its GLU variant (``int4_glu``) is checked
    beside it on the same case, and the variants its switches turn on (NORM_PROLOGUE,
    ROPE_EPILOGUE, KV_EPILOGUE: variant_ok) too."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    index = cuda_int4.device_index(device)
    if index not in _ROWS_CHECKED:
        _ROWS_CHECKED[index] = _rows_check(torch.device("cuda", index))
        for norm in {False, bool(NORM_PROLOGUE)}:
            for rope in {False, ROPE_EPILOGUE}:
                for kv in {False, rope and KV_EPILOGUE}:
                    if _ROWS_CHECKED[index] and (norm or rope):
                        variant_ok(device, norm, rope, kv)
    return _ROWS_CHECKED[index]


def _check_case(device: torch.device, n: int = 32, m: int = 3) -> tuple:
    """The checks' small case: x (m, K) bf16 and an N x K weight in groups, packed by
    tinygemm on ``device``, with its float64 product (on the host): (x, packed, sz, n,
    group, ref)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    k, group = 256, 64
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, k // group, generator=gen) / 8 + 0.01
    offset = torch.randn(n, k // group, generator=gen) / 8
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    packed = tinygemm_pack(_pair_codes(codes).to(device), k)
    sz = tinygemm_scales_zeros(scale, offset).to(device)
    s, z = sz.float().cpu()[..., 0].t(), sz.float().cpu()[..., 1].t()
    w = (codes.float() - 8) * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
    return x.to(device), packed, sz, n, group, x.double() @ w.double().t()


def _rows_check(device: torch.device) -> bool:
    if torch.cuda.get_device_properties(device).major < 8:
        log.info("int4_rows needs sm_80+ (bf16 mma): int4 keeps tinygemm on %s", device)
        return False
    if not tinygemm_layout_known(device):
        return False
    try:
        problem = _rows_case(device)
    except Exception as e:  # noqa: BLE001 - any failure: the kernel does not serve here
        log.warning("int4_rows does not run on %s (%s: %s): int4 keeps tinygemm", device,
                    type(e).__name__, e)
        return False
    if problem:
        log.warning("%s: int4 keeps tinygemm", problem)
    return problem is None


def _rows_case(device: torch.device) -> str | None:
    """_rows_check's cases run on one case packed once: the product of its first 3 rows
    (W the mma's A operand) and of ROWS_MAX_M rows (past 8: x the A operand, the 16-row
    form) against float64, and the GLU variant beside the first (_GLU_CHECKED); what is
    off, or None."""
    x, packed, sz, n, group, ref = _check_case(device, m=max(3, ROWS_MAX_M))
    for m in sorted({3, ROWS_MAX_M} - {0}):  # (0: int4_rows takes no call)
        y = cuda_int4.launch(x[:m], packed, sz, n, group, _inner_k_tiles(x.shape[1]))
        y = y.float().cpu()
        err = (y.double() - ref[:m]).abs().max().item()
        tol = 2e-2 * ref[:m].abs().max().item()
        if not err <= tol:
            return f"int4_rows on {device} is off by {err:.3g} at {m} rows (allowed {tol:.3g})"
        if m == 3:
            _GLU_CHECKED[device.index] = _glu_check(x[:3], packed, sz, n, group, y)
    return None


def _glu_check(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, n: int, group: int,
               y: torch.Tensor) -> bool:
    """Whether the GLU variant gives silu(gate) * up of the product ``y`` (float32, on the
    host) on the check's case, within a bf16 step (a reason is logged where not: the
    product, then silu * up, serves)."""
    try:
        glu = cuda_int4.launch(x, packed, sz, n, group, _inner_k_tiles(x.shape[1]),
                               glu=True).float().cpu()
        gate, up = y[:, : n // 2], y[:, n // 2:]
        ref = F.silu(gate) * up
        err = (glu - ref).abs().max().item()
        tol = 2**-6 * ref.abs().max().item()
        if err <= tol:
            return True
        log.warning("int4_rows's silu * up on %s is off by %.3g (allowed %.3g): the product, "
                    "then silu * up, serves", x.device, err, tol)
    except Exception as e:  # noqa: BLE001 - any failure: the variant does not serve here
        log.warning("int4_rows's silu * up does not run on %s (%s: %s): the product, then "
                    "silu * up, serves", x.device, type(e).__name__, e)
    return False


def variant_ok(device: torch.device, norm: bool = False, rope: bool = False,
               kv: bool = False) -> bool:
    """Whether int4_rows's variant with add + RMSNorm in its prologue (``norm``), RoPE in q
    | k | v's epilogue (``rope``) and k / v stored in the paged cache there too (``kv``)
    serves on ``device`` (where int4_rows does): _variant_check once a device and variant,
    at load where its switches are on (int4_rows_ok) or at its first use outside a CUDA
    graph's capture (the check reads its result on the host; inside a capture the answer
    is no)."""
    key = (cuda_int4.device_index(device), norm, rope, kv)
    if key not in _CHECKED:
        if torch.cuda.is_current_stream_capturing():
            return False
        _CHECKED[key] = int4_rows_ok(device) and _variant_check(
            torch.device("cuda", key[0]), norm, rope, kv)
    return _CHECKED[key]


def _variant_check(device: torch.device, norm: bool, rope: bool, kv: bool) -> bool:
    """Whether the variant gives, on the check's case: (``norm``) h = x + r exactly and the
    product of RMSNorm(h) within a bf16 step of eager_fused's norm, then the product (else
    the product of x); (``rope``) with its first two heads rotated by the rows' cos / sin
    (heads of 16: N = 48 is q's head, k's and v's); (``kv``) k's and v's rows, to the bit,
    in a paged cache at the rows' slots, the rest of the cache untouched. Launched plainly
    and, where the decode graphs chain them (gpu.pdl_supported), as a dependent launch. A
    reason is logged where not (the kernels apart serve)."""
    what = " + ".join(name for name, on in (("norm", norm), ("RoPE", rope), ("K/V", kv)) if on)
    chained = device.type == "cuda" and gpu.pdl_supported(cuda_int4.device_index(device))
    for dependent in (False, True) if chained else (False,):
        try:
            with gpu.dependent_launches(dependent):
                problem = _variant_case(device, norm, rope, kv)
        except Exception as e:  # noqa: BLE001 - any failure: the variant does not serve here
            problem = f"does not run ({type(e).__name__}: {e})"
        if problem is not None:
            log.warning("int4_rows's %s on %s%s %s: the kernels apart serve", what, device,
                        " (a dependent launch)" if dependent else "", problem)
            return False
    return True


def _variant_case(device: torch.device, norm: bool, rope: bool, kv: bool) -> str | None:
    """_variant_check's case run once: what is off, or None."""
    x, packed, sz, n, group, _ = _check_case(device, 48)
    tiles, (cos, sin) = _inner_k_tiles(x.shape[1]), _check_angles(x.shape[0], device)
    d, m = cos.shape[1], x.shape[0]
    cache = torch.full((2, 2, 1, 4, d), -7.0, dtype=torch.bfloat16, device=device)
    slots = torch.tensor([5, 0, 2][:m], device=device)
    args = dict(rope=(cos, sin, 2 * d) if rope else None, kv=(cache, slots, d) if kv else None)
    h, s = x, x
    if norm:
        from llamadist.kernels import eager_fused
        gen = torch.Generator(device="cpu").manual_seed(1)
        r = torch.randn(x.shape, generator=gen).to(x)
        gamma = (1 + torch.randn(x.shape[1], generator=gen) / 4).to(x)
        h, got = cuda_int4.launch_norm(x, r, gamma, 1e-5, packed, sz, n, group, tiles, **args)
        s, x = eager_fused.add_rms_norm(x, r, gamma, 1e-5)
    else:
        got = cuda_int4.launch(x, packed, sz, n, group, tiles, **args)
    y = cuda_int4.launch(x, packed, sz, n, group, tiles).float().cpu()
    for head in range(2 if rope else 0):  # q's and k's
        z = y[:, head * d:(head + 1) * d]
        z[:] = z * cos.float().cpu() + torch.cat((-z[:, d // 2:], z[:, :d // 2]), -1) * \
            sin.float().cpu()
    err, tol = (got.float().cpu() - y).abs().max().item(), 2**-6 * y.abs().max().item()
    stored = torch.full_like(cache, -7.0)
    if kv:
        for row, slot in enumerate(slots.tolist()):
            stored[:, slot // 4, 0, slot % 4] = got[row, d:].view(2, d)
    if torch.equal(h, s) and err <= tol and torch.equal(cache, stored):
        return None
    return (f"is off (h exact: {torch.equal(h, s)}, the cache's rows exact: "
            f"{torch.equal(cache, stored)}; the output off by {err:.3g}, allowed {tol:.3g})")


def _check_angles(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (m, 16) bf16 of random angles, on ``device``: the RoPE checks' heads."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    ang = torch.rand(m, 8, generator=gen) * 100
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(device, torch.bfloat16), ang.sin().to(device, torch.bfloat16)


def int4_rope(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
              n: int, cos: torch.Tensor, sin: torch.Tensor, rot: int,
              cuda_rows: bool = False, kv: tuple | None = None) -> torch.Tensor | None:
    """int4_linear's product (..., N) of a q | k | v weight (heads of D = cos.shape[-1]
    rows) with its first ``rot`` columns (q's and k's heads) rotated by cos / sin (M, D),
    one row per row of x: the bits eager_fused.rope gives of the product's q and k,
    through one cuda_int4.int4_rows launch where ``ROPE_EPILOGUE``, ``cuda_rows``, bf16 x
    and cos / sin on CUDA, rows that take that kernel (int4_product's "rows"), and its
    variant passed its check on the device (variant_ok); else None (the caller runs the
    product, then RoPE). ``kv`` (cache, slots, qcols): k and v also stored in the paged
    cache, as cuda_int4.launch's, where KV_EPILOGUE, that variant's check passed and the
    kernel takes that cache (else None)."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    cos, sin = cos.reshape(m, -1), sin.reshape(m, -1)
    if not (_rows_take(x, n, cuda_rows) and _epilogue_takes(x2, n, (cos, sin, rot), False, kv)):
        return None
    if kv is not None:
        y = cuda_int4.int4_rows_rope_kv(x2, packed, scales_zeros, n, group, _inner_k_tiles(k),
                                        cos, sin, rot, *kv)
    else:
        y = cuda_int4.int4_rows_rope(x2, packed, scales_zeros, n, group, _inner_k_tiles(k),
                                     cos, sin, rot)
    return y.view(*x.shape[:-1], n)


def int4_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              eps: float, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
              n: int, cuda_rows: bool = False, glu: bool = False, rope: tuple | None = None,
              kv: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(h, y) with h = x + residual (x for None) and y = int4_linear's product (``glu``:
    int4_glu's silu(gate) * up; ``rope`` (cos, sin, rot) and ``kv``: int4_rope's) of
    RMSNorm(h) with ``weight`` and ``eps``, through one cuda_int4.launch_norm, where
    ``NORM_PROLOGUE`` (True, or "glu" / "qkv" for the one it is), ``cuda_rows``, bf16 x
    on CUDA, at most NORM_ROWS (and cuda_int4.NORM_MAX_ROWS) rows that take that kernel,
    x's rows fit its shared memory (cuda_int4.norm_fits), and its variant passed its check
    on the device (and int4_glu's or int4_rope's conditions for theirs); else None (the
    caller runs the norm's kernel, then the product)."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    if not (NORM_PROLOGUE in (True, "glu" if glu else "qkv")
            and weight.dtype == torch.bfloat16 and m <= min(NORM_ROWS, cuda_int4.NORM_MAX_ROWS)
            and _rows_take(x, n, cuda_rows)
            and (not glu or _GLU_CHECKED.get(cuda_int4.device_index(x.device), False))
            and (rope is None or _epilogue_takes(x2, n, rope, True, kv))
            and (rope is not None or variant_ok(x.device, norm=True))):
        return None
    if not cuda_int4.norm_fits(m, n, k, _inner_k_tiles(k), group,
                               cuda_int4.device_index(x.device), glu,
                               0 if rope is None else rope[0].shape[-1], kv is not None):
        return None
    r2 = None if residual is None else residual.reshape(m, k)
    if rope is not None:  # cos / sin one row a row of x (the checks above read D alone)
        rope = (rope[0].reshape(m, -1), rope[1].reshape(m, -1), rope[2])
    h, y = cuda_int4.launch_norm(x2, r2, weight, eps, packed, scales_zeros, n, group,
                                 _inner_k_tiles(k), glu=glu, rope=rope, kv=kv)
    return h.view(x.shape), y.view(*x.shape[:-1], n // 2 if glu else n)


def _rows_take(x: torch.Tensor, n: int, cuda_rows: bool) -> bool:
    """Whether x's rows (bf16 on CUDA) take int4_rows (int4_product's "rows")."""
    return (cuda_rows and x.is_cuda and x.dtype == torch.bfloat16
            and int4_product(x.numel() // x.shape[-1], n, x.shape[-1], cuda_rows) == "rows")


def _epilogue_takes(x: torch.Tensor, n: int, rope: tuple, norm: bool,
                    kv: tuple | None) -> bool:
    """Whether RoPE (cos, sin (M, D), rot) of x's M rows, and the cache's K/V with ``kv``,
    ride in int4_rows's epilogue, with the norm in its prologue or not: ROPE_EPILOGUE (and
    KV_EPILOGUE, a cache the kernel takes: cuda_int4.kv_fits), bf16 cos / sin, and the
    variant's check passed on x's device."""
    return (ROPE_EPILOGUE and rope[0].dtype == torch.bfloat16
            and (kv is None or KV_EPILOGUE and cuda_int4.kv_fits(kv, x, n, rope))
            and variant_ok(x.device, norm, True, kv is not None))


def tinygemm_bytes(q: torch.Tensor) -> torch.Tensor:
    """Our packed codes (input 2j in the low nibble) as the uint8 (N, K / 2) that CUDA's
    _convert_weight_to_int4pack reads: input 2j in the high nibble."""
    return ((q << 4) | (q >> 4)).contiguous()


def tinygemm_scales_zeros(scale: torch.Tensor, offset: torch.Tensor,
                          dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(N, G) scale and offset (w = c * scale + offset) -> tinygemm's (G, N, 2) table of
    (scale, zero) with w = (c - 8) * scale + zero, in ``dtype``."""
    s, o = scale.float(), offset.float()
    return torch.stack([s, o + 8 * s], dim=-1).transpose(0, 1).to(dtype).contiguous()


def int4_product(rows: int, n: int, k: int, cuda_rows: bool = False) -> str:
    """Which CUDA product serves an int4 call of ``rows`` rows of an N x K weight where the
    Triton kernels read tinygemm's layout: "rows" (cuda_int4.int4_rows, where
    ``cuda_rows``: it runs on the device), "tinygemm", "mma" (the tensor-core tiles) or
    "dequant"."""
    if cuda_rows and 1 <= rows <= ROWS_MAX_M:
        return "rows"
    tiny = WIDE_TINYGEMM_MAX_M if n >= 4 * k else TINYGEMM_MAX_M
    return "tinygemm" if rows <= tiny else "mma" if rows <= MMA_MAX_M else "dequant"


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                group: int, n: int, bias: torch.Tensor | None = None,
                triton: bool = False, cuda_rows: bool = False) -> torch.Tensor:
    """y (..., N) = x (..., K) @ W^T + bias through tinygemm, in x's dtype; with ``triton``
    (the Triton kernels run here and ``tinygemm_layout_known``), CUDA calls of more rows
    than ``int4_product`` leaves to tinygemm take the Triton kernels that read its layout
    (see above), and with ``cuda_rows`` (``int4_rows_ok``) the decode rows take
    cuda_int4.int4_rows."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    product = int4_product(m, n, k, cuda_rows) if triton and x.is_cuda else "tinygemm"
    if product == "rows":
        y = cuda_int4.int4_rows(x2.to(torch.bfloat16), packed, scales_zeros, n, group,
                                _inner_k_tiles(k))
    elif product == "mma":
        y = wquant_triton.tinygemm_mma(x2.to(torch.bfloat16), packed, scales_zeros, n, group,
                                       _inner_k_tiles(k))
    elif product == "dequant":
        w = wquant_triton.tinygemm_dequant(packed, scales_zeros, n, k, group, _inner_k_tiles(k))
        y = F.linear(x2.to(w.dtype), w)
    elif x.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed,
                                               group, scales_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(scales_zeros.dtype).contiguous(), packed, group, scales_zeros)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], n)


def int4_glu(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
             n: int, cuda_rows: bool = False) -> torch.Tensor | None:
    """silu(gate) * up (..., N / 2) of a gate | up weight (N rows: gate's N / 2, then
    up's) in tinygemm's layout, through one cuda_int4.int4_rows launch that writes it (the
    same bits as int4_linear, then eager_fused.silu_mul, for bf16 x), where ``cuda_rows``,
    the rows take that kernel (int4_product's "rows") and its variant passed its check on
    the device (int4_rows_ok); else None (the caller runs the product, then silu * up).
    N is a multiple of 16, as tinygemm_ok has it."""
    x2 = x.reshape(-1, x.shape[-1])
    k = x2.shape[1]
    if not (_rows_take(x, n, cuda_rows)
            and _GLU_CHECKED.get(cuda_int4.device_index(x.device), False)):
        return None
    y = cuda_int4.int4_rows_glu(x2, packed, scales_zeros, n, group, _inner_k_tiles(k))
    return y.view(*x.shape[:-1], n // 2)


def codes_as(q: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes or fp8 e4m3 bits (uint8) -> their values in ``dtype`` (exact in bf16,
    float16 and float32)."""
    if kind == "fp8":
        q = q.view(torch.float8_e4m3fn)
    return q.to(dtype)


def scaled_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kind: str,
                  group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ W^T + bias for int8 / fp8 W = q * scale (scale (N, G))."""
    n, k = q.shape
    g = scale.shape[1]
    if g == 1 and x.dtype != torch.float16:
        y = (F.linear(x, codes_as(q, kind, x.dtype)).float() * scale.view(-1).float())
        y = y.to(x.dtype)
    else:
        w = codes_as(q, kind, torch.float32)
        if g == 1:
            w = w * scale.float()
        elif g * group == k:
            w = (w.view(n, g, group) * scale.float()[..., None]).view(n, k)
        else:  # a short last group
            w = w * scale.float().repeat_interleave(group, dim=1)[:, :k]
        y = F.linear(x, w.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y
