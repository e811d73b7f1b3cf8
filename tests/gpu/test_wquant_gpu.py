"""The Triton weight-only kernels (llamadist.kernels.wquant_triton) against float64
dequantize-then-matmul, on random weights of every format, odd sizes and tails, GEMV and
GEMM row counts. On CUDA (marked gpu); without CUDA they also run on CPU tensors under
Triton's interpreter: ``TRITON_INTERPRET=1 pytest tests/gpu/test_wquant_gpu.py`` (in a
venv with triton; the interpreter has no bfloat16 dot, so bf16 is checked on CUDA only).

The interpreter runs every combination. CUDA compiles one kernel per distinct
(constexprs, x dtype, which sizes are 1 or multiples of 16), ~0.5-2 s each, so there
the combinations are rotated (``format_cases`` etc.): each format and dtype still meets
every shape, GEMV row count (1-4) and GEMM BLOCK_M class (16, 64, 128), each GemvConfig
both of its shapes (the rule's H200 choices for Llama-3-8B among them), in ~135
compilations instead of ~660.

Tolerance, with S = |x| @ |W|^T (the sum of the products' magnitudes) per output:
* float32 x: |y - ref| <= 2e-5 S (float32 accumulation; the dot runs in IEEE fp32);
* float16 / bfloat16 x: <= 2^-7 S + 2^-7 |ref| (grouped formats round each dequantized
  weight to x's dtype before the tensor-core dot, ~2^-9 relative for bf16, and y is
  rounded to x's dtype).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from llamadist.kernels import gpu
from llamadist.kernels import wquant as W
from llamadist.kernels import wquant_triton as T
from llamadist.kernels.quant_ref import TYPE_IDS
from tests.quant_blocks import random_blocks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
ON_CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None or not gpu.INSTALLED,
                                 reason="needs CUDA (or TRITON_INTERPRET=1 with triton)")]

ALL_DTYPES = ["float32", "float16", "bfloat16"]
DTYPES = ALL_DTYPES if ON_CUDA else ALL_DTYPES[:2]
ROWS = [1, 2, 3, 4, 5, 16, 33]  # GEMV 1-4; GEMM BLOCK_M 16 (a tail, whole), 64
GEMM_CLASSES = (5, 33, 130)     # CUDA: BLOCK_M 16, 64 and 128 (two tiles, 8 warps)
SHAPES = [(37, 300), (64, 257), (96, 512)]


def _q8_0(n: int, k: int) -> W.PackedWeight:
    b = random_blocks(TYPE_IDS["Q8_0"], n, k, np.random.default_rng(n + k))
    return W.from_gguf(torch.from_numpy(b), TYPE_IDS["Q8_0"], (n, k))


def _q4_k(n: int, k: int) -> W.PackedWeight:
    b = random_blocks(TYPE_IDS["Q4_K"], n, k, np.random.default_rng(n + k))
    return W.from_gguf(torch.from_numpy(b), TYPE_IDS["Q4_K"], (n, k))


FORMATS = {"int8": W.quantize_int8, "int8_g32": lambda w: W.quantize_int8(w, 32),
           "int4": W.quantize_int4, "int4_g32": lambda w: W.quantize_int4(w, 32),
           "fp8": W.quantize_fp8, "int4_g64": lambda w: W.quantize(w, "int4-g64")}
FORMATS_KIND = {f: f.split("_")[0] for f in FORMATS}


def check(pw: W.PackedWeight, m: int, dtype: torch.dtype, bias: bool,
          config: T.GemvConfig | str | None = None) -> None:
    n, k = pw.shape
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    pw = pw.to(DEVICE)
    bd = None if b is None else b.to(DEVICE)
    if config is None:
        y = T.packed_linear(x.to(DEVICE), pw, bd).cpu()
    else:
        y = T.launch(x.to(DEVICE), pw.kind, pw.q, pw.scale, pw.offset, bd, pw.group, n, k,
                     config).cpu()
    assert y.dtype == dtype and y.shape == (m, n)
    wd = pw.dequantize(torch.float64).cpu()
    ref = x.double() @ wd.t() + (0 if b is None else b.double())
    s = x.double().abs() @ wd.abs().t()
    tol = 2e-5 * s if dtype == torch.float32 else 2.0 ** -7 * (s + ref.abs())
    err = (y.double() - ref).abs()
    assert (err <= tol + 1e-6).all(), f"max error {err.max():.3g}, at most {tol.max():.3g}"


def format_cases(cuda: bool) -> list[tuple]:
    """(fmt, n, k, dtype, rows) of test_formats_against_float64: the interpreter every
    format x shape x dtype with every row count; CUDA each (format, dtype) once, its shape,
    GEMV rows ((1, 4) or (2, 3)) and GEMM class rotated (a Latin square per format and
    per dtype: every format and every dtype meets all three shapes and classes)."""
    if not cuda:
        return [(f, n, k, d, tuple(ROWS)) for f in FORMATS for n, k in SHAPES
                for d in ALL_DTYPES[:2]]
    out = []
    for i, f in enumerate(FORMATS):
        for j, d in enumerate(ALL_DTYPES):
            n, k = SHAPES[(i + 2 * j) % 3]
            gemv = (1, 4) if (i + j) % 2 == 0 else (2, 3)
            out.append((f, n, k, d, gemv + (GEMM_CLASSES[(i + j) % 3],)))
    return out


@pytest.mark.parametrize("fmt,n,k,dtype,rows", format_cases(ON_CUDA),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_formats_against_float64(fmt, n, k, dtype, rows):
    w = torch.randn(n, k) * torch.logspace(-2, 0, n).view(-1, 1)
    pw = FORMATS[fmt](w)
    for m in rows:
        check(pw, m, getattr(torch, dtype), bias=m % 2 == 1)


# GEMV cuts the rule may not pick for these small shapes: split-K (partials + the sum
# kernel), K ranges and tiles that end inside a row (no EVEN_K), tiles wider than K, one
# or two warps, rows not a multiple of BLOCK_N, prefetch depths 0, 1 and 2; the former
# GEMV ("v0") and the GEMM's tiles ("dot") the sweep compares them with; the decode
# variants: native conversions (int8, fp8) and int4's group sums.
GEMV_CONFIGS = [T.GemvConfig(block_n=16, block_k=32, split=3),
                T.GemvConfig(block_n=8, block_k=64, warps=2, split=2, prefetch=1),
                T.GemvConfig(block_n=64, block_k=512, warps=1, prefetch=0),
                "v0", "dot"]
VARIANTS = {"int8": [T.GemvConfig(native=True, prefetch=1),
                     T.GemvConfig(block_n=16, block_k=32, split=3, native=True, prefetch=0)],
            "int4": [T.GemvConfig(group_sums=True, prefetch=1),
                     T.GemvConfig(block_n=16, block_k=32, split=3, group_sums=True,
                                  prefetch=0)]}
# float8e4nv: sm_89+ on CUDA; Triton 3.7's interpreter decodes every finite e4m3 code
FP8_NATIVE = not ON_CUDA or T.device_traits(torch.device("cuda"))[1]
VARIANTS["fp8"] = VARIANTS["int8"] if FP8_NATIVE else []
CONFIG_RUNS = [(37, 300, torch.float32), (64, 256, torch.float16)]
# the rule's choices on an H200 (132 SMs; float8 conversion where this device has it) for
# Llama-3-8B's decode shapes, M = 1..4, run on the small shapes above (the split clamped to
# the tiles there are): the configurations the default path takes on the GPU
LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
GROUPS = {"int8_g32": 32, "int4": W.INT4_GROUP, "int4_g32": 32, "int4_g64": 64}


def h200_rule(fmt: str) -> list[T.GemvConfig]:
    out = []
    for (n, k), m in itertools.product(LLAMA3_8B, range(1, T.GEMV_MAX_M + 1)):
        cfg = T.gemv_config(FORMATS_KIND[fmt], m, n, k, GROUPS.get(fmt, k), 132, FP8_NATIVE)
        out += [cfg] if cfg not in out else []
    return out


def config_cases(cuda: bool) -> list[tuple]:
    """(fmt, config, runs: (n, k, dtype, m) ...) of test_gemv_configs_against_float64.
    The interpreter: both CONFIG_RUNS, each at one M (rotated over the formats: every
    config meets every M on both runs). CUDA: one run at one M, rotated over the formats
    (each config meets both runs and two to four M)."""
    out = []
    for i, fmt in enumerate(FORMATS):
        cfgs = GEMV_CONFIGS + VARIANTS[FORMATS_KIND[fmt]] + h200_rule(fmt)
        for c, cfg in enumerate(cfgs):
            if not cuda:
                runs = [(n, k, d, 1 + (i + c + 2 * j) % T.GEMV_MAX_M)
                        for j, (n, k, d) in enumerate(CONFIG_RUNS)]
            else:
                runs = [CONFIG_RUNS[(i + c) % 2] + (1 + (i // 2 + c) % T.GEMV_MAX_M,)]
            out.append((fmt, cfg, runs))
    return out


def _label(v):
    if isinstance(v, list):  # the runs
        return "+".join(f"{n}x{k}{str(d)[6:]}m{m}" for n, k, d, m in v)
    return v.label() if isinstance(v, T.GemvConfig) else v


@pytest.mark.parametrize("fmt,cfg,runs", config_cases(ON_CUDA), ids=_label)
def test_gemv_configs_against_float64(fmt, cfg, runs):
    """Every GemvConfig the sweep may choose computes the same product, M = 1..4."""
    for n, k, dtype, m in runs:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
        pw = FORMATS[fmt](w).to(DEVICE)
        check(pw, m, dtype, bias=m % 2 == 0, config=cfg)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gemv_deferred_sums(fmt):
    """``defer`` (each row's products summed elementwise over the tiles, reduced along K
    after the loop): GemvConfig's default cut and an odd one (split-K, K ranges and tiles
    ending inside a row, rows past N), bf16 and float32 x, 1-4 rows of x (each row its
    own tile of sums). (The rule's own deferred cuts run in
    test_gemv_configs_against_float64's h200_rule.)"""
    kind = FORMATS_KIND[fmt]
    native = kind != "int4" and (kind == "int8" or FP8_NATIVE)
    cfgs = [T.GemvConfig(native=native, prefetch=1, defer=True),
            T.GemvConfig(block_n=16, block_k=32, split=3, prefetch=0, defer=True)]
    for j, (cfg, (n, k, dtype)) in enumerate(itertools.product(cfgs, CONFIG_RUNS)):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
        for m in (1 + j % 4, 4 - j % 4):  # each cut at 1-4 rows
            check(FORMATS[fmt](w), m, dtype, bias=j % 2 == 0, config=cfg)
    check(FORMATS[fmt](torch.randn(37, 300)), 4, torch.float32, bias=False, config=cfgs[1])


def gguf_cases(cuda: bool) -> list[tuple]:
    """(conversion, dtype, rows): the interpreter every row count; CUDA one row count per
    (conversion, dtype), GEMV and GEMM in turn (the conversions' scales and offsets are
    what this checks; the kernels' paths are the formats' above)."""
    convs = [_q8_0, _q4_k]
    if not cuda:
        return [(c, d, tuple(ROWS)) for c in convs for d in ALL_DTYPES[:2]]
    return [(c, d, ((1 + i + j) % 4 + 1,) if (i + j) % 2 == 0 else (GEMM_CLASSES[j],))
            for i, c in enumerate(convs) for j, d in enumerate(ALL_DTYPES)]


@pytest.mark.parametrize("conv,dtype,rows", gguf_cases(ON_CUDA),
                         ids=lambda v: getattr(v, "__name__", None))
def test_gguf_converted_against_float64(conv, dtype, rows):
    pw = conv(48, 512)
    for m in rows:
        check(pw, m, getattr(torch, dtype), bias=False)


@pytest.mark.parametrize("native", [False, True], ids=["bits", "native"])
def test_fp8_decodes_every_finite_code(native):
    if native and not FP8_NATIVE:
        pytest.skip("no float8e4nv conversion before sm_89")
    """All 254 finite e4m3 bit patterns (subnormals, both signs) as one weight row each,
    through the bit decode and the float8e4nv conversion (Triton 3.7's interpreter has
    it too)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    pw = W.PackedWeight("fp8", codes.view(-1, 1).repeat(1, 32), torch.full((254, 1), 0.5),
                        None, 32, (254, 32)).to(DEVICE)
    x = torch.zeros(1, 32)
    x[0, 5] = 1.0
    y = T.launch(x.to(DEVICE), "fp8", pw.q, pw.scale, None, None, 32, 254, 32,
                 T.GemvConfig(native=native, prefetch=0)).cpu()[0]
    want = codes.view(torch.float8_e4m3fn).float() * 0.5
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_bit_decode_every_code_in_place(dtype):
    """All 256 int8 codes through the bit decode (on a GPU one PTX byte permute a code,
    four codes a 32-bit word): row r holds codes 4r .. 4r + 3 in columns 0-3, so each
    column of a word meets a one-hot x alone; per tile and deferred, exact (bf16 x
    deferred: the biased decode, q + 32 896 less x's sum times 32 896)."""
    codes = (torch.arange(64 * 32) % 256).view(64, 32)
    codes[:, :4] = torch.arange(256).view(64, 4)
    q = (codes - 128).to(torch.int8)
    pw = W.PackedWeight("int8", q, torch.full((64, 1), 0.5, dtype=dtype), None, 32,
                        (64, 32)).to(DEVICE)
    for cfg in (T.GemvConfig(native=False, prefetch=0),
                T.GemvConfig(block_n=8, block_k=32, native=False, prefetch=0, defer=True)):
        for c in (0, 1, 2, 3, 17):
            x = torch.zeros(1, 32, dtype=dtype)
            x[0, c] = 1.0
            y = T.launch(x.to(DEVICE), "int8", pw.q, pw.scale, None, None, 32, 64, 32,
                         cfg).cpu()[0]
            assert torch.equal(y, (q[:, c].float() * 0.5).to(dtype)), (cfg.label(), c)


@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_int8_biased_decode_within_rounding(mean, monkeypatch):
    """The one-row deferred int8 GEMV with bf16 x decodes q + 32 896 (the offset off each
    lane's sum once, ``wquant_triton.int8_biased``): the outputs stay within a bf16 ulp of
    the float64 product (Triton's interpreter truncates to bf16) plus 2^-10 of its rms,
    with x centred and with x all of one sign (each lane's sum then ~32 896 times its x's
    sum); the exact decode (q, a subtraction a code) passes the same bound. Cuts: 16 rows
    of 512 bytes and an odd one (split-K, tails), each with its first tile in the loop
    and peeled off it (``FIRST_EARLY``, as a dependent launch at one row runs it). Lanes
    longer than INT8_BIASED_LANES products take the exact decode: the same bits either
    way."""
    n, k = 48, 1000
    g = torch.Generator().manual_seed(7)
    pw = W.quantize_int8(torch.randn(n, k, generator=g)).to(DEVICE)
    x = (torch.randn(1, k, generator=g) * 0.5 + mean).to(torch.bfloat16)
    ref = x.double() @ pw.dequantize(torch.float64).cpu().t()
    tol = 2.0 ** -7 * ref.abs() + 2.0 ** -10 * ref.pow(2).mean().sqrt()
    cuts = [T.GemvConfig(block_n=16, block_k=512, native=False, prefetch=0, defer=True),
            T.GemvConfig(block_n=8, block_k=64, split=3, native=False, prefetch=0,
                         defer=True)]
    for biased, cfg, first in itertools.product((True, False), cuts, (False, True)):
        monkeypatch.setattr(T, "INT8_BIASED", biased)
        monkeypatch.setattr(T, "FIRST_EARLY", first)
        y = T.launch(x.to(DEVICE), "int8", pw.q, pw.scale, None, None, k, n, k, cfg).cpu()
        err = (y.double() - ref).abs()
        assert (err <= tol).all(), (biased, cfg.label(), first, f"{(err - tol).max():.3g}")
    long = T.GemvConfig(block_n=8, block_k=32, native=False, prefetch=0, defer=True)
    assert not T.int8_biased(k, 32)  # 32 products a lane
    ys = []
    for biased in (True, False):
        monkeypatch.setattr(T, "INT8_BIASED", biased)
        ys.append(T.launch(x.to(DEVICE), "int8", pw.q, pw.scale, None, None, k, n, k, long))
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("fmt", ["int8", "int8_g32", "fp8", "int4"])
def test_first_tile_early_same_bits(fmt, monkeypatch):
    """``wquant_triton.FIRST_EARLY`` (the loop's first tiles of codes loaded before the
    dependent launch's wait; here not a dependent launch: the same loads, the first tile
    at prefetch 0 peeled off the loop): the same bits as without it, and within check's bound of
    float64, at prefetch 0 (deferred sums, the one-row rule's), 1 and 2, K ranges of one
    tile and of several, tails."""
    kind = FORMATS_KIND[fmt]
    cfgs = [T.GemvConfig(block_n=8, block_k=64, prefetch=0, defer=kind != "int4"),
            T.GemvConfig(block_n=16, block_k=32, split=3, prefetch=1),
            T.GemvConfig(block_n=16, block_k=64, prefetch=2)]
    for j, (cfg, (n, k, dtype)) in enumerate(itertools.product(cfgs, CONFIG_RUNS)):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
        pw = FORMATS[fmt](w).to(DEVICE)
        x = torch.randn(1 + j % 2, k, generator=torch.Generator().manual_seed(j)).to(dtype)
        ys = []
        for first in (False, True):
            monkeypatch.setattr(T, "FIRST_EARLY", first)
            ys.append(T.launch(x.to(DEVICE), pw.kind, pw.q, pw.scale, pw.offset, None,
                               pw.group, n, k, cfg).cpu())
        assert torch.equal(ys[0], ys[1]), (cfg.label(), n, k)
        check(pw, 1 + j % 2, dtype, bias=False, config=cfg)


@pytest.mark.parametrize("early", [100, 384])
def test_l2_early_must_be_a_power_of_two(early, monkeypatch):
    """wquant_triton.L2_EARLY (the bytes a GEMV program asks L2 for before it waits, an A/B
    switch) other than 0 or a power of two >= 128 is refused at launch, named."""
    monkeypatch.setattr(T, "L2_EARLY", early)
    pw = W.PackedWeight("int8", torch.ones(16, 32, dtype=torch.int8), torch.ones(16, 1),
                        None, 32, (16, 32)).to(DEVICE)
    with pytest.raises(ValueError, match="L2_EARLY is %d: give 0 or a power of two" % early):
        T.launch(torch.ones(1, 32).to(DEVICE), "int8", pw.q, pw.scale, None, None, 32, 16, 32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int4_x_pairs_from_odd_offsets_and_strides(dtype):
    """int4's GEMV reads x as (x[2j], x[2j + 1]) words: x views starting at an odd element,
    with an odd row stride, or an odd K are copied to an even width first."""
    dt = getattr(torch, dtype)
    for k in (130, 129):
        pw = W.quantize_int4(torch.randn(40, k)).to(DEVICE)
        big = torch.randn(3, k + 1).to(dt).to(DEVICE)
        for x in (big[:, 1:], big[:, :k], torch.randn(7, k).to(dt).to(DEVICE)[1:4]):
            y = T.packed_linear(x, pw).double().cpu()
            wd = pw.dequantize(torch.float64).cpu()
            ref = x.double().cpu() @ wd.t()
            s = x.double().abs().cpu() @ wd.abs().t()
            tol = 2e-5 * s if dt == torch.float32 else 2.0 ** -7 * (s + ref.abs())
            assert ((y - ref).abs() <= tol + 1e-6).all()


def test_empty_and_3d_inputs():
    pw = W.quantize_int4(torch.randn(40, 130)).to(DEVICE)
    x = torch.randn(2, 3, 130, device=DEVICE)
    y = T.packed_linear(x, pw)
    assert y.shape == (2, 3, 40)
    assert torch.allclose(y, T.packed_linear(x.reshape(6, 130), pw).view(2, 3, 40))
    assert T.packed_linear(x[:0], pw).shape == (0, 3, 40)


def test_packed_linear_module_compiles_without_graph_breaks():
    """The kernel pass's PackedLinear: buffers + the custom op, so torch.compile traces
    it whole (fullgraph) and gives the eager values."""
    from torch import nn
    lin = nn.Linear(130, 40, bias=True, device="meta")
    del lin.weight
    lin.weight = W.quantize_int4(torch.randn(40, 130)).to(DEVICE)
    lin.bias = nn.Parameter(torch.randn(40, device=DEVICE), requires_grad=False)
    W.as_packed_linear(lin)
    assert type(lin) is W.PackedLinear
    x = torch.randn(3, 130, device=DEVICE)
    eager = lin(x)
    compiled = torch.compile(lin, fullgraph=True, backend="eager")(x)
    assert torch.equal(eager, compiled)
    want = x.double() @ lin.weight.dequantize(torch.float64).t() + lin.bias.double()
    assert (eager.double() - want).abs().max().item() <= 1e-4


# ---- whole models on CUDA ---------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _dequantized(stage) -> None:
    from torch import nn
    for m in stage.model.modules():
        w = m.__dict__.get("weight")
        if isinstance(w, W.PackedWeight):
            m.__class__ = nn.Linear
            del m.weight
            m.weight = nn.Parameter(w.dequantize(stage.dtype), requires_grad=False)


@cuda_only
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_tiny_quantized_on_cuda_equals_dequantized_and_graphs(tiny_model, kind):
    from llamadist.api import LLM
    from llamadist.config import RuntimeConfig
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    rt = RuntimeConfig(quantize=kind, dtype="float32")

    def build():
        return build_stage(open_checkpoint(tiny_model), range(5), "cuda:0", torch.float32, 1,
                           32, runtime=rt)
    st, ref = build(), build()
    assert type(st.model.model.layers["0"].mlp.gate_up_proj) is W.PackedLinear
    _dequantized(ref)
    ids = torch.tensor([[5, 9, 33, 100, 7, 8, 250, 3]], device="cuda:0")
    pos = torch.arange(8, device="cuda:0").view(1, -1)
    got = st.forward(ids, pos, 0, None, logits="all")
    want = ref.forward(ids, pos, 0, None, logits="all")
    assert (got - want).abs().max().item() <= 1e-3
    prompts = ["The quick brown fox", "1 2 3 4 5"]
    graphs = LLM(tiny_model, devices="cuda:0", runtime=rt.replace(max_batch=2))
    eager = LLM(tiny_model, devices="cuda:0", runtime=rt.replace(max_batch=2,
                                                                  cuda_graphs=False))
    a = [r.token_ids for r in graphs.generate(prompts, max_new_tokens=16, ignore_eos=True)]
    b = [r.token_ids for r in eager.generate(prompts, max_new_tokens=16, ignore_eos=True)]
    assert a == b


@cuda_only
def test_smollm2_gguf_on_cuda_runs_int4_and_int8_blocks(smollm2):
    """Q4_1 / Q8_0 layers convert exactly to int4 / int8: the logits equal the CPU
    stage's native blocks' (float32 both) up to summation order."""
    from llamadist.config import RuntimeConfig
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    rt = RuntimeConfig(dtype="float32")
    gpu = build_stage(open_checkpoint(smollm2), range(30), "cuda:0", torch.float32, 1, 64,
                      runtime=rt)
    cpu = build_stage(open_checkpoint(smollm2), range(30), "cpu", torch.float32, 1, 64,
                      runtime=rt)
    kinds = {m.weight.kind for m in gpu.model.modules() if type(m) is W.PackedLinear}
    assert kinds == {"int4", "int8"}
    ids = open_checkpoint(smollm2).tokenizer().encode("The three primary colors are")
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).view(1, -1)
    a = gpu.forward(x.cuda(), pos.cuda(), 0, None, logits="all").cpu()
    b = cpu.forward(x, pos, 0, None, logits="all")
    assert (a - b).abs().max().item() <= 2e-3 * b.abs().max().item()


@pytest.mark.parametrize("tiles,group", [(2, 32), (8, 128)])
def test_tinygemm_dequant_reads_its_layout(tiles, group):
    """W from tinygemm's packed int4 (the product above MMA_MAX_M rows) equals
    (c - 8) scale + zero of its table exactly in float32; on CUDA the words come from
    torch's own _convert_weight_to_int4pack, so the measured layout is checked too."""
    from llamadist.kernels import wquant_torch as WT
    n, k = 48, 16 * tiles * 3
    pw = W.quantize_int4(torch.randn(n, k), group)
    codes = W.unpack_int4(pw.q, k)
    table = WT.tinygemm_scales_zeros(pw.scale, pw.offset, torch.float32)
    if ON_CUDA:  # the op's own words, and the rule the kernel reads checked against them
        packed = WT.tinygemm_pack(pw.q.cuda(), k)
        assert WT._inner_k_tiles(k) == tiles and WT.tinygemm_layout_known(packed.device)
        assert torch.equal(packed.cpu(), WT.tinygemm_layout(codes, tiles))
    else:
        packed = WT.tinygemm_layout(codes, tiles)
    w = T.tinygemm_dequant(packed.to(DEVICE), table.to(DEVICE), n, k, group, tiles).cpu()
    s, z = table[..., 0].T.repeat_interleave(group, 1), table[..., 1].T.repeat_interleave(group, 1)
    assert torch.equal(w, (codes.float() - 8) * s + z)
    if ON_CUDA:  # the rows past tinygemm (tensor-core tiles, then the dequantized
        # product) against tinygemm's own
        tz = WT.tinygemm_scales_zeros(pw.scale, pw.offset).cuda()
        for rows in (WT.TINYGEMM_MAX_M + 1, WT.MMA_MAX_M + 1):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            y = WT.int4_linear(x, packed, tz, group, n, triton=True).float()
            ref = torch.ops.aten._weight_int4pack_mm(x, packed, group, tz).float()
            assert (y - ref).abs().max() <= 2**-7 * ref.abs().max()


@pytest.mark.parametrize("tiles,ktiles,group,rows,split,prefetch", [
    (8, 5, 32, 3, 2, False), (8, 5, 128, 17, 1, True), (2, 5, 32, 40, 1, False),
    (4, 7, 64, 1, 3, True), (8, 6, 256, 20, 2, False)])
def test_tinygemm_mma_reads_its_layout(tiles, ktiles, group, rows, split, prefetch):
    """The tensor-core tiles on tinygemm's int4 words and bf16 table (the product of
    TINYGEMM_MAX_M + 1 .. MMA_MAX_M rows) against float64 (c - 8) scale + zero times x:
    float32 x under the interpreter (IEEE dot), bf16 on CUDA from the op's own words.
    Row tails (rows not a multiple of 16, N of 8-row blocks), split-K, the prefetch,
    groups within a k-tile of 16 ``tiles`` and across two."""
    from llamadist.kernels import wquant_torch as WT
    n, k = 72, 16 * tiles * ktiles
    assert WT._inner_k_tiles(k) == tiles  # the op packs K by its own tile count
    pw = W.quantize_int4(torch.randn(n, k), group)
    codes = W.unpack_int4(pw.q, k)
    table = WT.tinygemm_scales_zeros(pw.scale, pw.offset, torch.bfloat16)
    s = table[..., 0].T.double().repeat_interleave(group, 1)
    ref_w = (codes.double() - 8) * s + table[..., 1].T.double().repeat_interleave(group, 1)
    packed = WT.tinygemm_pack(pw.q.cuda(), k) if ON_CUDA else WT.tinygemm_layout(codes, tiles)
    x = torch.randn(rows, k, dtype=torch.bfloat16 if ON_CUDA else torch.float32)
    cfg = T.MmaConfig(block_n=64, block_m=16 if rows <= 16 else 64, split=split,
                      prefetch=prefetch, stages=1 if prefetch or rows <= 16 else None)
    y = gpu.load("wquant").tinygemm_mma(x.to(DEVICE), packed.to(DEVICE), table.to(DEVICE),
                                        n, group, tiles, cfg).cpu()
    ref = x.double() @ ref_w.T
    bound = 2e-5 if x.dtype == torch.float32 else 2**-7
    assert (y.double() - ref).abs().max() <= bound * (x.double().abs() @ ref_w.abs().T).max()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int8_g32"])
def test_scaled_path_sends_its_rows_to_triton(fmt, monkeypatch):
    """int8 / fp8 under --wquant torch: up to TRITON_ROWS rows through the Triton kernels
    (the GEMV, then tl.dot tiles: the scaled product would write W in x's dtype first),
    more through the scaled product (grouped int8 too, as GGUF Q8_0 gives it)."""
    from torch import nn

    from llamadist.kernels import wquant_torch as WT
    pw = FORMATS[fmt](torch.randn(32, 64)).to(DEVICE)
    lin = nn.Linear(64, 32, bias=False, device="meta")
    del lin.weight
    lin.weight = pw
    lin = W.as_packed_linear(lin, "torch", torch.float32)
    assert lin.path == "scaled"
    used = []
    scaled = WT.scaled_linear
    monkeypatch.setattr(WT, "scaled_linear", lambda *a: used.append(1) or scaled(*a))
    wd = pw.dequantize(torch.float64).cpu()
    rows = WT.TRITON_ROWS[pw.kind]
    for m, via_scaled in ((1, False), (T.GEMV_MAX_M + 1, False), (rows, False),
                          (rows + 1, True)):
        used.clear()
        x = torch.randn(m, 64)
        y = lin(x.to(DEVICE)).cpu().double()
        assert bool(used) == via_scaled
        assert (y - x.double() @ wd.T).abs().max() <= 1e-4 * (x.double().abs() @ wd.abs().T).max()


@pytest.mark.parametrize("fmt", ["int8", "int8_g32", "fp8"])
def test_glu_same_bits_as_product_then_silu(fmt):
    """wquant_triton.launch_glu (a gate | up GEMV writing silu(gate) * up itself, its
    programs pairing gate row j with up row F + j): the same bits as the product followed
    by eager_fused's silu * up kernel, at 1-4 rows, F not a multiple of a program's pairs,
    deferred sums and per-tile sums, one- and several-tile K ranges; the rule's own
    choice too (here its split-K cut: the product, then the kernel)."""
    from llamadist.kernels import eager_fused
    kind = FORMATS_KIND[fmt]
    cfgs = [T.GemvConfig(block_n=16, block_k=64, defer=True),
            T.GemvConfig(block_n=8, block_k=32, prefetch=1),
            T.GemvConfig(block_n=32, block_k=256)]
    for j, (cfg, (n, k, dtype)) in enumerate(itertools.product(cfgs, CONFIG_RUNS)):
        w = torch.randn(2 * n, k, generator=torch.Generator().manual_seed(k))
        pw = FORMATS[fmt](w).to(DEVICE)
        m = 1 + j % T.GEMV_MAX_M
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(j)).to(dtype).to(DEVICE)
        for c in (cfg, None):
            plain = eager_fused.silu_mul(T.launch(x, kind, pw.q, pw.scale, pw.offset, None,
                                                  pw.group, 2 * n, k, c)).cpu()
            y = T.launch_glu(x, kind, pw.q, pw.scale, pw.offset, pw.group, 2 * n, k, c).cpu()
            assert y.shape == (m, n) and torch.equal(y, plain), (cfg.label(), n, k, m, c)


def test_glu_refuses_a_cut_it_cannot_take():
    pw = W.quantize_int8(torch.randn(64, 256)).to(DEVICE)
    x = torch.randn(1, 256).to(DEVICE)
    with pytest.raises(ValueError, match="one K range"):
        T.launch_glu(x, "int8", pw.q, pw.scale, pw.offset, pw.group, 64, 256,
                     T.GemvConfig(block_n=8, block_k=64, split=2))


@pytest.mark.parametrize("fmt,backend", [("int8", "triton"), ("fp8", "torch")])
def test_mlp_gate_up_silu_same_output(fmt, backend, monkeypatch):
    """A fused MLP with the fused kernels on whose gate_up_proj is a PackedLinear (the
    Triton path, or --wquant torch's scaled path at its Triton rows): the same output as
    the product then silu_mul, the GLU kernel launched at 1-4 rows (a cut of one K range
    here) and not past the GEMV's rows (prefill's 9)."""
    from torch import nn

    from llamadist.config import ModelConfig
    from llamadist.kernels import eager_fused
    from llamadist.model.fuse import fuse_mlp
    from llamadist.model.llama import MLP
    gpu_wquant = gpu.load("wquant")
    launched = []
    gemv = gpu_wquant.gemv
    monkeypatch.setattr(gpu_wquant, "gemv",
                        lambda *a, **kw: launched.append(kw.get("glu", False)) or gemv(*a, **kw))
    cfg = ModelConfig(hidden_size=256, intermediate_size=384, num_layers=1, num_heads=4,
                      num_kv_heads=4, vocab_size=32, head_dim=64)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    fuse_mlp(mlp)
    gu = mlp.gate_up_proj
    pw = FORMATS[fmt](gu.weight.detach()).to(DEVICE)
    lin = nn.Linear(256, 768, bias=False, device="meta")
    del lin.weight
    lin.weight = pw
    mlp.gate_up_proj = W.as_packed_linear(lin, backend, torch.float16)
    mlp = mlp.to(DEVICE, torch.float16)
    mlp.silu_mul = eager_fused.silu_mul
    for m in (1, 2, 4, 9):
        x = torch.randn(m, 256).to(DEVICE, torch.float16)
        ref = mlp.down_proj(eager_fused.silu_mul(mlp.gate_up_proj(x)))
        launched.clear()
        assert torch.equal(mlp(x), ref), m
        assert (True in launched) == (m <= T.GEMV_MAX_M), (m, launched)
