"""Every Triton kernel of llamadist compiled for an H200 (CUDA sm_90) by Triton's own
compiler, on a machine without a GPU: run by tests/unit/test_triton_compile.py as
``python -m tests.triton_compile_cases GROUP...`` WITHOUT TRITON_INTERPRET.

The interpreter (the other CPU tests) runs a kernel's Python line by line and never
type-checks it, so code that Triton's compiler rejects passes there: two returns of
different shapes under a constexpr ``if`` (moe_routed's ``_x_part``, found on the H200),
a loop-carried variable whose type changes, a ``return`` inside a loop. Triton's
compiler needs no driver up to the cubin (front end, MLIR passes, LLVM's NVPTX backend,
the bundled ptxas), so here each kernel's own launch wrapper runs on CPU tensors with
every ``kernel[grid](...)`` replaced by ``kernel.warmup(..., grid=grid)`` (compile, no
launch) under a stand-in driver that names device 0 and the target: the specialization
(ints equal to 1 as constants, 16-divisible pointers and ints), constexprs and options
are the launch's own. Each compiled kernel's shared memory must also fit an H200 block.

Prints one line per distinct compile, FAIL on the bad ones; the exit status counts them.
The cases cover each kernel's constexpr branches (config kinds, dtypes, aligned and odd
shapes, masks, splits), not every combination.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import replace

import torch

TARGET = ("cuda", 90, 32)  # backend, arch (H100 / H200), warp size
MAX_SHARED = 232448        # bytes of shared memory one block may use on sm_90
_seen: set[str] = set()
_bad: set[str] = set()


def _no_gpu_driver() -> None:
    """Make Triton's active driver a stand-in that names device 0, stream 0 and TARGET:
    what JITFunction.run asks before it compiles (nothing here launches)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class NoGpu:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget(*TARGET)

    driver.set_active(NoGpu())


class _CompileOnly:
    """Stands in for a @triton.jit kernel in its module: ``kernel[grid](*args, **kw)``
    compiles through JITFunction.warmup (the launch's specialization) and records it."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # a line per kernel, constexprs and argument kinds (what specializes it)
            consts = " ".join(f"{k}={v}" for k, v in kwargs.items())
            key = f"{self.fn.__name__} {consts} " + ",".join(
                f"{a.dtype}" if isinstance(a, torch.Tensor) else
                ("1" if a == 1 else "16n" if isinstance(a, int) and a % 16 == 0 else
                 type(a).__name__) for a in args)
            try:  # (a launch seen before hits Triton's in-memory cache)
                k = self.last = self.fn.warmup(*args, grid=grid, **kwargs)
                err = (None if k.metadata.shared <= MAX_SHARED else
                       f"shared memory {k.metadata.shared} B > {MAX_SHARED} B")
                note = f"shared {k.metadata.shared}"
            except Exception as e:  # noqa: BLE001 - every failure is reported
                err, note = _chain(e), ""
            if key not in _seen:
                print(f"{key}: {note}" if err is None else f"{key}:  FAIL\n{err}\n")
            _seen.add(key)
            if err is not None:
                _bad.add(key)
        return launch


def _chain(e: BaseException) -> str:
    """An error and its causes (a CompilationError's message points at the call in the
    kernel; the helper's own line and the reason are in its __cause__)."""
    parts = []
    while e is not None and len(parts) < 4:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return "\ncaused by ".join(parts)


@contextlib.contextmanager
def _dependent():
    """Launches inside compile as programmatic dependent launches (the kernels' PDL
    constexpr and launch_pdl: kernels.gpu.dependent), on these CPU tensors too."""
    from llamadist.kernels import gpu
    real = gpu.launch_dependent
    gpu.launch_dependent = lambda device: True
    try:
        yield
    finally:
        gpu.launch_dependent = real


def _patch(module) -> None:
    """Each launched kernel (``*_kernel``; the helpers it calls stay) compiles only."""
    from triton.runtime.jit import JITFunction
    for name, v in list(vars(module).items()):
        if isinstance(v, JITFunction) and name.endswith("_kernel"):
            setattr(module, name, _CompileOnly(v))


def moe_routed_cases() -> None:
    """Each config kind of tests/moe_routed_cases (prefetch, split-K, x_tile, tiles,
    warps), bf16 at N = 1 top-2 on 16-divisible D, F and float32 at N = 3 top-1 on odd
    ones (D = 83, F = 149)."""
    from llamadist.kernels import gpu
    from tests.moe_routed_cases import config_kinds
    m = gpu.load("moe_routed")
    _patch(m)
    g = 4
    for cfg in config_kinds():
        for dtype, n, k, d, f in ((torch.bfloat16, 1, 2, 128, 256),
                                  (torch.float32, 3, 1, 83, 149)):
            x = torch.zeros(n, d, dtype=dtype)
            group = torch.zeros(n * k, dtype=torch.long)
            m.launch(x, torch.zeros(n * k), group, torch.zeros(g, 2 * f, d, dtype=dtype),
                     torch.zeros(g, d, f, dtype=dtype), cfg)
    x, group = torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long)
    with _dependent():  # the three kernels as dependent launches
        m.launch(x, torch.zeros(2), group, torch.zeros(g, 512, 128, dtype=torch.bfloat16),
                 torch.zeros(g, 128, 256, dtype=torch.bfloat16), config_kinds()[2])


def wquant_cases() -> None:
    """Every format (int8 per row and grouped, int4 groups of 128 and 32, fp8) through the
    rule's GEMV (the H200's traits) and the GEMM on both shapes, and through the GEMV
    configs of tests/gpu/test_wquant_gpu.py (split-K, tiles past K, prefetch 0-2, one
    and two warps), its decode variants (native int8 / fp8, int4's group sums, each row's
    deferred sums), the former GEMV ("v0") and the GEMM's tiles ("dot"). Row counts (GEMV
    1-4, GEMM BLOCK_M 16, 64, 128), x dtypes (bf16, fp16, float32: XDT and IEEE) and bias rotate over the cases,
    as the GPU test's do (every launch compiles for ~1 s). Then dependent launches, the
    gate | up GEMV writing silu(gate) * up (GLU), int8's biased decode past K's end
    (split-K), tinygemm's int4 layout dequantized to
    bf16 (two tile counts)."""
    from llamadist.kernels import gpu
    from llamadist.kernels import wquant as W
    from llamadist.kernels import wquant_triton
    from llamadist.kernels.wquant_triton import GemvConfig
    m = gpu.load("wquant")
    _patch(m)
    m.device_traits = lambda device: (132, True)  # the H200: 132 SMs, float8e4nv
    formats = {"int8": W.quantize_int8, "int8_g32": lambda w: W.quantize_int8(w, 32),
               "int4": W.quantize_int4, "int4_g32": lambda w: W.quantize_int4(w, 32),
               "fp8": W.quantize_fp8}
    configs = [GemvConfig(block_n=16, block_k=32, split=3),
               GemvConfig(block_n=8, block_k=64, warps=2, split=2, prefetch=1),
               GemvConfig(block_n=64, block_k=512, warps=1, prefetch=0), None, "v0", "dot"]
    shapes = ((64, 256), (37, 300))
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    for i, (fmt, quantize) in enumerate(formats.items()):
        weights = [quantize(torch.randn(n, k)) for n, k in shapes]
        variant = (GemvConfig(group_sums=True, prefetch=1) if fmt.startswith("int4")
                   else GemvConfig(native=True, prefetch=1))
        runs = [(j, None, rows) for j in (0, 1)  # the rule: a GEMV and a GEMM row count
                for rows in (1 + (i + 2 * j) % 4, (5, 33, 130)[(i + j) % 3])]
        runs += [((i + c) % 2, variant if cfg is None else cfg, 1 + (i + c) % 4)
                 for c, cfg in enumerate(configs)]
        runs += [(0, GemvConfig(native=not fmt.startswith("int4"), prefetch=1 - i % 2,
                                defer=True), 1 + i % 4)]  # deferred sums, 1-4 rows
        for c, (j, cfg, rows) in enumerate(runs):
            (n, k), pw, dtype = shapes[j], weights[j], dtypes[(i + c) % 3]
            bias = torch.zeros(n, dtype=dtype) if (i + c) % 2 else None
            m.launch(torch.zeros(rows, k, dtype=dtype), pw.kind, pw.q, pw.scale, pw.offset,
                     bias, pw.group, n, k, cfg)
    pw = W.quantize_int8(torch.randn(64, 256))
    with _dependent():  # dependent launches: the GEMV and its sum
        m.launch(torch.zeros(1, 256, dtype=torch.bfloat16), "int8", pw.q, pw.scale, None,
                 None, pw.group, 64, 256, GemvConfig(block_n=16, block_k=32, split=3))
        before, wquant_triton.FIRST_EARLY = wquant_triton.FIRST_EARLY, True  # W's first
        try:  # tiles before the wait: prefetch 0-2
            for pf, cfg in enumerate((GemvConfig(block_n=8, block_k=128, prefetch=0,
                                                 defer=True), GemvConfig(native=True),
                                      GemvConfig(block_n=16, block_k=64))):
                m.launch(torch.zeros(1 + pf, 256, dtype=torch.bfloat16), "int8", pw.q,
                         pw.scale, None, None, pw.group, 64, 256, replace(cfg, prefetch=pf))
        finally:
            wquant_triton.FIRST_EARLY = before
    with _dependent():  # gate | up GEMVs writing silu(gate) * up (GLU): int8's one-row
        # cut with its first tile before the wait, fp8's native 8-warp cut, grouped int8
        for fmt, rows, cfg in (("int8", 1, GemvConfig(block_n=16, block_k=256, defer=True)),
                               ("fp8", 2, GemvConfig(block_n=32, warps=8, native=True)),
                               ("int8_g32", 3, GemvConfig(block_n=16, block_k=128,
                                                          defer=True))):
            pw = formats[fmt](torch.randn(128, 512))
            m.launch_glu(torch.zeros(rows, 512, dtype=torch.bfloat16), pw.kind, pw.q,
                         pw.scale, None, pw.group, 128, 512, cfg)
    pw = W.quantize_int8(torch.randn(64, 2048), 32)  # grouped int8's own cuts: tiles of
    for rows, bn, bk in ((1, 8, 2048), (2, 8, 1024), (3, 16, 512)):  # several groups
        m.launch(torch.zeros(rows, 2048, dtype=torch.bfloat16), "int8", pw.q, pw.scale, None,
                 None, 32, 64, 2048, GemvConfig(block_n=bn, block_k=bk, split=1, prefetch=0,
                                                defer=True))
    # int8's biased decode (one bf16 row, sums deferred) with split-K and tiles past K
    pw = W.quantize_int8(torch.randn(37, 300))
    m.launch(torch.zeros(1, 300, dtype=torch.bfloat16), "int8", pw.q, pw.scale, None,
             None, 300, 37, 300, GemvConfig(block_n=8, block_k=64, split=3, prefetch=1,
                                            defer=True))
    for n, k, group, tiles in ((64, 256, 32, 8), (48, 96, 32, 2)):  # tinygemm's W, bf16
        m.tinygemm_dequant(torch.zeros(n // 8, k // (16 * tiles), 32, tiles // 2,
                                       dtype=torch.int32),
                           torch.zeros(k // group, n, 2, dtype=torch.bfloat16), n, k, group,
                           tiles, torch.bfloat16)

    from llamadist.kernels.wquant_triton import mma_config
    cases = ((8192, 8192, 32, 8, 16), (1024, 4096, 128, 8, 64), (64, 96, 32, 2, 24),
             (1024, 4096, 128, 8, 16))  # the last as a dependent launch
    for c, (n, k, group, tiles, rows) in enumerate(cases):  # tinygemm's W times x, bf16
        with _dependent() if c == len(cases) - 1 else contextlib.nullcontext():
            m.tinygemm_mma(torch.zeros(rows, k, dtype=torch.bfloat16),
                           torch.zeros(n // 8, k // (16 * tiles), 32, tiles // 2,
                                       dtype=torch.int32),
                           torch.zeros(k // group, n, 2, dtype=torch.bfloat16), n, group,
                           tiles, replace(cfg := mma_config(rows, n, k, tiles),
                                          prefetch=rows == 64,
                                          stages=1 if rows == 64 else cfg.stages))


def paged_cases() -> None:
    """The paged decode kernels (write, split, merge), one split (direct) and several:
    bf16 (the tensor-core dot) at head sizes 128 and 64 (G = 4, 1), float32 (the IEEE
    dot) at 80, padded to 128 (G = 8; float32's tiles of 128 use the most shared memory).
    Other pairings differ only in numbers, not in the code compiled."""
    from llamadist.kernels import gpu
    from llamadist.kernels import paged_attention as front
    m = gpu.load("paged_attention")
    _patch(m)
    for dtype, shapes in ((torch.bfloat16, ((32, 8, 128, 16), (8, 8, 64, 16))),
                          (torch.float32, ((16, 2, 80, 32),))):
        for h, h_kv, d, bs in shapes:
            s, nb = 3, 20
            q, kv = torch.zeros(s, h, d, dtype=dtype), torch.zeros(2, nb, h_kv, bs, d,
                                                                    dtype=dtype)
            m.write_kv(torch.zeros(s, h_kv, d, dtype=dtype), torch.zeros(s, h_kv, d,
                                                                         dtype=dtype),
                       kv, torch.zeros(s, dtype=torch.long))
            tables = torch.zeros(s, 8, dtype=torch.int32)
            for splits in (1, 4):
                m.attend(q, kv, tables, torch.ones(s, dtype=torch.int32), splits)
            if d == 128:  # the same three kernels as dependent launches, and the split
                with _dependent():  # kernel's first tile before its wait (EARLY_TILE)
                    m.write_kv(q[:, :h_kv], q[:, :h_kv], kv, torch.zeros(s, dtype=torch.long))
                    m.attend(q, kv, tables, torch.ones(s, dtype=torch.int32), 4)
                    front.EARLY_TILE, front.SPLIT_GRAIN = True, 16  # and ranges of grains
                    try:
                        for splits in (1, 4):
                            m.attend(q, kv, tables, torch.ones(s, dtype=torch.int32), splits)
                    finally:
                        front.EARLY_TILE, front.SPLIT_GRAIN = False, front.BLOCK_N
                    gpu.TRIGGER_FIRST = True  # each lets the next launch before its wait
                    try:
                        m.write_kv(q[:, :h_kv], q[:, :h_kv], kv,
                                   torch.zeros(s, dtype=torch.long))
                        m.attend(q, kv, tables, torch.ones(s, dtype=torch.int32), 4)
                    finally:
                        gpu.TRIGGER_FIRST = False
    l2_prefetch_cases()


def l2_prefetch_cases() -> None:
    """kernels.l2_prefetch's kernel (part of the paged group: it runs after the attention),
    plain and as a dependent launch either way round; its PTX must hold the bulk prefetch
    (an inline asm the interpreter cannot run)."""
    from llamadist.kernels import gpu
    m = gpu.load("l2_prefetch")
    _patch(m)
    words = torch.zeros(1 << 18, dtype=torch.uint8)
    table = torch.zeros(4096, dtype=torch.bfloat16)
    found = [(words, words.numel()), (table, table.nbytes - 16)]
    m.prefetch(found)
    with _dependent():
        m.prefetch(found)
        gpu.TRIGGER_FIRST = True
        try:
            m.prefetch(found)
        finally:
            gpu.TRIGGER_FIRST = False
    if "cp.async.bulk.prefetch.L2.global" not in m._prefetch_kernel.last.asm["ptx"]:
        print("_prefetch_kernel: no cp.async.bulk.prefetch.L2.global in its PTX  FAIL")
        _bad.add("_prefetch_kernel ptx")


def decode_cases() -> None:
    """The static-cache decode kernels (split, merge): bf16 and float32, each at head
    sizes 128 (G = 4, many splits) and 64 (G = 1, few), with and without the additive
    mask and the in-kernel RoPE: each dtype both flags off and on at one size, one
    flag alone at the other (mask for float32, RoPE for bf16); one split (one tile of
    cache, bf16, both flags) plain and as a dependent launch."""
    from llamadist.kernels import gpu
    m = gpu.load("decode_attention")
    _patch(m)
    m._multiprocessors = lambda index: 132  # the H200's
    for j, dtype in enumerate((torch.bfloat16, torch.float32)):
        for i, (b, h_kv, g, d, s) in enumerate(((1, 8, 4, 128, 4096), (2, 4, 1, 64, 96))):
            q = torch.zeros(b, h_kv, g, d, dtype=dtype)
            kv = torch.zeros(b, h_kv, s, d, dtype=dtype)
            flags = ((False, False), (True, True)) if i == j else ((i == 0, i == 1),)
            for mask, rope in flags:
                am = torch.zeros(b, 1, 1, s, dtype=dtype) if mask else None
                cs = torch.zeros(b, 1, 1, d, dtype=dtype) if rope else None
                m.launch(q, kv, kv, am, torch.zeros(1, dtype=torch.long), cs, cs)
                if i == j == 0 and rope:  # as dependent launches
                    with _dependent():
                        m.launch(q, kv, kv, am, torch.zeros(1, dtype=torch.long), cs, cs)
    # one tile of cache: one split, which writes the output itself (no merge kernel)
    q, kv = torch.zeros(1, 8, 4, 128, dtype=torch.bfloat16), torch.zeros(1, 8, 64, 128,
                                                                         dtype=torch.bfloat16)
    am, cs = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 128,
                                                                        dtype=torch.bfloat16)
    m.launch(q, kv, kv, am, torch.zeros(1, dtype=torch.long), cs, cs)
    with _dependent():
        m.launch(q, kv, kv, am, torch.zeros(1, dtype=torch.long), cs, cs)


def eager_fused_cases() -> None:
    """The fused eager kernels: add + RMSNorm with and without the residual (D = 4096,
    576, 100), SiLU * up (F = 14336 in column blocks of 256 and 1024, 99), RoPE of q
    and k (Llama-3-8B's 32 / 8 heads of 128, SmolLM2's 9 / 3 of 64, D = 10): bf16, fp16
    and float32."""
    from llamadist.kernels import gpu
    m = gpu.load("eager_fused")
    _patch(m)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    for i, d in enumerate((4096, 576, 100)):
        for j, dtype in enumerate(dtypes):
            x = torch.zeros(3, d, dtype=dtype)
            m.add_rms_norm(x, x if (i + j) % 2 else None, torch.zeros(d, dtype=dtype), 1e-5)
    for n, f in ((5, 14336), (300, 14336), (3, 99)):  # column blocks of 256, 1024, 128
        for dtype in dtypes:
            m.silu_mul(torch.zeros(n, 2 * f, dtype=dtype))
    for h, h_kv, d in ((32, 8, 128), (9, 3, 64), (3, 1, 10)):
        for dtype in dtypes:
            qkv = torch.zeros(4, (h + 2 * h_kv) * d, dtype=dtype)
            q, k = qkv[:, :h * d].view(4, h, d), qkv[:, h * d:(h + h_kv) * d].view(4, h_kv, d)
            cs = torch.zeros(4, d, dtype=dtype)
            m.rope(q, k, cs, cs)
    x, qkv = torch.zeros(3, 4096, dtype=torch.bfloat16), torch.zeros(4, 48 * 128,
                                                                      dtype=torch.bfloat16)
    cs = torch.zeros(4, 128, dtype=torch.bfloat16)
    with _dependent():  # each kernel as a dependent launch, bf16
        m.add_rms_norm(x, x, torch.zeros(4096, dtype=torch.bfloat16), 1e-5)
        m.silu_mul(torch.zeros(5, 2 * 14336, dtype=torch.bfloat16))
        m.rope(qkv[:, :4096].view(4, 32, 128), qkv[:, 4096:5120].view(4, 8, 128), cs, cs)


def selftest_cases() -> None:
    """Two toy kernels that the interpreter runs and the compiler rejects: a helper whose
    constexpr branches return different shapes (moe_routed's ``_x_part`` before its fix)
    and a loop-carried variable whose type changes. Both must FAIL (the harness checks)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _two_shapes(p, N: tl.constexpr, TILE: tl.constexpr):
        c = tl.arange(0, N)
        if TILE:
            return tl.load(tl.broadcast_to(p + c[None, :], (4, N)))
        return tl.load(p + c)[None, :]

    @triton.jit
    def _return_kernel(x_ptr, y_ptr, N: tl.constexpr, TILE: tl.constexpr):
        tl.store(y_ptr + tl.arange(0, N), tl.sum(_two_shapes(x_ptr, N, TILE), axis=0))

    @triton.jit
    def _loop_kernel(x_ptr, y_ptr, K, N: tl.constexpr):
        acc = tl.zeros((N,), dtype=tl.float16)
        for k in range(K):
            acc += tl.load(x_ptr + k * N + tl.arange(0, N)).to(tl.float32)
        tl.store(y_ptr + tl.arange(0, N), acc)

    globals()["_two_shapes"] = _two_shapes  # where the kernel's body looks names up
    x, y = torch.zeros(64), torch.zeros(16)
    _CompileOnly(_return_kernel)[(1,)](x, y, N=16, TILE=True)
    _CompileOnly(_loop_kernel)[(1,)](x, y, 4, N=16)


GROUPS = {"moe_routed": moe_routed_cases, "wquant": wquant_cases, "paged": paged_cases,
          "decode": decode_cases, "eager_fused": eager_fused_cases,
          "selftest": selftest_cases}


def main(groups: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET: the interpreter compiles nothing")
    with tempfile.TemporaryDirectory(prefix="triton_compile_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile everything, keep nothing
        _no_gpu_driver()
        for name in groups or [g for g in GROUPS if g != "selftest"]:
            GROUPS[name]()
    print(f"{len(_seen)} compiled, {len(_bad)} failed")
    return len(_bad)


if __name__ == "__main__":  # python -m tests.triton_compile_cases [moe_routed wquant ...]
    raise SystemExit(main(sys.argv[1:]))
