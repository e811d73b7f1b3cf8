"""Triton kernels for weight-only quantized linears (formats of llamadist.kernels.wquant).

y (M, N) = x (M, K) @ W^T + bias, W read as its codes and dequantized in registers,
accumulated in float32:

* GEMV (M <= GEMV_MAX_M, decode; ``_gemv_kernel``): bound by reading W, so it is built
  for bytes in flight and few instructions per byte. A program owns BLOCK_N output rows
  and one K range (split-K: ``split`` ranges write float32 partials that
  ``_splitk_sum_kernel`` adds in a fixed order: deterministic) and walks it in (BLOCK_N,
  BLOCK_K) tiles of codes, loaded up to two tiles ahead (``prefetch``: Triton pipelines
  only loops with tl.dot), with wide loads along K (16 contiguous bytes a thread where K
  allows: EVEN_K drops the K mask, which would stop vectorisation). Codes decode with bit
  tricks, not int->float conversions (a quarter-rate unit on NVIDIA GPUs):
  - int8: ``(u ^ 0x80) | 0x4B000000`` read as float32 is 2^23 + 128 + q; one exact
    subtraction gives q (on NVIDIA GPUs inline PTX builds those bits with one XOR a
    word of four codes and one byte permute a code); at one row of bf16 x with sums
    deferred (``int8_biased``) the byte goes into bits 8-15 of 2^15 instead, and
    2^15 + 128 + q enters the FMA as it is (exact with bf16 x): 32 896 times x's own
    sums comes off each lane of sums once, after the loop;
  - int4: a nibble shifted into the top mantissa bits of 1.0 reads f = 1 + c / 16, and
    w = c s + o = 16 s f + (o - 16 s) is one FMA (within ~2^-19 s of w);
  - fp8 e4m3: its bits placed in float32's (sign, exponent, top mantissa) read 2^-120
    times the value, subnormals included; one multiplication by 2^120 makes it exact.
  ``native`` configs use the hardware's conversion instead: fp8 float8e4nv (sm_89+), int8
  a plain int8 -> float32 conversion (the rule's choice for both since the H200 sweeps of
  2026-12-02: faster than the bit decode on every shape measured, until one row's sums
  were deferred: int8's deferred one-row cut takes the bit decode again, session 17).
  ``group_sums`` (int4, a sweep variant) reduces 1 + c/16 times x per tile and applies
  the group's scale and offset to the tile's sums (one FMA a weight; the offset needs the
  tile's sum of x).
  Each tile is reduced along K to (BLOCK_N,) per row of x, x's pointers broadcast to the
  tile so that x loads in the tile's layout (no shared-memory exchange in the loop); a
  tile never straddles a scale group, so grouped int8 / fp8 scale the group's sum once
  (but with deferred sums: tiles of several groups, each thread's run of 16 products of
  one group summed, then scaled; ``tile_k``, the rule's cut for a GGUF Q8_0's int8).
  ``defer`` instead adds each row's products into a (BLOCK_N, BLOCK_K) float32 tile of
  its own, reduced along K once after the loop (no shuffles in the loop; the rule's
  choice for one row).
  A gate | up product (a fused MLP's gate_up_proj) may write silu(gate) * up itself
  (``launch_glu``; GLU): its programs pair gate row j with up row N / 2 + j.
  int4's x is read as pairs (x[2j], x[2j + 1]) in one 32-bit (64-bit for float32 x) word
  split with shifts: byte j's low nibble meets x[2j], its high one x[2j + 1], with wide
  loads of x. ``GemvConfig`` holds the tile, warps, split, prefetch depth and decode;
  ``gemv_config`` picks one by rule (``benchmarks/wquant_sweep.py`` times the others).
* GEMM (larger M: big decode batches, prefill; ``_wq_kernel``): BLOCK_M x BLOCK_N tiles
  through ``tl.dot`` on the dequantized W tile in x's dtype. Its register-product branch
  (DOT=False) was the GEMV before ``_gemv_kernel``; the sweep still times it as "v0".

int4 bytes hold inputs 2j and 2j + 1 (low, high nibble). int8 and fp8 with one scale per
output channel multiply the raw codes (exact in bf16 / fp16) and scale the accumulator
once at the end. Everything runs in Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors), where the tests check it against float64 (fp8 native too: Triton 3.7's
interpreter decodes every finite e4m3 code).

No host synchronisation and shapes fixed by the tensors: the launches are captured inside
the CUDA-graph decode path like any kernel. ``packed_linear`` is also registered as the
torch custom op ``llamadist::packed_linear`` (opaque to torch.compile).

This module holds the planning (``GemvConfig``, ``gemv_config``) and the op, which any
process may import; the kernels themselves (and triton) are in llamadist.kernels.gpu.wquant,
imported on the first launch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llamadist.kernels import gpu

KIND_IDS = {"int8": 0, "int4": 1, "fp8": 2}
WIDE_GROUPS = True  # gemv_config's cut for grouped int8 (False: the former one, for A/B runs)
# Bytes at the start of each of a GEMV program's rows of codes that it asks L2 for before
# it waits for the kernel before it, where it is a dependent launch (a power of two >= 128;
# 0: none, the default). Asking for every row's whole K range made batch-1 decode slower
# on an H200 (int8 3.05 against 2.70 ms a step, fp8 2.98 against 2.48; RESULTS.md,
# session 26); the first 1 KiB a row: int8 2.676 against 2.690 (within the runs' spread),
# fp8 2.538 against 2.464 (session 27).
L2_EARLY = 0
# Whether a GEMV program loads the first tile of codes (and scales) its loop reads into
# registers before it waits for the kernel before it, where it is a dependent launch (x's
# loads after the wait): None, the rule (``first_early``); True / False force it (A/B runs)
FIRST_EARLY: bool | None = None
# int8 with one scale a row and bf16 x through kernels.cuda_int8's CUDA tensor-core rows
# instead of the GEMV / the GEMM's tiles: None, the rule (``int8_rows``); True: at 1-8
# rows; False: never (A/B runs)
INT8_ROWS: bool | None = None
GEMV_MAX_M = 4  # rows at most through the GEMV; more go through tl.dot tiles
# Whether a gate | up GEMV writes silu(gate) * up itself (``launch_glu``), saving the
# separate kernel (False: the product, then that kernel; A/B runs)
GLU = True
# Whether int8's one-row GEMV with one scale a row and bf16 x (the bit decode, sums
# deferred) decodes its codes as q + 32 896, the offset taken off each lane of sums once
# (``kernels.gpu.wquant._INT8_BIASED``; False: q exactly, a subtraction a code; A/B runs),
# where a lane holds at most INT8_BIASED_LANES products (``int8_biased``)
INT8_BIASED = True
INT8_BIASED_LANES = 16


def int8_biased(k_range: int, block_k: int) -> bool:
    """Whether the biased decode serves a K range of ``k_range`` bytes in tiles of
    ``block_k``: each lane of the deferred sums then adds ceil(k_range / block_k) products
    of ~32 896 |x|, and float32 rounds each addition by ~2^-9 |x| (in units of a code):
    an absolute error, not one relative to q x, that grows with the lane's length where x
    has one sign. With <= 16 products a lane it stays within 4% of the int8 format's own
    quantization error (benchmarks/int8_biased_error.py: 0.5-2.7% rms over centred, one-signed
    and outlier x, rows with and without an outlier weight; 8% at 56)."""
    return INT8_BIASED and -(-k_range // block_k) <= INT8_BIASED_LANES


def int8_rows(m: int) -> bool:
    """Whether int8 (one scale a row) at ``m`` rows takes kernels.cuda_int8 where it runs
    (INT8_ROWS's rule): 3-8 rows. Measured on an H200 (RESULTS.md, session 27), Llama-3-8B's
    four linears at 4 rows: 11.9 / 9.1 / 39.0 / 22.8 us (qkv / o / gate_up / down) against
    the GEMV's 19.1 / 13.2 / 61.1 / 34.1 and the GEMM's tiles (5-16 rows) 29.1 / 28.2 /
    46.9 / 92.8; the batch-4 decode step 3.29 against 4.57 ms. Its time barely depends on
    the rows (x's rows are the mma's columns); at one row the GEMV is faster on all four
    (10.0 / 7.5 / 34.8 / 18.1), and two rows are near parity (not timed side by side)."""
    if INT8_ROWS is not None:
        return INT8_ROWS and 1 <= m <= 8
    return 3 <= m <= 8


def code_bytes(kind: str, k: int) -> int:
    """Bytes of codes a row of K inputs holds: int4 packs two a byte, int8 / fp8 one."""
    return (k + 1) // 2 if kind == "int4" else k


def first_early(kind: str, m: int, grouped: bool, dependent: bool) -> bool:
    """Whether the GEMV of ``m`` rows loads its first tile before it waits: FIRST_EARLY
    where set (also where it is not a ``dependent`` launch: the same loads, the first
    tile peeled off the loop), else int8 with one scale a row at one row as a dependent
    launch, the one case measured faster (H200, Llama-3-8B shape, batch-1 step with the
    head quantized: 2.640 against 2.703 ms; fp8 2.655 against 2.480, slower; RESULTS.md,
    session 27)."""
    if FIRST_EARLY is not None:
        return FIRST_EARLY
    return dependent and kind == "int8" and m == 1 and not grouped


def _blocks(m: int, kind: str) -> tuple[bool, int, int, int, int]:
    """(dot, BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of ``_wq_kernel`` for M rows (the GEMM;
    for M <= GEMV_MAX_M the former GEMV, "v0", kept for the sweep). BLOCK_K counts bytes
    of W per row per step (int4: twice as many inputs)."""
    if m <= GEMV_MAX_M:
        bm = 1 if m == 1 else (2 if m == 2 else 4)
        bk = 128 if bm > 1 else 256
        return False, bm, 16, bk // 2 if kind == "int4" else bk, 4
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 64 if bm <= 64 else 128
    return True, bm, bn, 32 if kind == "int4" else 64, 4 if bm <= 64 else 8


@dataclass(frozen=True)
class GemvConfig:
    """How ``_gemv_kernel`` cuts y = x @ W^T: BLOCK_N rows x BLOCK_K code bytes a tile
    (powers of two; BLOCK_K is lowered to divide a scale group's bytes), ``warps`` per
    program, ``split`` K ranges (1: no partials), ``stages`` (Triton's num_stages; None:
    its default; it does not change this loop's code in Triton 3.9), ``native`` (int8 /
    fp8: the hardware's conversion of the codes, int8 -> float32 or CUDA's float8e4nv
    (sm_89+), instead of the bit decode; label "nat"), ``prefetch`` (tiles loaded ahead:
    0, 1 or 2), ``group_sums`` (int4: scale and offset applied to each tile's sums, not
    to each weight; label "gs"), ``defer`` (without group sums: each row's products
    summed elementwise over the tiles, reduced along K once at the end; label "df")."""

    block_n: int = 32
    block_k: int = 256
    warps: int = 4
    split: int = 1
    stages: int | None = None
    native: bool = False
    prefetch: int = 2
    group_sums: bool = False
    defer: bool = False

    def label(self) -> str:
        return (f"n{self.block_n}k{self.block_k}w{self.warps}s{self.split}"
                + ("" if self.stages is None else f"st{self.stages}")
                + ("nat" if self.native else "") + ("gs" if self.group_sums else "")
                + ("df" if self.defer else "")
                + ("" if self.prefetch == 2 else f"pf{self.prefetch}"))


@dataclass(frozen=True)
class MmaConfig:
    """How ``_tinygemm_mma_kernel`` cuts y = x @ W^T (W in tinygemm's int4 layout): BLOCK_N
    rows of W (the tensor-core tile's M side, >= 64 for Hopper's warpgroup MMA) against
    BLOCK_M rows of x (>= 16, padded), ``warps`` per program, ``split`` K ranges,
    ``stages`` (Triton's num_stages for the loop's loads; None: its default), ``prefetch``
    (the next k-tile's words loaded into registers ahead, for stages 1)."""

    block_n: int = 64
    block_m: int = 16
    warps: int = 4
    split: int = 1
    stages: int | None = None
    prefetch: bool = False

    def label(self) -> str:
        return (f"n{self.block_n}m{self.block_m}w{self.warps}s{self.split}"
                + ("" if self.stages is None else f"st{self.stages}")
                + ("pf" if self.prefetch else ""))


def mma_config(m: int, n: int, k: int, tiles: int, sms: int = 132) -> MmaConfig:
    """The rule's MmaConfig for y (m, n) = x (m, k) @ W^T from tinygemm's layout: x's rows
    in one tile of 16 to 64 (more: a grid of them), 64 rows of W a program (128 from 64
    rows of x: the dot's tile stays square enough to amortise the dequantization), and
    split-K doubled while the grid holds fewer than two programs per SM and each K range
    keeps >= 4 k-tiles (16 tiles codes each). Up to 16 rows, num_stages 1 (no staging of
    the words through shared memory): 8-24% less time than Triton's default staging on
    Llama-3-8B's four linears at 1 and 16 rows on an H200, 15-20% on three of Llama-3-70B's
    at 16 (its gate_up 3% more) (benchmarks/wquant_rows.py, RESULTS.md session 16; the
    register prefetch was slower); 32 and 64 rows keep the default."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if bm < 64 else 128
    return mma_split(MmaConfig(block_n=bn, block_m=bm, warps=4 if bn == 64 else 8,
                               stages=1 if bm == 16 else None), m, n, k, tiles, sms)


def mma_split(cfg: MmaConfig, m: int, n: int, k: int, tiles: int, sms: int) -> MmaConfig:
    """``cfg`` with mma_config's split-K for its tiles."""
    programs = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    kt = k // (16 * tiles)
    split = 1
    while programs * split < 2 * sms and kt // (2 * split) >= 4 and split < 16:
        split *= 2
    return replace(cfg, split=split)


_SMS: dict[int, tuple[int, bool]] = {}


def device_traits(device: torch.device) -> tuple[int, bool]:
    """(streaming multiprocessors, has float8e4nv conversions: NVIDIA sm_89+) of a CUDA
    device, cached; (4, False) off CUDA (the interpreter). A ROCm device (torch.version.hip)
    reports its own architecture numbers: no float8e4nv there."""
    if device.type != "cuda":
        return 4, False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        p = torch.cuda.get_device_properties(i)
        _SMS[i] = (p.multi_processor_count,
                   torch.version.hip is None and (p.major, p.minor) >= (8, 9))
    return _SMS[i]


def gemv_config(kind: str, m: int, n: int, k: int, group: int, sms: int = 132,
                fp8_native: bool = False) -> GemvConfig:
    """The rule's GemvConfig for y (m, n) = x (m, k) @ W^T, W ``kind`` with ``group``, on a
    device of ``sms`` SMs that converts float8e4nv or not (``fp8_native``: sm_89+).

    The cut (reasoning): a step reads W once, so the GPU needs ~30 KB in flight per SM
    (4 TB/s x ~1 us / 132 SMs). A 4-warp program with an 8 KB tile of int8 / fp8 codes (32
    rows x 256 bytes) or a 4 KB tile of int4 (twice the values a byte) holds a useful
    share. Small scale groups shrink BLOCK_K (a tile stays in one group) and widen BLOCK_N,
    up to 128 rows; int4 in 16-byte steps (groups of 32) runs 8 warps a program. Split-K
    doubles the K ranges while the grid holds fewer than 12 warps per SM (8-bit codes: 3
    programs of 4 warps) or 24 (int4: it issues ~2.5x the instructions a byte, so it needs
    more warps resident to keep its loads in flight), keeping >= 4 tiles per K range.
    Where int4's 8-warp programs alone give every SM one (N / BLOCK_N >= sms), BLOCK_N is
    halved with 4 warps instead (the same warps, the same split).

    Decode, prefetch and the per-M changes: the best of the neighbours of the previous
    rule's cut measured by benchmarks/wquant_sweep.py on one H200 (triton 3.6, torch 2.11;
    RESULTS.md "wquant GEMV sweep on an H200" and "... H200 sweep of session 12") for
    Llama-3-8B's four decode shapes (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down
    4096x14336), M = 1, 2, 4; every choice below is a measured configuration:
    * int8: the hardware's int8 -> float32 conversion (fastest on all 12), prefetch 1 at
      M = 1 and 0 above (fastest on 11 of 12; qkv at M = 4 within 0.5%; one row now
      defers, below). Since the bit decode is one PTX byte permute a code (session 18),
      two rows take it instead (`asm18`'s neighbours at M = 2: 5-9% faster on all four,
      a layer 90.1 us against 98.0), with BLOCK_K doubled as fp8's (`rows18`: 0-9% faster
      on all four, a layer 83.5 us against 88.9); four rows keep the conversion (fastest
      on 3 of 4). Deferred sums at 2 and 4 rows (`rows18`) won only o's 2 rows (4%)
      and lost elsewhere, most at 4 rows (four tiles of sums spill); not in the rule;
    * fp8: the hardware conversion where there is one, without prefetch (fastest on all
      12); with it, 8 warps at M = 1 (fastest or within 1% on all 4), BLOCK_K doubled at
      M = 2 where each K range keeps >= 2 of those tiles and a group holds one (within 1%
      on all 4), the cut above at M >= 3 (best on 3 of 4; qkv 14% off). Without the
      conversion (before sm_89): the bit decode without prefetch at the cut above (the
      only bit-decode point the sweep timed);
    * int4: prefetch 0 (groups of 128, with the split above: within 6% of the fastest on
      11 of 12, qkv at M = 1 14% off; groups of 32: within 2% on 9 of 12, qkv 4-15% off).
    M = 3 (not swept) follows M = 4; formats the sweep does not time (int8 with groups,
    int4 groups of 64) follow their kind's line: an extrapolation.

    One row of int8, or of fp8 where the cut above splits K (one scale a row, the
    hardware's conversion): ``defer`` (the tile's products summed elementwise, reduced
    along K once) in 8-row programs without split-K, BLOCK_K 1 024 bytes where the grid
    holds at most 4 programs a SM (512 if that does not divide the row), else 512
    (RESULTS.md, session 17's `defer` sweep on an H200, M = 1: the fastest of 12-19
    configurations on each of int8's four shapes and fp8's qkv, o, down; a layer's four
    linears int8 81.0 us against the former rule's 93.1, fp8 64.6 against 69.2; fp8's
    gate_up, split 1 above, 12% faster there than deferred); int8 there with the bit
    decode and no prefetch (the neighbours' sweep after it, `near1`: a layer 76.3 us
    against 82.5 with the conversion and prefetch 1). With the byte-permute decode
    (session 18, `asm18`), int8's 8-row programs of 512 bytes slowed where there are more
    than 4 a SM (qkv 12.2 us, gate_up 42.0) and 16-row ones ran fastest there (10.0,
    34.8; o and down keep 8 rows of 1 024 bytes: 7.5, 18.1; a layer 70.4 us, 0.60x bf16's
    117.1). fp8 takes the 16-row programs there too since session 19 (`sweeps19`:
    Llama-3-70B's o and down 19.5 and 59.2 us against 24.3 and 75.8 with 8 rows of 8 warps;
    Llama-3-8B's qkv 9.36 us, the best of its grid). With the biased decode (session 29,
    ``int8_biased``: one PRMT and one FMA a code), int8's 16-row programs take 256 bytes
    where they are more than 8 a SM (gate_up 32.90 us against 34.67 with 512, the
    fastest of its 16 neighbours; `biased29`; and of the 48 one-row cuts of `grid29`), 8
    warps where they are at most 4 a SM (qkv 9.74 / 9.61 us against 10.16 / 10.04 with 4,
    the fastest in both sweeps; o and down keep their cuts, the fastest of `grid29`'s 48).
    Where 8-row programs would be fewer
    than 2 a SM (N < 16 x SMs) or neither size divides the row (not timed), the cut above
    keeps its split-K and defers its sums (at that cut the sweep measured deferring 1-4%
    faster on all eight).

    int8 with a scale per group (a GGUF Q8_0 on a GPU: groups of 32), 1-4 rows, where
    8-row programs are >= 2 a SM: whole rows in tiles of several groups (each group's run
    of 16 products summed in a thread, then scaled; ``tile_k``), sums deferred, the bit
    decode, no prefetch; 2 048 bytes at one row, 1 024 above (else the next size down that
    divides the row), 8 rows a program up to two rows, 16 from three. The cut above keeps
    each tile inside one group of 32 bytes, whose fixed work made its four linears slower
    than bf16's (session 19, Llama-3-8B, us: one row 153.5, 1.25x bf16's, against 69.7,
    0.58x; two rows 148.5 against 86.3; four 180.4 against 113.0; `sweeps19`, `q8e2e19`,
    the fastest neighbours on all four linears but gate_up at 2 and 4 rows, within 3-6%)."""
    kb = code_bytes(kind, k)
    tile = 4096 if kind == "int4" else 8192          # code bytes a program-step
    bk = 64 if kind == "int4" else 256
    gb = None
    if kind == "int4" or group < k:
        gb = group // 2 if kind == "int4" else group
        bk = _tile_k(bk, gb)
    while bk > 16 and kb < bk:
        bk //= 2
    bn = min(128, max(8, tile // bk))
    warps = 8 if kind == "int4" and bk < 64 else 4
    fill = (24 if kind == "int4" else 12) * sms     # warps the grid should hold
    split = 1
    tiles = -(-n // bn)
    while tiles * split * warps < fill and kb // (2 * split) >= 4 * bk and split < 16:
        split *= 2
    native, prefetch = False, 0
    if kind == "int4":
        if warps == 8 and tiles >= sms:
            bn, warps = max(8, bn // 2), 4
    elif kind == "int8":  # two rows: the bit decode (one PTX byte permute a code)
        native, prefetch = m != 2, 1 if m == 1 else 0
    elif fp8_native:
        native = True
        if m == 1:
            warps = 8
    if (m == 2 and (kind == "int8" or kind == "fp8" and fp8_native) and kb // split >= 4 * bk
            and (gb is None or gb % (2 * bk) == 0)):  # two rows: BLOCK_K doubled
        bk *= 2
    defer = m == 1 and native and gb is None and (kind == "int8" or split > 1)
    rows8 = -(-n // 8)
    if defer and rows8 >= 2 * sms:  # 8-row programs over whole rows, sums deferred, with a
        few = rows8 <= 4 * sms      # tile that divides the row (a tail masks every load
        sizes = (1024, 512) if few else (512,)  # on K)
        bk8 = next((b for b in sizes if kb % b == 0), None)
        if bk8 is not None:
            bn, split, bk = 8, 1, bk8
            if kind == "int8":  # now the bit decode, without prefetch (the conversion
                native, prefetch = False, 0  # unit's rate binds once the shuffles are gone)
            if not few:  # 16-row programs where 8-row ones would be > 4 a SM; with the
                bn = 16   # biased decode, 256-byte tiles where they are > 8 a SM and
                sixteens = -(-n // 16)  # 8 warps where they are <= 4
                if kind == "int8" and sixteens > 8 * sms and int8_biased(kb, 256):
                    bk = 256
                elif kind == "int8" and sixteens <= 4 * sms and int8_biased(kb, bk):
                    warps = 8
    if WIDE_GROUPS and kind == "int8" and gb is not None and rows8 >= 2 * sms:
        # grouped int8 (a GGUF Q8_0 on a GPU): whole rows in tiles of several groups, each
        # group's products summed, then scaled, sums deferred, the bit decode
        bkw = next((b for b in ((2048, 1024, 512) if m == 1 else (1024, 512))
                    if kb % b == 0 and b % gb == 0 and b > gb), None)
        if bkw is not None:
            return GemvConfig(block_n=8 if m <= 2 else 16, block_k=bkw, warps=4, split=1,
                              native=False, prefetch=0, defer=True)
    return GemvConfig(block_n=bn, block_k=bk, warps=warps, split=split, native=native,
                      prefetch=prefetch, defer=defer)


def _tile_k(cfg_k: int, group_b: int | None) -> int:
    """BLOCK_K: ``cfg_k`` lowered until it divides a group's bytes (a tile in one group)."""
    bk = cfg_k
    while group_b is not None and group_b % bk:
        bk //= 2
    return bk


def tile_k(cfg: GemvConfig, kind: str, group_b: int | None) -> tuple[int, bool]:
    """(BLOCK_K, wide) ``_gemv_kernel`` runs ``cfg`` with, for codes in groups of
    ``group_b`` bytes (None: one scale a row): grouped int8 / fp8 with deferred sums take
    tiles of several whole groups (``wide``: each group's products summed, then scaled);
    any other tile stays in one group (``_tile_k``)."""
    wide = (cfg.defer and kind != "int4" and group_b is not None and cfg.block_k > group_b
            and cfg.block_k % group_b == 0)
    return (cfg.block_k if wide else _tile_k(cfg.block_k, group_b)), wide


def _x_operand(x2: torch.Tensor, kind: str, k: int) -> tuple[torch.Tensor, int]:
    """x (M, K) as the kernel reads it, and XDT: int4 takes (x[2j], x[2j + 1]) pairs as one
    int32 (16-bit x) or int64 (float32 x) word each (K padded to even)."""
    if kind != "int4":
        return x2, 0
    if k % 2 or x2.stride(0) % 2 or x2.storage_offset() % 2:  # a fresh even-width copy
        padded = x2.new_zeros(x2.shape[0], k + k % 2)
        padded[:, :k] = x2
        x2 = padded
    if x2.dtype == torch.float32:
        return x2.view(torch.int64), 2
    if x2.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the int4 kernel takes bfloat16 / float16 / float32 x, not {x2.dtype}")
    return x2.view(torch.int32), 0 if x2.dtype == torch.bfloat16 else 1


def launch(x: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor,
           offset: torch.Tensor | None, bias: torch.Tensor | None, group: int,
           n: int, k: int, config: GemvConfig | str | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ W^T + bias with W given by its packed tensors. ``config``
    (M <= GEMV_MAX_M only): a GemvConfig, None for ``gemv_config``'s, "v0" for the former
    GEMV (``_wq_kernel`` without tl.dot) or "dot" for the GEMM's tensor-core tiles (16
    rows, as for M = 5..16)."""
    return gpu.load("wquant").launch(x, kind, q, scale, offset, bias, group, n, k, config)


def launch_glu(x: torch.Tensor, kind: str, q: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor | None, group: int, n: int, k: int,
               config: GemvConfig | None = None) -> torch.Tensor:
    """silu(gate) * up (..., N / 2) of the gate | up product x (..., K) @ W^T (W's N rows:
    gate's N / 2, then up's), as eager_fused.silu_mul of ``launch``'s product gives it,
    bit for bit: where the GEMV takes the rows (one scale a row or groups; one K range),
    its programs pair gate row j with up row N / 2 + j and write the activation
    themselves (GLU), without the product's (M, N) round trip and the second kernel.
    ``config``: that GEMV's GemvConfig (tests, sweeps; one K range), None for the rule's."""
    return gpu.load("wquant").launch_glu(x, kind, q, scale, offset, group, n, k, config)


def _glu_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
            kind: int, group: int, n: int, k: int) -> torch.Tensor:
    return launch_glu(x, list(KIND_IDS)[kind], q, scale, offset, group, n, k)


def _glu_op_shape(x, q, scale, offset, kind, group, n, k):
    return x.new_empty(*x.shape[:-1], n // 2)


packed_glu_op = gpu.custom_op("llamadist::packed_glu", _glu_op, fake=_glu_op_shape)


def _op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
        bias: torch.Tensor | None, kind: int, group: int, n: int, k: int) -> torch.Tensor:
    return launch(x, list(KIND_IDS)[kind], q, scale, offset, bias, group, n, k)


def _op_shape(x, q, scale, offset, bias, kind, group, n, k):
    return x.new_empty(*x.shape[:-1], n)


# Registered whether or not triton is installed: its body imports the kernels on first use.
packed_linear_op = gpu.custom_op("llamadist::packed_linear", _op, fake=_op_shape)


def _tinygemm_dequant(packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int,
                      group: int, tiles: int) -> torch.Tensor:
    return gpu.load("wquant").tinygemm_dequant(packed, scales_zeros, n, k, group, tiles,
                                               scales_zeros.dtype)


def _tinygemm_dequant_shape(packed, scales_zeros, n, k, group, tiles):
    return scales_zeros.new_empty(n, k)


# W (N, K) in the table's dtype from tinygemm's int4 layout (kernels.gpu.wquant says how
# it is read): the product of more rows than tinygemm serves well, through cuBLAS
tinygemm_dequant = gpu.custom_op("llamadist::tinygemm_dequant", _tinygemm_dequant,
                                 fake=_tinygemm_dequant_shape)


def _tinygemm_mma(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int,
                  group: int, tiles: int) -> torch.Tensor:
    x2 = x.contiguous()
    cfg = mma_config(x2.shape[0], n, x2.shape[1], tiles, device_traits(x2.device)[0])
    return gpu.load("wquant").tinygemm_mma(x2, packed, scales_zeros, n, group, tiles, cfg)


def _tinygemm_mma_shape(x, packed, scales_zeros, n, group, tiles):
    return x.new_empty(x.shape[0], n)


# y (M, N) = x (M, K) @ W^T from tinygemm's int4 layout through tensor-core tiles (W
# dequantized in registers): int4 calls of wquant_torch.int4_product's "mma" rows
tinygemm_mma = gpu.custom_op("llamadist::tinygemm_mma", _tinygemm_mma,
                             fake=_tinygemm_mma_shape)


def packed_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for a kernels.wquant.PackedWeight ``w`` on x's device."""
    return packed_linear_op(x, w.q, w.scale, w.offset, bias, KIND_IDS[w.kind], w.group,
                            w.shape[0], w.shape[1])
