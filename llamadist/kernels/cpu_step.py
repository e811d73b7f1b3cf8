"""A stage's whole decode step in one C call: every decoder layer, then the final RMSNorm
and the head's GEMV when the stage has them (``llamadist_decode_step_f32`` of
cpu_decode.c), for one new token per sequence on the CPU.

The per-layer path (``cpu_decode.decode_layer``, one C call per layer) spends 14-50 us of
Python before each layer (finding its weights, filling its arguments) and runs the head
as a separate call: on SmolLM2-135M (30 layers) about 3.9 ms of Python in a 9.8 ms step
(benchmarks/RESULTS.md). Here the layers' arguments are built once into a ``StepPlan``
(a C array of ``cpu_decode.LayerArgs``, one per layer, with the cache tensors and strides
of each cache the stage steps over) and cached on the model; a step checks the plan still
describes the model, fills a dozen fields of ``StepArgs`` and calls C once. The check is
O(1) while ``weight_version`` has not moved since the plan was last checked (a module,
parameter or buffer registered anywhere, a new block weight, a changed ``int8_x``, the
loader's and ``huge_pages``' writes move it); when it has, one pass over a flat tuple of
(dict, key, object) triples and the data pointers the plan baked in (a weight or module
replaced, or a weight moved in memory, since makes a new plan). The C code runs all of it
in one OpenMP parallel region, as the per-layer path's phases (five a layer,
cpu_decode.c) and nothing more: a layer's first phase waits for the items of the one
before it, the layer before's last.

``decode_step`` returns None wherever it does not apply (a prefill, a layer the C layer
does not take, a mixture-of-experts or tensor-parallel stage, activations not float32,
a paged step that is not decode-only): the caller then runs the model's own forward,
whose layers still take the per-layer C path where they can. The math is the per-layer
path's, operation for operation, so a step gives the same logits to float rounding (the
head's dot products are summed in another order than PyTorch's). The head in C serves up
to ``cpu_decode.MAX_ROWS`` rows (beyond, the final norm and the head run in PyTorch,
whose GEMM is the better tool there). This module knows nothing of the model's classes;
like ``cpu_decode`` it reads the modules by their attribute names, and the runtime's
kernel pass decides when it serves (llamadist.runtime.kernel_passes.decode_step_fn).
"""

from __future__ import annotations

import ctypes
import operator
import threading

import torch
from torch import nn

from llamadist.kernels import cpu_decode, weight_version
from llamadist.kernels.cpu_decode import LayerArgs

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class StepArgs(ctypes.Structure):
    """``step_args`` of cpu_decode.c, field for field."""
    _fields_ = [("n_layers", _I64), ("layers", _P), ("batch", _I64), ("len", _I64),
                ("start", _I64), ("h", _P), ("block_table", _P), ("bt_stride", _I64),
                ("lens", _P), ("cos", _P), ("sin", _P), ("cs_b", _I64), ("mask", _P),
                ("mask_b", _I64), ("scratch", _P), ("qscratch", _P), ("threads", _I64),
                ("norm", _P), ("norm_eps", ctypes.c_float), ("w_head", _P), ("b_head", _P),
                ("t_head", _I64), ("vocab", _I64), ("int8_head", _I64), ("logits", _P),
                ("embed", _P), ("t_embed", _I64), ("embed_rows", _I64), ("tokens", _P)]


_step_fn = None
_bind_lock = threading.Lock()
MAX_CACHES = 8  # caches (static lanes, paged caches) a plan keeps layer arrays for


def _bound():
    """The C step function with its signature set (None: no kernels here)."""
    global _step_fn
    if _step_fn is None:
        lib = cpu_decode.library()
        if lib is None:
            return None
        with _bind_lock:
            fn = lib.llamadist_decode_step_f32
            fn.restype = ctypes.c_int  # -1: a token out of the embedding's range
            fn.argtypes = [ctypes.POINTER(StepArgs)]
            _step_fn = fn
    return _step_fn


class StepPlan:
    """What a stage's decode step passes to C and what it checks first: the layers'
    prototypes (weights, shapes), the head's fields, and per cache a C array of the
    prototypes with that cache's tensors filled in.

    ``checks`` is (dicts, keys, objects): the plan holds while ``d.get(k) is o`` for
    every triple (modules, weights, biases and norms in the places the plan read them
    from); ``quantized`` the quantized weights whose ``int8_x`` flags (``flags``) the
    plan baked in; ``version`` the ``weight_version`` at which all of them last held."""

    def __init__(self, protos: list[LayerArgs], layer_ids: list[int], keep: list,
                 checks: tuple, quantized: list, head: dict | None,
                 embed: dict | None = None, version: int = -1):
        self.version = version  # -1: never checked (the first holds() checks fully)
        self.protos = protos
        self.layer_ids = layer_ids  # the global index of each prototype's layer
        self.keep = keep  # the tensors the pointers point into
        self.checks = checks
        self.quantized = quantized
        self.flags = self.int8_flags()
        self.head = head  # StepArgs head fields, or None: the stage has no head
        self.embed = embed  # StepArgs embedding fields, or None: Python embeds (or no embedding)
        self.caches: dict[int, tuple] = {}  # id(cache) -> (cache, layers array, paged)
        self.scratch_sizes: dict[tuple, tuple[int, int]] = {}  # see _scratch
        self.addresses = self.kept_addresses()
        # one prototype per distinct layer shape: the scratch is sized by the widest
        self.shapes = list({(a.dim, a.heads, a.kv_heads, a.head_dim, a.inter,
                             cpu_decode.qscratch_bytes(a) > 0): a for a in protos}.values())

    def int8_flags(self) -> tuple:
        return tuple(map(_INT8_X, self.quantized))  # every quantized weight has int8_x

    def holds(self) -> bool:
        """True while the model still has every object the plan was read from, at the
        same addresses. O(1) while ``weight_version`` stands where it stood at the last
        full check."""
        now = weight_version.current()
        if now == self.version:
            return True
        if not self.holds_fully():
            return False
        self.version = now  # read before the check: a change during it is seen next time
        return True

    def holds_fully(self) -> bool:
        """The exact check: every (dict, key, object) triple, every int8_x flag, and every
        baked pointer (the same weights can move in memory: huge_pages.move)."""
        dicts, keys, objs = self.checks
        return (all(map(operator.is_, map(dict.get, dicts, keys), objs))
                and self.int8_flags() == self.flags
                and self.kept_addresses() == self.addresses)

    def kept_addresses(self) -> tuple:
        """The data pointers of every weight the plan's C arguments point into."""
        kept = [t for tensors in self.keep for t in tensors]
        kept += list(self.head["keep"]) if self.head is not None else []
        kept += [self.embed["keep"]] if self.embed is not None else []
        return cpu_decode.addresses(kept)

    def layers_for(self, store, cache, paged: bool) -> tuple | None:
        """(the C array of layer arguments over ``cache``, the shape of a layer's K) made
        on first use for ``store`` (the object that owns the cache's tensors: a static
        KVCache, or the paged cache under a step's view), or None where the C layer
        cannot read that cache."""
        entry = self.caches.get(id(store))
        if entry is not None and entry[0] is store:
            return entry[1], entry[3]
        layers = (LayerArgs * len(self.protos))()
        kept = []
        for i, proto in enumerate(self.protos):
            lc = cache.layer(self.layer_ids[i])
            k, v = lc.k, lc.v
            if not (cpu_decode._cache_ok(k, v) and (paged or k.stride(2) == k.shape[3])):
                return None
            a = layers[i]
            ctypes.memmove(ctypes.addressof(a), ctypes.addressof(proto), ctypes.sizeof(a))
            a.k_cache, a.v_cache = k.data_ptr(), v.data_ptr()
            a.cache_b, a.cache_h, a.cache_t = k.stride(0), k.stride(1), k.stride(2)
            a.block_size = k.shape[2] if paged else 0
            kept.append((k, v))
        if len(self.caches) >= MAX_CACHES:  # a stage re-made its caches: forget the oldest
            self.caches.pop(next(iter(self.caches)))
        self.caches[id(store)] = (store, layers, kept, k.shape)
        return layers, k.shape


_INT8_X = operator.attrgetter("int8_x")


def _int8_of(w) -> bool:
    return bool(getattr(w, "int8_x", False))


def _weight_place(module: nn.Module) -> tuple[dict, object]:
    """(the dict ``cpu_decode._weight`` finds the module's weight in, the weight)."""
    w = module._parameters.get("weight")
    if w is not None:
        return module._parameters, w
    return module.__dict__, module.__dict__.get("weight")


def _is_quantized(w) -> bool:
    return hasattr(w, "qtype") or hasattr(w, "parts")


def _layer_checks(layer: nn.Module, out: list) -> None:
    """Append the (dict, key, object) triples a layer's prototype was read from."""
    sub = layer._modules
    attn, mlp = sub["self_attn"], sub["mlp"]
    out += [(sub, "self_attn", attn), (sub, "mlp", mlp)]
    for parent, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"),
                         (mlp, "down_proj")):
        mod = parent._modules[name]
        place, w = _weight_place(mod)
        out += [(parent._modules, name, mod), (place, "weight", w),
                (mod._parameters, "bias", mod._parameters.get("bias"))]
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = sub[name]
        out += [(sub, name, norm), (norm._parameters, "weight", norm._parameters["weight"]),
                (norm.__dict__, "eps", norm.__dict__.get("eps"))]


def _head_fields(model: nn.Module, checks: list, quantized: list) -> dict | None:
    """StepArgs' head fields of a stage whose final norm and head the C step takes
    (float32 norm, a plain linear over float32 or GGUF block weights); None otherwise."""
    top, inner = model._modules, model._modules["model"]._modules
    head, norm = top.get("lm_head"), inner.get("norm")
    if type(head) not in cpu_decode._PLAIN_LINEARS or norm is None:
        return None
    place, w = _weight_place(head)
    bias, nw = head._parameters.get("bias"), norm._parameters.get("weight")
    if (w is None or hasattr(w, "parts") or not cpu_decode._usable(w)
            or nw is None or not cpu_decode._usable(nw)
            or (bias is not None and not cpu_decode._usable(bias))):
        return None
    checks += [(top, "lm_head", head), (place, "weight", w),
               (head._parameters, "bias", bias), (inner, "norm", norm),
               (norm._parameters, "weight", nw), (norm.__dict__, "eps", norm.__dict__.get("eps"))]
    if _is_quantized(w):
        quantized.append(w)
    return dict(norm=nw.data_ptr(), norm_eps=norm.eps, w_head=cpu_decode._ptr(w),
                b_head=None if bias is None else bias.data_ptr(),
                t_head=getattr(w, "qtype", 0), vocab=w.shape[0], int8_head=_int8_of(w),
                keep=(w, bias, nw))


def _embed_fields(model: nn.Module, checks: list) -> dict | None:
    """StepArgs' embedding fields of a first stage whose token embedding the C step reads
    itself (a plain nn.Embedding over float32 or GGUF weights whose rows come out float32:
    its forward, F.embedding or quant.embedding, is then a row copy or a row's
    dequantization by the same C code); None: the step calls the module."""
    inner = model._modules["model"]._modules
    emb = inner.get("embed_tokens")
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        return None
    place, w = _weight_place(emb)
    if (w is None or hasattr(w, "parts") or not cpu_decode._usable(w)
            or getattr(w, "act_dtype", torch.float32) != torch.float32
            or len(w.shape) != 2):
        return None
    checks += [(inner, "embed_tokens", emb), (place, "weight", w),
               (emb.__dict__, "max_norm", emb.__dict__.get("max_norm"))]
    return dict(embed=cpu_decode._ptr(w), t_embed=getattr(w, "qtype", 0),
                embed_rows=w.shape[0], dim=w.shape[1], keep=w)


def build_plan(model: nn.Module) -> StepPlan | None:
    """The StepPlan of a built model (a stage), or None where a layer is not one the C
    layer takes (``cpu_decode._layer_weights``) or the stage has no layers."""
    weight_version.watch_modules()
    version = weight_version.current()  # before reading the model: a change during it is seen
    inner = model._modules["model"]
    layers = inner._modules["layers"]
    if not len(layers):
        return None
    checks: list = [(inner._modules, "layers", layers)]
    protos, keep, quantized, ids = [], [], [], []
    for idx, layer in layers._modules.items():
        if layer._modules.get("mlp") is None:
            return None
        found = cpu_decode._layer_weights(layer)
        if found is None:
            return None
        tensors, proto = found
        a = LayerArgs.from_buffer_copy(proto)
        a.int8_x = any(getattr(t, "int8_x", False) for t in tensors[0:8:2])
        protos.append(a)
        keep.append(tensors)
        ids.append(int(idx))
        checks.append((layers._modules, idx, layer))
        _layer_checks(layer, checks)
        quantized += [t for t in tensors[0:8:2] if _is_quantized(t)]
    head = _head_fields(model, checks, quantized) if model.has_head else None
    if model.has_head and head is None:
        return None
    embed = _embed_fields(model, checks) if model.has_embed else None
    if embed is not None and embed["dim"] != protos[0].dim:
        embed = None
    return StepPlan(protos, ids, keep, tuple(map(tuple, zip(*checks))), quantized, head, embed,
                    version)


def invalidate() -> None:
    """Make every plan check its model fully before its next step: for code that changes
    a model that has run a CPU decode step by a path ``weight_version`` does not see (a
    plain attribute set over a weight or an ``eps``, a ``del``, a write into a module's
    dicts, ``tensor.data = ...``)."""
    weight_version.changed()


def plan_for(model: nn.Module) -> StepPlan | None:
    """The model's StepPlan, made on first use and again whenever it no longer holds;
    None (also remembered until the model changes) where the C step does not apply."""
    cached = model.__dict__.get("_cpu_step")
    if cached is not None:
        plan, layers = cached
        if plan is None:
            if layers == tuple(model._modules["model"]._modules["layers"]._modules.values()):
                return None  # same layers as when it did not apply: not rebuilt each step
        elif plan.holds():
            return plan
    plan = build_plan(model)
    model.__dict__["_cpu_step"] = (
        plan, tuple(model._modules["model"]._modules["layers"]._modules.values()))
    return plan


SCRATCH_SPAN = 256  # a step's scratch is sized for its length rounded up to this


def _scratch(plan: StepPlan, batch: int, length: int, threads: int) -> tuple[int, int]:
    """Pointers to this thread's scratch (floats, quantized activations) for a step. The
    sizes grow with the length (attention probabilities): computed once per span of
    SCRATCH_SPAN positions, for the span's end, and kept on the plan."""
    key = (batch, threads, -(-length // SCRATCH_SPAN))
    sizes = plan.scratch_sizes.get(key)
    if sizes is None:
        sizes = plan.scratch_sizes[key] = _scratch_sizes(plan, batch,
                                                         key[2] * SCRATCH_SPAN, threads)
    return (cpu_decode._scratch("f", sizes[0], torch.float32).data_ptr(),
            cpu_decode._scratch("q", sizes[1], torch.uint8).data_ptr())


def _scratch_sizes(plan: StepPlan, batch: int, length: int, threads: int) -> tuple[int, int]:
    """(floats, bytes of quantized activations) a step of ``batch`` rows over ``length``
    positions needs on ``threads`` threads."""
    floats = qbytes = 0
    for proto in plan.shapes:
        a = LayerArgs.from_buffer_copy(proto)
        a.batch, a.len, a.threads = batch, length, threads
        floats = max(floats, cpu_decode.scratch_floats(a))
        qbytes = max(qbytes, cpu_decode.qscratch_bytes(a))
    if plan.head is not None and plan.head["t_head"] and qbytes == 0:
        # a quantized head after float32 layers: its x (int8, or sums per 32) per thread
        k = plan.shapes[0].dim
        qbytes = threads * ((batch * k + 2 * batch * (k // 32) * 4 + 63) // 64 * 64)
    return floats, qbytes


def _rope_rows(rope, positions: torch.Tensor, hd: int) -> tuple:
    """(cos, sin, row stride, what the pointers point into) of StepArgs: the rows of
    ``rope.lookup(positions)``. One position points into the table itself (a
    RotaryTable's float32 ``cos``/``sin`` (P, hd)), sparing lookup's indexing calls;
    else the rows lookup gathers."""
    cos, sin = rope.cos, rope.sin
    if (positions.numel() == 1 and cos.dtype == sin.dtype == torch.float32
            and cos.device.type == "cpu" and cos.dim() == 2 and cos.shape[1] == hd
            and cos.is_contiguous() and sin.is_contiguous() and sin.shape == cos.shape):
        p = int(positions.reshape(()))
        if 0 <= p < cos.shape[0]:
            return cos.data_ptr() + p * hd * 4, sin.data_ptr() + p * hd * 4, 0, rope
    cos, sin = rope.lookup(positions, torch.float32)
    cos, sin = cos.reshape(-1, hd).contiguous(), sin.reshape(-1, hd).contiguous()
    return cos.data_ptr(), sin.data_ptr(), (hd if cos.shape[0] > 1 else 0), (cos, sin)


def decode_step(model: nn.Module, x: torch.Tensor, positions: torch.Tensor, cache,
                start, mask: torch.Tensor | None, logits: str = "last") -> torch.Tensor | None:
    """``model(x, positions, cache, start, mask, logits, cpu_decode.decode_layer)`` for a
    decode step (one token per row: x (B, 1) ids on the first stage, else (B, 1, D)
    hidden), in one C call; None where it does not apply (the caller runs the model).

    ``cache``: a static KVCache (``start`` the new token's slot, an int; ``mask`` None or
    bool (B, 1, 1, start + 1)) or a paged step (``cache.cache`` the paged cache, every
    row one sequence's one new token, no mask). Returns the stage's hidden state
    (B, 1, D), or on a stage with the head and ``logits`` "last" the logits: (B, 1, V)
    over a static cache, (B, V) over a paged one (the paged forward's logits_index rows,
    which for a decode-only step are the rows in order)."""
    if x.shape[1] != 1 or not cpu_decode.available():
        return None
    plan = plan_for(model)
    if plan is None or _bound() is None:
        return None
    paged = hasattr(cache, "batch")
    found = plan.layers_for(cache.cache if paged else cache, cache, paged)
    if found is None:
        return None
    layers, kshape = found
    s = StepArgs(n_layers=len(plan.protos), layers=ctypes.addressof(layers))
    b = x.shape[0]
    if paged:
        if mask is not None:
            return None
        tables, lens, length = cache.layer(plan.layer_ids[0]).int32_tables()
        if not (tables.shape[0] == b == lens.shape[0] and tables.is_contiguous()
                and lens.is_contiguous()):
            return None
        s.block_table, s.bt_stride, s.lens = tables.data_ptr(), tables.stride(0), lens.data_ptr()
    else:
        if not isinstance(start, int):
            return None
        length = start + 1
        if not (b <= kshape[0] and length <= kshape[2]):
            return None  # the fallback raises the cache's own error
        if mask is not None:
            if not (mask.dtype == torch.bool and mask.shape[-1] == length
                    and mask.stride(-1) == 1):
                return None
            mask = mask.reshape(mask.shape[0], length)
            s.mask, s.mask_b = mask.data_ptr(), (mask.stride(0) if mask.shape[0] > 1 else 0)
        s.start = start
    emb = plan.embed if model.has_embed and x.dtype == torch.int64 else None
    if emb is not None:  # C copies the rows (StepArgs.embed)
        tokens = x.reshape(b).contiguous()
        h = torch.empty(b, 1, emb["dim"], dtype=torch.float32)
        s.embed, s.t_embed, s.embed_rows = emb["embed"], emb["t_embed"], emb["embed_rows"]
        s.tokens = tokens.data_ptr()
    elif model.has_embed:
        h = model.model.embed_tokens(x)  # (B, 1, D), ours to write
        if h.dtype != torch.float32 or not h.is_contiguous():
            return None
    else:
        if x.dtype != torch.float32 or x.dim() != 3:
            return None
        h = x.clone(memory_format=torch.contiguous_format)  # the caller's x stays as it was
    hd = plan.protos[0].head_dim
    s.cos, s.sin, s.cs_b, rows = _rope_rows(model.rope, positions, hd)  # rows: alive till C returns
    threads = torch.get_num_threads()
    s.batch, s.len, s.h, s.threads = b, length, h.data_ptr(), threads
    s.scratch, s.qscratch = _scratch(plan, b, length, threads)
    out = h
    head = plan.head if logits != "none" and b <= cpu_decode.MAX_ROWS else None
    if head is not None:
        out = torch.empty(b, head["vocab"], dtype=torch.float32)
        s.norm, s.norm_eps, s.w_head, s.b_head = (head["norm"], head["norm_eps"],
                                                  head["w_head"], head["b_head"])
        s.t_head, s.vocab, s.int8_head = head["t_head"], head["vocab"], head["int8_head"]
        s.logits = out.data_ptr()
    if _step_fn(ctypes.byref(s)):
        return None  # a token out of the embedding's range: the model's forward says so
    if not model.has_head or logits == "none":
        return h
    if head is None:  # many rows: the final norm and the head in PyTorch
        out = model.lm_head(model.model.norm(h)).view(b, -1)
    return out if paged else out.view(b, 1, -1)
