"""CPU decode kernels (float32): ``linear(x, weight, bias)``, which is ``F.linear`` with a
kernel of our own for a few rows (``CpuLinear`` is the nn.Linear that calls it), and
``decode_layer``, a whole decoder layer for one new token per sequence in one call (the
``layer_fn`` of ``Llama.forward`` on the CPU). This module knows nothing of the model: the
runtime's kernel pass (llamadist.runtime.kernel_passes) swaps these in over a built one.
A stage's whole decode step (every layer, the final norm and the head) in one call is
llamadist.kernels.cpu_step, over the same C layer (``llamadist_decode_step_f32``).

Batch-1 decode on a CPU is a chain of GEMVs, each reading its whole weight once; the step
runs at the speed the weights stream from memory, plus what it spends around them.
PyTorch's CPU matmul reads these shapes at about half the machine's read bandwidth, and
a layer run op by op is some forty PyTorch calls (benchmarks/RESULTS.md); the loops in
``cpu_decode.c`` read the weights at about the bandwidth of a plain ``sum`` and run the
layer as one OpenMP parallel region. It is compiled on first use with the machine's C
compiler (``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, under a second) into
``$LLAMADIST_CACHE`` (default ``~/.cache/llamadist``), keyed by the source, the flags
and the CPU, and called through ctypes.

Everything else goes to ``F.linear``: other devices and dtypes, more than ``MAX_ROWS``
rows (prefill: a GEMM, where the BLAS is the better tool), tensors that need autograd.
Without a compiler every call does, after one warning that says what it costs and how to
fix it. Not to use the kernels at all, leave the pass out (``RuntimeConfig.cpu_kernels``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llamadist.kernels import weight_version

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
# Built together into one library: the quantized linears (cpu_quant.c) serve the decode
# layer's projections when its weights are GGUF blocks.
SOURCES = [SOURCE] + [SOURCE.with_name(f"cpu_quant{s}.c") for s in ("", "_k", "_half")]
HEADERS = [SOURCE.with_name("cpu_quant.h")]
# Rows of x up to which the kernel beats the BLAS (each 8-row weight block is read from
# memory once and from cache for every further row; past 32 rows the GEMM of the BLAS wins).
# Measured with benchmarks/cpu_linear.py; RESULTS.md has the table.
MAX_ROWS = 32
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_fn = None          # the ctypes linear once built
_layer_fn = None    # the ctypes decoder layer
_lib = None         # the loaded library (cpu_quant.py binds its functions from it)
_tried = False      # built (or failed) already in this process
_lock = threading.Lock()


def cache_dir() -> Path:
    if os.environ.get("LLAMADIST_CACHE"):
        return Path(os.environ["LLAMADIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamadist"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and flags
    (a cache directory shared between hosts must not hand one CPU another's build)."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    sig += line
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        pass
    return sig


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _compile(out: Path) -> None:
    cc = _compiler()
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler '{cc}' on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0 and "-march=native" in cmd:  # a compiler without it
            cmd.remove("-march=native")
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[:500]}")
        os.replace(tmp, out)  # atomic: concurrent ranks building at once are safe
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path() -> Path:
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS)
                         + " ".join(FLAGS).encode()
                         + _compiler().encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_decode-{key}.so"


def _load():
    """Build (once per machine) and load the kernel; None where it cannot be had."""
    global _fn, _layer_fn, _lib, _tried
    with _lock:
        if _tried:
            return _fn
        _tried = True
        path = library_path()
        try:
            if not path.exists():
                log.info("building the CPU decode kernels: %s", path)
                _compile(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError) as e:
            log.warning("llamadist: the CPU decode kernels are unavailable (%s); CPU decode uses "
                        "PyTorch's matmul, about half as fast, and a GGUF's blocks are "
                        "dequantized at load, as with --weights float32 (several times their "
                        "memory), while --quantize's CPU blocks are unpacked at every call "
                        "(~30x slower). Install a C compiler (gcc) or set CC; "
                        "RuntimeConfig(cpu_kernels=False) silences this.", e)
            return None
        _lib = lib
        _layer_fn = lib.llamadist_decode_layer_f32
        _layer_fn.restype = None
        _layer_fn.argtypes = [ctypes.POINTER(LayerArgs)]
        fn = lib.llamadist_linear_f32
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
        _fn = fn
        return fn


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (building it now if needed), or None."""
    if not _tried:
        _load()
    return _lib


def available() -> bool:
    """True when the kernels are built and loaded (building them now if needed)."""
    return (_fn if _tried else _load()) is not None


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` sends this call to the kernel (without building it)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous()
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a few float32 rows on the CPU go to our kernel."""
    if not takes(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    fn = _fn if _tried else _load()
    if fn is None:
        return F.linear(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if bias is not None:
        bias = bias.contiguous()
    fn(x2.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
       y.data_ptr(), x2.shape[0], n, k, x2.stride(0), n, torch.get_num_threads())
    return y


class CpuLinear(nn.Linear):
    """nn.Linear whose few-row float32 CPU calls (decode) take ``linear``'s kernel; every
    other call is F.linear. Same parameters and state as nn.Linear, so a pass may swap a
    built module's class in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# The projection classes the C decoder layer reads weights from: plain (unsharded)
# linears. Tensor-parallel shards are other classes: their o/down need an all-reduce.
_PLAIN_LINEARS = (nn.Linear, CpuLinear)


# ---- the decoder layer -----------------------------------------------------
_P = ctypes.c_void_p


class WSeg(ctypes.Structure):
    """``wseg`` of cpu_decode.c: rows of one weight format within a fused weight."""
    _fields_ = [("w", _P), ("type", ctypes.c_int64), ("rows", ctypes.c_int64)]


class LayerArgs(ctypes.Structure):
    """``layer_args`` of cpu_decode.c, field for field."""
    _fields_ = [("batch", ctypes.c_int64), ("dim", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("inter", ctypes.c_int64), ("len", ctypes.c_int64), ("start", ctypes.c_int64),
                ("eps", ctypes.c_float), ("h", _P), ("norm1", _P), ("norm2", _P),
                ("w_qkv", _P), ("b_qkv", _P), ("w_o", _P), ("b_o", _P), ("w_gu", _P),
                ("b_gu", _P), ("w_down", _P), ("b_down", _P), ("k_cache", _P), ("v_cache", _P),
                ("cache_b", ctypes.c_int64), ("cache_h", ctypes.c_int64),
                ("cache_t", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("block_table", _P), ("bt_stride", ctypes.c_int64), ("lens", _P), ("cos", _P),
                ("sin", _P), ("cs_b", ctypes.c_int64), ("mask", _P), ("mask_b", ctypes.c_int64),
                ("scratch", _P), ("threads", ctypes.c_int64), ("t_qkv", ctypes.c_int64),
                ("t_o", ctypes.c_int64), ("t_gu", ctypes.c_int64), ("t_down", ctypes.c_int64),
                ("qscratch", _P), ("int8_x", ctypes.c_int64), ("seg_qkv", WSeg * 3),
                ("seg_gu", WSeg * 2), ("n_seg_qkv", ctypes.c_int64), ("n_seg_gu", ctypes.c_int64)]


def _ptr(t) -> int | None:
    """The data pointer of a tensor, of a QuantizedTensor's blocks, or None (also for a
    RowStack, whose parts go to the segments: ``_set_segments``)."""
    if hasattr(t, "parts"):
        return None
    if hasattr(t, "qtype"):
        return t.blocks.data_ptr()
    return None if t is None else t.data_ptr()


def _weight(module: nn.Module):
    """A linear's weight: its Parameter, or the QuantizedTensor in the Parameter's place
    (read without nn.Module.__getattr__, which costs a microsecond a call)."""
    w = module._parameters.get("weight")
    return module.__dict__.get("weight") if w is None else w


def _usable(t) -> bool:
    """A weight the C layer reads: float32 on the CPU, contiguous, or CPU GGUF blocks
    (a llamadist.kernels.quant.QuantizedTensor, known here by its ``qtype``, or a RowStack
    of such parts, by its ``parts``: that module imports this one)."""
    if hasattr(t, "parts"):
        return all(map(_usable, t.parts))
    if hasattr(t, "qtype"):
        return t.device.type == "cpu"
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def addresses(objs) -> tuple:
    """Where each of ``objs`` (tensors, QuantizedTensors, RowStacks, None) keeps its data:
    the data pointers a cached layer or step plan baked in. The same objects can move
    (``huge_pages.move``, ``tensor.data = ...``, ``model.to``), which no identity check
    sees: a cache made over ``objs`` holds while this is unchanged too."""
    out = []
    for t in objs:
        for part in t.parts if hasattr(t, "parts") else (t,):
            out.append(_ptr(part))
    return tuple(out)


def _layer_weights(layer) -> tuple | None:
    """(weights kept alive, LayerArgs with the weight fields set) for a layer whose
    projections are fused plain Linears on the CPU with float32 or quantized (GGUF
    block) weights (not tensor-parallel shards, whose o/down need an all-reduce); None
    otherwise. Cached on the layer and rebuilt when any of its weights is replaced, or
    moved in memory (looked at only after ``weight_version`` moved)."""
    # This runs 30 times a step: submodules read from _modules, not through nn.Module's
    # __getattr__ (a microsecond each)
    sub = layer._modules
    attn, mlp = sub["self_attn"], sub.get("mlp")
    if mlp is None:  # a mixture-of-experts layer: its own forward (experts as CpuLinear)
        return None
    am, mm = attn._modules, mlp._modules  # unfused projections: no qkv_proj there (None)
    mods = (am.get("qkv_proj"), am.get("o_proj"), mm.get("gate_up_proj"), mm.get("down_proj"))
    if any(type(m) not in _PLAIN_LINEARS for m in mods):
        return None
    norms = (sub["input_layernorm"], sub["post_attention_layernorm"])
    tensors = (_weight(mods[0]), mods[0]._parameters.get("bias"), _weight(mods[1]),
               mods[1]._parameters.get("bias"), _weight(mods[2]), mods[2]._parameters.get("bias"),
               _weight(mods[3]), mods[3]._parameters.get("bias"),
               norms[0]._parameters["weight"], norms[1]._parameters["weight"])
    # cached: ((tensors, args), the weight_version at the last look, the addresses then)
    cached = layer.__dict__.get("_cpu_decode")
    if cached is not None and all(map(operator.is_, cached[0][0], tensors)):
        now = weight_version.current()
        if cached[1] == now:
            return cached[0]
        if addresses(tensors) == cached[2]:
            layer.__dict__["_cpu_decode"] = (cached[0], now, cached[2])
            return cached[0]
    if any(t is not None and not _usable(t) for t in tensors):
        return None
    if norms[0].eps != norms[1].eps:
        return None
    q, kv, _ = attn.qkv_split
    hd = attn.head_dim
    a = LayerArgs(dim=norms[0].weight.shape[0], heads=q // hd, kv_heads=kv // hd, head_dim=hd,
                  inter=mlp.down_proj.weight.shape[1], eps=norms[0].eps)
    (a.w_qkv, a.b_qkv, a.w_o, a.b_o, a.w_gu, a.b_gu, a.w_down, a.b_down, a.norm1,
     a.norm2) = (_ptr(t) for t in tensors)
    a.t_qkv, a.t_o, a.t_gu, a.t_down = (getattr(t, "qtype", 0) for t in tensors[0:8:2])
    if not (_set_segments(a.seg_qkv, tensors[0], 3, "n_seg_qkv", a)
            and _set_segments(a.seg_gu, tensors[4], 2, "n_seg_gu", a)):
        return None
    entry = (tensors, a)
    layer.__dict__["_cpu_decode"] = (entry, weight_version.current(), addresses(tensors))
    return entry


def _set_segments(segs, w, most: int, count: str, a: LayerArgs) -> bool:
    """Fill a fused weight's segments from a RowStack's parts (nothing for a plain weight);
    False if it has more parts than the C layer takes."""
    parts = getattr(w, "parts", None)
    if parts is None:
        return True
    if len(parts) > most:
        return False
    for seg, part in zip(segs, parts):
        seg.w, seg.type, seg.rows = _ptr(part), getattr(part, "qtype", 0), part.shape[0]
    setattr(a, count, len(parts))
    return True


def qscratch_bytes(a: LayerArgs) -> int:
    """Bytes of quantized activations the C layer needs (0 with float32 weights): per
    thread, rows of the widest linear input (dim, attention output or intermediate)."""
    if not (a.t_qkv or a.t_o or a.t_gu or a.t_down or a.n_seg_qkv or a.n_seg_gu):
        return 0
    k = max(a.dim, a.heads * a.head_dim, a.inter)
    # int8 x, then a scale and a sum per 32, 64-byte aligned (cpu_quant.c), per thread
    return a.threads * ((a.batch * k + 2 * a.batch * (k // 32) * 4 + 63) // 64 * 64)


def scratch_floats(a: LayerArgs) -> int:
    """Floats of scratch the C layer uses: q|k|v, attention output, gate|up and the
    attention probabilities, shared; then per thread its normed input and its MLP
    activation (each thread computes them itself, cpu_decode.c)."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    private = (a.batch * (a.dim + a.inter) + 15) // 16 * 16
    return (a.batch * (q + 2 * kv + q + 2 * a.inter + a.heads * a.len)
            + a.threads * private)


def decode_layer(layer, h: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, cache, start, mask: torch.Tensor | None):
    """``DecoderLayer.forward_deferred`` for one new token per sequence, in one C call
    where it applies (float32 on the CPU, fused projections, and either an int start
    with a bool or no mask over a static cache, or a paged cache: see ``_paged_args``);
    anywhere else the layer's own forward. Returns (h, None): no residual is left
    pending. The cache gets this token's K and V at slot ``start`` (static) or at each
    row's slot (paged), as the cache's own write would put them."""
    if pending is not None:
        h = h + pending
    fast = (h.dim() == 3 and h.shape[1] == 1 and h.dtype == torch.float32
            and h.device.type == "cpu" and available())
    found = _layer_weights(layer) if fast else None
    if found is not None:
        paged = hasattr(cache, "int32_tables")
        keep = (_paged_args(found[1], h, cache, mask) if paged
                else _static_args(found[1], h, cache, start, mask))
    if found is None or keep is None:
        return layer.forward_deferred(h, None, cos, sin, cache, start, mask)
    a, kept = keep
    out = h.clone(memory_format=torch.contiguous_format)  # the caller's h stays as it was
    cos = cos.reshape(-1, a.head_dim).contiguous()
    sin = sin.reshape(-1, a.head_dim).contiguous()
    a.batch = h.shape[0]
    a.h, a.cos, a.sin = out.data_ptr(), cos.data_ptr(), sin.data_ptr()
    a.cs_b = a.head_dim if cos.shape[0] > 1 else 0
    a.threads = torch.get_num_threads()  # before the scratch: a share per thread
    a.scratch = _scratch("f", scratch_floats(a), torch.float32).data_ptr()
    a.qscratch = _scratch("q", qscratch_bytes(a), torch.uint8).data_ptr()
    a.int8_x = any(getattr(t, "int8_x", False) for t in found[0][0:8:2])  # set by a pass
    _layer_fn(ctypes.byref(a))
    return out, None


_scratch_of = threading.local()  # per thread: the C layer's scratch, reused across calls


def _scratch(kind: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """At least ``n`` elements of scratch for this thread's C layer calls (each call is done
    with it when it returns), grown when a call needs more."""
    buf = getattr(_scratch_of, kind, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype)
        setattr(_scratch_of, kind, buf)
    return buf


def _cache_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    return (k.dtype == torch.float32 and k.device.type == "cpu" and k.stride(-1) == 1
            and v.stride() == k.stride() and v.dtype == k.dtype)


def _static_args(proto: LayerArgs, h: torch.Tensor, cache, start,
                 mask: torch.Tensor | None) -> tuple[LayerArgs, tuple] | None:
    """LayerArgs over a static cache (cache.k/v (B, H_kv, S, D), slots D apart) for the
    token at slot ``start`` (an int); None where the C layer does not apply."""
    b, length = h.shape[0], (start + 1 if isinstance(start, int) else 0)
    k, v = cache.k, cache.v
    if not (isinstance(start, int) and b <= k.shape[0] and length <= k.shape[2]
            and _cache_ok(k, v) and k.stride(2) == k.shape[3]
            and (mask is None or (mask.dtype == torch.bool and mask.shape[-1] == length
                                  and mask.stride(-1) == 1))):
        return None
    a = LayerArgs.from_buffer_copy(proto)
    a.len, a.start = length, start
    a.k_cache, a.v_cache = k.data_ptr(), v.data_ptr()
    a.cache_b, a.cache_h, a.cache_t = k.stride(0), k.stride(1), k.stride(2)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], length)
        a.mask, a.mask_b = mask.data_ptr(), (mask.stride(0) if mask.shape[0] > 1 else 0)
    return a, (mask,)


def _paged_args(proto: LayerArgs, h: torch.Tensor, cache,
                mask: torch.Tensor | None) -> tuple[LayerArgs, tuple] | None:
    """LayerArgs over a paged cache: cache.k/v (blocks, H_kv, block_size, D) and
    ``cache.int32_tables()`` -> (block tables (B, MB) int32, lengths (B,) int32 with the
    new token, the longest length), row b of h being sequence b; None where the C layer
    does not apply (a mask, rows that are not the cache's sequences)."""
    k, v = cache.k, cache.v
    tables, lens, longest = cache.int32_tables()
    if not (mask is None and _cache_ok(k, v)
            and tables.shape[0] == h.shape[0] == lens.shape[0]
            and tables.is_contiguous() and lens.is_contiguous()):
        return None
    a = LayerArgs.from_buffer_copy(proto)
    a.len = longest
    a.k_cache, a.v_cache = k.data_ptr(), v.data_ptr()
    a.cache_b, a.cache_h, a.cache_t = k.stride(0), k.stride(1), k.stride(2)
    a.block_size = k.shape[2]
    a.block_table, a.bt_stride, a.lens = tables.data_ptr(), tables.stride(0), lens.data_ptr()
    return a, (tables, lens)
