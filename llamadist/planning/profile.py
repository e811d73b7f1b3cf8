"""Per-layer cost of a Llama model, computed from its config alone (no weights, no device).

One row per piece a pipeline stage can own: ``embed``, ``layers.{i}`` for every decoder layer,
and ``head`` (final norm + lm_head). FLOP counts use 2 FLOPs per multiply-add; norms, RoPE,
SiLU and softmax are ignored (they are memory-bound and small next to the matmuls).

Mixture-of-experts layers (Mixtral) hold every expert (``params``, ``weight_bytes``: what
memory budgets count) but a token runs only the router and ``k`` of the ``E`` experts
(``active_params``, ``active_weight_bytes``, and the FLOPs per token). A decode step of B
tokens reads the experts any of them was routed to: ``expected_experts`` of them under
uniform routing (``layer_read_bytes``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

from llamadist.config import (INT4_GROUP, QUANTIZE_HEAD_ALONE, ConfigError, ModelConfig,
                              RuntimeConfig, quantize_group)
from llamadist.planning.units import PlanningError, format_bytes, format_flops

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp32": "float32", "float": "float32"}
# A planning default that keeps KV estimates sane for 128k-context configs (Llama 3.1).


def canonical_dtype(dtype: str) -> str:
    name = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise PlanningError(
            f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)} "
            f"(or {', '.join(_DTYPE_ALIASES)})")
    return name


@dataclass(frozen=True)
class LayerCost:
    """Cost of one row. ``kind`` is "embed", "decoder" or "head"; ``index`` is the global
    decoder-layer index (None for embed/head). ``tied`` marks a head whose lm_head shares the
    embedding tensor: it is still counted, because a last stage that is not the first stage
    must hold its own copy."""

    name: str
    kind: str
    index: int | None
    params: int
    weight_bytes: int
    matmul_flops_per_token: int      # 2 * (weights used in matmuls)
    attn_flops_per_ctx_token: int    # QK^T + AV per query token per cached token
    decode_flops_per_token: int      # at the profile's seq_len of context
    prefill_flops: int               # for one prompt of seq_len tokens
    kv_bytes_per_token: int          # K and V for one token of one sequence
    tied: bool = False
    # Mixture of experts: the layer's E experts (k run per token) and their bytes, all E.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_bytes: int = 0
    # What one token uses (the router and k experts); None: everything (a dense row).
    active_params: int | None = None
    active_weight_bytes: int | None = None
    # (out, in) of each linear --quantize quantizes (q, k, v, o; gate, up, down when dense)
    linear_shapes: tuple[tuple[int, int], ...] = ()
    # --weights native of a quantized checkpoint: per device kind, (kind, weight bytes,
    # expert bytes) as a run on that kind holds the row (native_profile); () = the dtype's
    stored: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.active_params is None:
            object.__setattr__(self, "active_params", self.params)
        if self.active_weight_bytes is None:
            object.__setattr__(self, "active_weight_bytes", self.weight_bytes)
        # JSON gives lists: tuples, so a profile equals its round trip
        object.__setattr__(self, "linear_shapes", tuple(tuple(x) for x in self.linear_shapes))
        object.__setattr__(self, "stored", tuple(tuple(x) for x in self.stored))

    def decode_flops(self, context: int) -> int:
        """FLOPs for one new token attending to ``context`` cached tokens."""
        return self.matmul_flops_per_token + self.attn_flops_per_ctx_token * context


@dataclass(frozen=True)
class ModelProfile:
    model: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    bytes_per_param: int
    seq_len: int
    tie_word_embeddings: bool
    embed: LayerCost
    layers: tuple[LayerCost, ...]
    head: LayerCost

    @property
    def rows(self) -> tuple[LayerCost, ...]:
        return (self.embed, *self.layers, self.head)

    @property
    def tied_bytes(self) -> int:
        """Bytes shared by embed and head when tied (saved when one stage holds both)."""
        return self.embed.weight_bytes if self.tie_word_embeddings else 0

    @property
    def total_params(self) -> int:
        """Unique parameters (the tied matrix once), as Hugging Face counts them."""
        tied = self.embed.params if self.tie_word_embeddings else 0
        return sum(r.params for r in self.rows) - tied

    @property
    def total_weight_bytes(self) -> int:
        """Weight bytes on a single device (the tied matrix once)."""
        return sum(r.weight_bytes for r in self.rows) - self.tied_bytes

    @property
    def total_active_params(self) -> int:
        """Parameters one token uses (MoE: router and k experts per layer; the tied
        matrix once): Mixtral 8x7B's "12.9B active of 46.7B"."""
        tied = self.embed.params if self.tie_word_embeddings else 0
        return sum(r.active_params for r in self.rows) - tied

    @property
    def total_active_weight_bytes(self) -> int:
        return sum(r.active_weight_bytes for r in self.rows) - self.tied_bytes

    @property
    def has_stored(self) -> bool:
        """Some row is held in a checkpoint's own formats (native_profile), whose bytes
        depend on the device kind."""
        return any(r.stored for r in self.rows)

    @property
    def is_moe(self) -> bool:
        return any(r.num_experts for r in self.layers)

    @property
    def total_decode_flops_per_token(self) -> int:
        return sum(r.decode_flops_per_token for r in self.rows)

    @property
    def total_prefill_flops(self) -> int:
        return sum(r.prefill_flops for r in self.rows)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(r.kv_bytes_per_token for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        d["totals"] = {
            "params": self.total_params, "weight_bytes": self.total_weight_bytes,
            "active_params": self.total_active_params,
            "active_weight_bytes": self.total_active_weight_bytes,
            "decode_flops_per_token": self.total_decode_flops_per_token,
            "prefill_flops": self.total_prefill_flops,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelProfile":
        d = {k: v for k, v in d.items() if k != "totals"}
        d["embed"] = LayerCost(**d["embed"])
        d["head"] = LayerCost(**d["head"])
        d["layers"] = tuple(LayerCost(**r) for r in d["layers"])
        return cls(**d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ModelProfile":
        return cls.from_dict(json.loads(text))


def model_summary(config: ModelConfig) -> str:
    moe = (f" experts={config.num_experts} top{config.num_experts_per_tok}"
           if config.is_moe else "")
    return (f"{'mixtral' if config.is_moe else 'llama'} L={config.num_layers} "
            f"hidden={config.hidden_size} heads={config.num_heads}/{config.num_kv_heads} "
            f"ffn={config.intermediate_size}{moe} "
            f"vocab={config.vocab_size}{' tied' if config.tie_word_embeddings else ''}")


def _decoder_row(config: ModelConfig, i: int, nbytes: int, seq_len: int) -> LayerCost:
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    attn_w = d * q + 2 * d * kv + q * d                    # q, k, v, o projections
    expert_w = 3 * d * f                                   # gate, up, down (w1, w3, w2)
    e, k = config.num_experts, config.num_experts_per_tok
    biases = q + 2 * kv + d if config.attention_bias else 0
    if e:  # router (E, D) + E experts; a token runs the router and k experts
        ffn_w, active_ffn_w = d * e + e * expert_w, d * e + k * expert_w
    else:
        ffn_w = active_ffn_w = expert_w
        biases += 2 * f + d if config.mlp_bias else 0
    params = attn_w + ffn_w + biases + 2 * d               # + two RMSNorm weights
    active = params - ffn_w + active_ffn_w
    matmul = 2 * (attn_w + active_ffn_w)
    attn_ctx = 4 * config.num_heads * config.head_dim      # 2 for QK^T, 2 for AV
    # Causal prefill: token t attends to t+1 tokens -> sum = seq*(seq+1)/2 context tokens.
    prefill = matmul * seq_len + attn_ctx * seq_len * (seq_len + 1) // 2
    return LayerCost(
        name=f"layers.{i}", kind="decoder", index=i, params=params, weight_bytes=params * nbytes,
        matmul_flops_per_token=matmul, attn_flops_per_ctx_token=attn_ctx,
        decode_flops_per_token=matmul + attn_ctx * seq_len, prefill_flops=prefill,
        kv_bytes_per_token=2 * kv * nbytes, num_experts=e, experts_per_token=k,
        expert_bytes=e * expert_w * nbytes, active_params=active,
        active_weight_bytes=active * nbytes,
        linear_shapes=((q, d), (kv, d), (kv, d), (d, q)) + (() if e else ((f, d), (f, d), (d, f))))


def quantized_matrix_bytes(n: int, k: int, fmt: str, kind: str = "cuda") -> int:
    """Bytes of an (n, k) weight in ``fmt`` (--quantize) on a ``kind`` device, as the loader
    stores it (llamadist.kernels.wquant): on GPUs int8 and fp8 one byte a weight plus a
    float32 scale a row, int4 half a byte plus a float32 scale and offset per group (128,
    or int4-gN's); on the CPU GGUF blocks of 32, Q8_0 (34 bytes) and Q4_1 (20 bytes)."""
    fkind, group = quantize_group(fmt)
    if kind == "cpu":
        return n * -(-k // 32) * {"int8": 34, "int4": 20}[fkind]
    if fkind == "int4":
        return n * ((k + 1) // 2) + 8 * n * -(-k // (group or INT4_GROUP))
    return n * k + 4 * n


def held_row(row: LayerCost, kind: str) -> LayerCost:
    """``row`` as a ``--weights native`` run on a ``kind`` device holds it (its stored
    bytes there, native_profile), else ``row`` itself (the profile's dtype)."""
    for k, weights, experts in row.stored:
        if k == kind:
            saved, saved_experts = row.weight_bytes - weights, row.expert_bytes - experts
            per_token = (saved_experts * row.experts_per_token / row.num_experts
                         if row.num_experts else saved_experts)
            active = row.active_weight_bytes - (saved - saved_experts) - per_token
            return replace(row, weight_bytes=weights, expert_bytes=experts,
                           active_weight_bytes=int(active), stored=())
    return replace(row, stored=()) if row.stored else row


def layer_bytes(row: LayerCost, fmt: str | None, kind: str, nbytes: float) -> int:
    """A decoder row's weight bytes with its linears in ``fmt`` on a ``kind`` device (None:
    as the run holds them there: the checkpoint's own formats under --weights native,
    held_row, else the profile's dtype)."""
    if fmt is None or not row.linear_shapes:
        return held_row(row, kind).weight_bytes
    linear = sum(n * k for n, k in row.linear_shapes)
    packed = sum(quantized_matrix_bytes(n, k, fmt, kind) for n, k in row.linear_shapes)
    return int(row.weight_bytes - linear * nbytes + packed)


def quantized_profile(prof: ModelProfile, fmt: str | None,
                      kinds: Sequence[str] = ("cuda",), head: bool = False) -> ModelProfile:
    """``prof`` as a run on ``kinds`` holds it: every decoder row's linears in ``fmt``
    (None: as stored, held_row), the embedding and head as stored (``head``, --quantize-
    head: the head's matrix in ``fmt`` too, a tied one then its own copy beside the
    embedding's), each row's weight bytes the most of ``kinds`` (one format on devices of
    several kinds is planned by the larger footprint); ``prof`` itself when neither
    changes a byte. For the auto planner, which costs one profile for every device, and
    for each stage of CostModel.with_formats."""
    if fmt is not None and head:
        return head_in_format(quantized_profile(prof, fmt, kinds), fmt, kinds)
    if fmt is None and not prof.has_stored:
        return prof

    def held(r: LayerCost) -> LayerCost:   # the kind that holds the most of it
        return max((held_row(r, k) for k in kinds), key=lambda x: x.weight_bytes)

    rows = []
    for r in prof.layers:
        if fmt is None or not r.linear_shapes:
            rows.append(held(r))
            continue
        q = max(layer_bytes(r, fmt, k, prof.bytes_per_param) for k in kinds)
        saved = r.weight_bytes - q
        rows.append(replace(r, weight_bytes=q, active_weight_bytes=r.active_weight_bytes - saved,
                            stored=()))
    return replace(prof, embed=held(prof.embed), head=held(prof.head), layers=tuple(rows))


def head_in_format(prof: ModelProfile, fmt: str, kinds: Sequence[str]) -> ModelProfile:
    """``prof`` with the head's matrix in --quantize format ``fmt`` (--quantize-head), the
    most of ``kinds``; a tied head is then its own copy beside the embedding's."""
    h = prof.head
    matrix = h.matmul_flops_per_token // 2  # vocab x hidden (2 FLOPs a multiply-add)
    hidden = h.params - matrix              # the final norm's scales
    packed = max(quantized_matrix_bytes(matrix // hidden, hidden, fmt, k) for k in kinds)
    size = packed + int(hidden * prof.bytes_per_param)
    return replace(prof, tie_word_embeddings=False, head=replace(
        h, weight_bytes=size, active_weight_bytes=size, tied=False, stored=()))


def planned_head(prof: ModelProfile, quantize_head: bool,
                 formats: Sequence[str | None] | None = None, specs: Sequence = (),
                 chosen_later: bool = False) -> ModelProfile:
    """The profile a plan over ``specs`` (planning.devices.DeviceSpec, in stage order)
    costs under --quantize-head: the head, on the last stage, in that stage's format
    (``formats``, one a stage; unchanged without one); with ``chosen_later`` (--fit-bits:
    the formats are not chosen yet) a tied head counted as its own copy at its stored
    size, an upper bound of what the run loads. Refused when no stage has a format:
    nothing to quantize the head in."""
    if not quantize_head:
        return prof
    if chosen_later:
        return replace(prof, tie_word_embeddings=False, head=replace(prof.head, tied=False))
    if not specs:
        return prof
    if not any(formats or ()):
        raise ConfigError(QUANTIZE_HEAD_ALONE)
    fmt = formats[-1]
    return head_in_format(prof, fmt, [specs[-1].kind]) if fmt else prof


def native_profile(prof: ModelProfile,
                   held: Mapping[str, Mapping[str, tuple[int, int]]]) -> ModelProfile:
    """``prof`` with the bytes a ``--weights native`` run holds, per device kind: ``held``
    maps a kind to {tensor name: (weights, bytes held)} for the tensors kept out of the
    dtype (weights.loader.native_bytes); every other weight counts in the profile's dtype.
    Each row keeps its dtype bytes in ``weight_bytes`` (what --quantize formats are costed
    from) and gains ``stored``; a tied head's own copy counts as the embedding's."""
    nbytes = prof.bytes_per_param

    def row_of(name: str) -> str | None:
        if name == "model.embed_tokens.weight":
            return "embed"
        if name in ("lm_head.weight", "model.norm.weight"):
            return "head"
        if name.startswith("model.layers."):
            return "layers." + name.split(".")[2]
        return None

    out = {r.name: r for r in prof.rows}
    stored: dict[str, list[tuple[str, int, int]]] = {name: [] for name in out}
    for kind, tensors in held.items():
        saved = {name: [0, 0] for name in out}   # [all, of experts]
        for name, (count, size) in tensors.items():
            row = row_of(name)
            if row in saved:
                saved[row][0] += count * nbytes - size
                saved[row][1] += count * nbytes - size if ".experts." in name else 0
        emb = tensors.get("model.embed_tokens.weight")
        if prof.tie_word_embeddings and emb is not None and "lm_head.weight" not in tensors:
            saved["head"][0] += emb[0] * nbytes - emb[1]   # its own copy, in the same format
        for name, r in out.items():
            stored[name].append((kind, int(r.weight_bytes - saved[name][0]),
                                 int(r.expert_bytes - saved[name][1])))
    rows = {name: replace(r, stored=tuple(stored[name])) for name, r in out.items()}
    return replace(prof, embed=rows["embed"], head=rows["head"],
                   layers=tuple(rows[r.name] for r in prof.layers))


def profile(config: ModelConfig, dtype: str = "bfloat16", seq_len: int | None = None) -> ModelProfile:
    """Cost of every piece of ``config`` at ``dtype``; ``seq_len`` is the context used for the
    decode attention term and the prefill length (default: RuntimeConfig's KV length)."""
    dtype = canonical_dtype(dtype)
    nbytes = DTYPE_BYTES[dtype]
    if seq_len is None:
        seq_len = RuntimeConfig().seq_len_for(config.max_position_embeddings)
    if seq_len < 1:
        raise PlanningError(f"seq_len must be at least 1, got {seq_len}")
    v, d = config.vocab_size, config.hidden_size
    # The embedding is a gather: no FLOPs, and it reads one row per token.
    embed = LayerCost("embed", "embed", None, v * d, v * d * nbytes, 0, 0, 0, 0, 0)
    head_flops = 2 * v * d
    # Prefill only needs logits for the last prompt token, so the head costs one token.
    head = LayerCost("head", "head", None, v * d + d, (v * d + d) * nbytes, head_flops, 0,
                     head_flops, head_flops, 0, tied=config.tie_word_embeddings)
    layers = tuple(_decoder_row(config, i, nbytes, seq_len) for i in range(config.num_layers))
    return ModelProfile(
        model=model_summary(config), num_layers=config.num_layers, hidden_size=d, vocab_size=v,
        dtype=dtype, bytes_per_param=nbytes, seq_len=seq_len,
        tie_word_embeddings=config.tie_word_embeddings, embed=embed, layers=layers, head=head)


def format_profile_table(prof: ModelProfile) -> str:
    """Readable table: one line per row (identical consecutive decoder layers collapsed)."""
    hdr = (f"{'row':<20}{'params':>14}{'weights':>13}{'decode/token':>16}"
           f"{'prefill':>16}{'KV/token':>12}")
    lines = [f"model: {prof.model}", f"dtype: {prof.dtype}  seq_len: {prof.seq_len}", hdr,
             "-" * len(hdr)]

    def line(label: str, r: LayerCost, count: int = 1) -> str:
        return (f"{label:<20}{r.params * count:>14,}{format_bytes(r.weight_bytes * count):>13}"
                f"{format_flops(r.decode_flops_per_token * count):>16}"
                f"{format_flops(r.prefill_flops * count):>16}"
                f"{format_bytes(r.kv_bytes_per_token * count):>12}")

    lines.append(line("embed", prof.embed))
    i = 0
    while i < len(prof.layers):
        j = i
        while j + 1 < len(prof.layers) and _same_cost(prof.layers[j + 1], prof.layers[i]):
            j += 1
        label = f"layers.{i}" if i == j else f"layers.{i}-{j} (each)"
        lines.append(line(label, prof.layers[i]))
        i = j + 1
    lines.append(line("head (tied)" if prof.head.tied else "head", prof.head))
    lines.append("-" * len(hdr))
    if prof.is_moe:
        r = prof.layers[0]
        lines.append(
            f"{'active per token':<20}{prof.total_active_params:>14,}"
            f"{format_bytes(prof.total_active_weight_bytes):>13}   "
            f"(router + {r.experts_per_token} of {r.num_experts} experts per layer; decode "
            f"FLOPs count the active experts, weights every expert)")
    lines.append(
        f"{'total':<20}{prof.total_params:>14,}{format_bytes(prof.total_weight_bytes):>13}"
        f"{format_flops(prof.total_decode_flops_per_token):>16}"
        f"{format_flops(prof.total_prefill_flops):>16}{format_bytes(prof.kv_bytes_per_token):>12}")
    if prof.tie_word_embeddings:
        lines.append(f"note: embed and head share one matrix ({format_bytes(prof.tied_bytes)}); "
                     "a last stage on another device holds its own copy")
    return "\n".join(lines)


def _same_cost(a: LayerCost, b: LayerCost) -> bool:
    return (a.params, a.decode_flops_per_token, a.kv_bytes_per_token) == \
        (b.params, b.decode_flops_per_token, b.kv_bytes_per_token)


# ---- whole-model step costs (what a benchmark divides by its measured time) ----------------
def expected_experts(num_experts: int, k: int, tokens: int) -> float:
    """Experts a batch of ``tokens`` tokens touches, each routed to k of E distinct experts
    uniformly: E (1 - (1 - k / E)^tokens). 1 token: k; many tokens: all E."""
    if not num_experts:
        return 0.0
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


def layer_read_bytes(row: LayerCost, tokens: int) -> float:
    """Weight bytes a step of ``tokens`` tokens reads from a decoder row: everything but
    the experts, plus the experts routed to (``expected_experts``; dense rows: all)."""
    if not row.num_experts:
        return float(row.weight_bytes)
    per_expert = row.expert_bytes / row.num_experts
    touched = expected_experts(row.num_experts, row.experts_per_token, tokens)
    return row.weight_bytes - row.expert_bytes + touched * per_expert


def decode_step_bytes(prof: ModelProfile, batch: int, context: float) -> float:
    """Bytes one decode step of ``batch`` sequences must read from memory: every decoder
    layer's weights (of an MoE layer, only the experts its tokens were routed to:
    ``layer_read_bytes``) and the head once (a tied head reads the embedding matrix,
    counted once), one embedding row per sequence, and K and V of ``context`` cached
    positions per sequence (``context`` may be a mean over steps, hence float)."""
    weights = sum(layer_read_bytes(r, batch) for r in prof.layers) + prof.head.weight_bytes
    embed_rows = batch * prof.hidden_size * prof.bytes_per_param
    return weights + embed_rows + batch * context * prof.kv_bytes_per_token


def prefill_flops(prof: ModelProfile, batch: int, tokens: int) -> int:
    """FLOPs of a causal prefill of ``tokens`` prompt tokens for each of ``batch`` sequences
    (any length, not only the profile's seq_len); the head runs on the last token only."""
    causal_ctx = tokens * (tokens + 1) // 2  # token t attends to t+1 positions
    layers = sum(r.matmul_flops_per_token * tokens + r.attn_flops_per_ctx_token * causal_ctx
                 for r in prof.layers)
    return batch * (layers + prof.head.matmul_flops_per_token)
