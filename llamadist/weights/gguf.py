"""GGUF checkpoints: llama.cpp's single-file format, read tensor by tensor.

A GGUF stores the model config and the tokenizer as metadata and the weights
under llama.cpp's names (``blk.3.attn_q.weight``), possibly quantized, with
q/k rows permuted for llama.cpp's RoPE layout. ``GGUFCheckpoint`` hides all of
that: it answers in Hugging Face names and layout, dequantizing one tensor at a
time, so a stage reads only what it owns. ``convert_gguf_to_hf`` writes a
Hugging Face folder from a GGUF, streaming one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from llamadist.config import ConfigError, ModelConfig
from llamadist.generation.tokenizer import Tokenizer
from llamadist.kernels.quant import QuantizedTensor
from llamadist.kernels.quant_ref import FORMATS
from llamadist.weights.base import CheckpointError, Shard
from llamadist.weights.gguf_meta import Lazy, Reader, metadata
from llamadist.weights.loader import trim_heap

log = logging.getLogger(__name__)

# GGUF name <-> Hugging Face name. Per-layer leaves live under blk.{i} / model.layers.{i}.
LAYER_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
}
# Mixtral (llama.cpp writes it as arch "llama" with llama.expert_count): the router, and
# each layer's experts stacked into one (E, out, in) tensor per projection.
MOE_ROUTER = ("ffn_gate_inp", "block_sparse_moe.gate")
STACKED_EXPERTS: dict[str, str] = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3",
                                   "ffn_down_exps": "w2"}
# Older llama.cpp files store one tensor per expert: blk.{i}.ffn_gate.{e}.weight.
_PER_EXPERT = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_GGUF_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")
_GGUF_EXPERT = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight$")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
# ggml types whose reader data is one array element per weight (not blocks of bytes)
_ELEMENT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)

# The split regex llama.cpp names by `tokenizer.ggml.pre`, as transformers' GGUF loader maps
# them; any other value (e.g. "smollm", "gpt2") keeps ByteLevel's own GPT-2 regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **{k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral",
                                  "midm-2.0", "dbrx", "smaug-bpe")},
    "tekken": _TEKKEN_SPLIT,
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    e = _GGUF_EXPERT.match(gguf_name)
    if e is not None:
        return _expert_name(int(e.group(1)), int(e.group(3)), _PER_EXPERT[e.group(2)])
    m = _GGUF_NAME.match(gguf_name)
    if m is None:
        return None
    layer, leaf, suffix = m.groups()
    if layer is not None and leaf == MOE_ROUTER[0]:
        return f"model.layers.{layer}.{MOE_ROUTER[1]}.{suffix}"
    if layer is not None and leaf in LAYER_NAMES:
        return f"model.layers.{layer}.{LAYER_NAMES[leaf]}.{suffix}"
    if layer is None and leaf in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[leaf]}.{suffix}"
    return None


def _expert_name(layer: int, expert: int, leaf: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{leaf}.weight"


def stacked_expert_names(gguf_name: str, num_experts: int) -> list[str]:
    """``blk.3.ffn_gate_exps.weight`` -> the HF names of its ``num_experts`` slices
    (``model.layers.3.block_sparse_moe.experts.{e}.w1.weight``); [] for other names."""
    m = _GGUF_NAME.match(gguf_name)
    if m is None or m.group(1) is None or m.group(2) not in STACKED_EXPERTS:
        return []
    return [_expert_name(int(m.group(1)), e, STACKED_EXPERTS[m.group(2)])
            for e in range(num_experts)]


@dataclass(frozen=True)
class _ExpertSlice:
    """Expert ``index`` of a stacked (E, out, in) GGUF tensor, with the reader tensor's
    attributes the reading code uses: one expert's rows, dequantized alone."""
    tensor: Any
    index: int

    @property
    def name(self) -> str:
        return f"{self.tensor.name}[{self.index}]"

    @property
    def tensor_type(self) -> Any:
        return self.tensor.tensor_type

    @property
    def shape(self) -> np.ndarray:
        return self.tensor.shape[:2]  # GGUF order (in, out): drop the expert dimension

    @property
    def data(self) -> np.ndarray:
        return self.tensor.data[self.index]  # (out, in) elements or (out, row bytes)


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (its convert uses n_head for q, n_head_kv for k).

    llama.cpp stores each head's rows as interleaved (x0, y0, x1, y1, ...) RoPE pairs;
    HF keeps halves (x0, x1, ..., y0, y1, ...). w: (n_head * head_dim, ...) rows.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


class GGUFCheckpoint:
    """A GGUF file as a :class:`~llamadist.weights.base.Checkpoint` in HF naming."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:  # GGUFReader memory-maps the file and parses only the header here
            self._reader = Reader(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path} cannot be opened: {_one_line(e)}") from None
        except Exception as e:  # gguf/numpy raise ValueError, IndexError, struct/overflow errors
            raise CheckpointError(
                f"{self.path} is not a readable GGUF file (truncated or corrupt?): {_one_line(e)}"
            ) from None
        self._meta = metadata(self._reader)
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{self.path}: GGUF architecture {arch!r} is not supported; "
                              f"llamadist runs 'llama' GGUF files (Llama and Mixtral)")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._read_config()
        self._by_hf: dict[str, Any] = {}
        for t in self._reader.tensors:
            for e, h in enumerate(stacked_expert_names(t.name, self.config.num_experts)):
                self._by_hf[h] = _ExpertSlice(t, e)
            if (h := hf_name(t.name)) is not None:
                self._by_hf[h] = t

    # ---- metadata --------------------------------------------------------
    def _field(self, key: str, default: Any = None) -> Any:
        value = self._meta.get(key, default)
        return self._reader.read(value) if hasattr(self._reader, "read") else value

    def _count(self, key: str) -> int:
        v = self._meta.get(key)
        return 0 if v is None else len(v) if isinstance(v, (list, Lazy)) else 1

    def _read_config(self) -> ModelConfig:
        k = lambda name, default=None: self._field(f"llama.{name}", default)  # noqa: E731
        try:
            hidden, heads = int(k("embedding_length")), int(k("attention.head_count"))
            kv_heads = k("attention.head_count_kv", heads)
            if isinstance(kv_heads, list):  # per-layer counts; llama has one value
                if len(set(kv_heads)) != 1:
                    raise ConfigError(f"{self.path}: per-layer KV head counts {sorted(set(kv_heads))}")
                kv_heads = kv_heads[0]
            head_dim = k("attention.key_length") or k("rope.dimension_count") or hidden // heads
            eos = [self._field(f"tokenizer.ggml.{t}_token_id")
                   for t in ("eos", "eot", "eom")]  # llama.cpp stops on all end-of-generation ids
            return ModelConfig(
                vocab_size=int(k("vocab_size") or self._count("tokenizer.ggml.tokens")),
                hidden_size=hidden, intermediate_size=int(k("feed_forward_length")),
                num_layers=int(k("block_count")), num_heads=heads, num_kv_heads=int(kv_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(k("rope.freq_base", 10000.0)),
                rope_scaling=self._rope_scaling(float(k("rope.freq_base", 10000.0)), int(head_dim)),
                max_position_embeddings=int(k("context_length", 2048)),
                tie_word_embeddings="output.weight" not in self._tensors,
                attention_bias="blk.0.attn_q.bias" in self._tensors,
                bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
                torch_dtype="float32",
                num_experts=int(k("expert_count", 0)),
                num_experts_per_tok=int(k("expert_used_count", 0)),
            )
        except TypeError:  # int(None): a required key is missing
            raise ConfigError(f"{self.path}: GGUF metadata lacks a required llama.* key "
                              f"(block_count, embedding_length, feed_forward_length, "
                              f"attention.head_count)") from None

    def _rope_scaling(self, base: float, head_dim: int) -> dict[str, Any] | None:
        kind = self._field("llama.rope.scaling.type")
        if kind not in (None, "none"):
            scaling: dict[str, Any] = {"rope_type": kind,
                                       "factor": float(self._field("llama.rope.scaling.factor", 1.0))}
            orig = self._field("llama.rope.scaling.original_context_length")
            if orig is not None:
                scaling["original_max_position_embeddings"] = int(orig)
            return scaling
        if "rope_freqs.weight" in self._tensors:  # llama3: per-frequency divisors, no metadata
            freqs = gguf.quants.dequantize(self._tensors["rope_freqs.weight"].data,
                                           self._tensors["rope_freqs.weight"].tensor_type)
            return _llama3_scaling_from_freqs(np.asarray(freqs, np.float64), base, head_dim)
        return None

    # ---- tensors -------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._by_hf)

    def _tensor(self, name: str) -> Any:
        if name not in self._by_hf:
            raise CheckpointError(f"{self.path} has no tensor {name!r} "
                                  f"(it has {len(self._by_hf)} llama tensors)")
        return self._by_hf[name]

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dims fastest-moving first: (in, out) -> HF (out, in)
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def _qk_heads(self, name: str) -> int | None:
        if ".self_attn.q_proj." in name:
            return self.config.num_heads
        if ".self_attn.k_proj." in name:
            return self.config.num_kv_heads
        return None

    def _dequant(self, t: Any, rows: slice | None) -> np.ndarray:
        """A tensor, or rows of it, as float32 (rows, in) or (n,) for 1-D; rows=None reads all."""
        try:
            out = gguf.quants.dequantize(t.data if rows is None else t.data[rows], t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, "
                                  f"which gguf cannot dequantize") from None
        out = np.asarray(out, dtype=np.float32)
        return out if out.flags.writeable else out.copy()  # F32 comes back as a memmap view

    def _rows(self, name: str, shape: tuple[int, ...], dim: int, start: int,
              stop: int) -> tuple[int, int]:
        """The rows [lo, hi) to read for a shard: its own rows (dim 0; widened to whole
        heads for q/k, whose permutation stays within a head) or all of them (dim 1)."""
        heads = self._qk_heads(name)
        if dim != 0:
            return 0, shape[0]
        if heads is not None:
            hd = shape[0] // heads
            return start // hd * hd, -(-stop // hd) * hd
        return start, stop

    def _release(self, t: Any) -> None:
        """Drop the file pages of tensor ``t`` from this process's memory map once it has
        been copied (the page cache keeps them): without this every tensor read stays
        resident and the peak memory counts the file on top of the loaded weights."""
        mm = getattr(getattr(self._reader.data, "base", None), "_mmap", None)
        dontneed = getattr(mmap, "MADV_DONTNEED", None)  # absent on Windows
        if (not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise") or dontneed is None
                or not hasattr(t, "data_offset")):  # an expert's slice: its tensor is shared
            return
        lo = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            mm.madvise(dontneed, lo, t.data_offset + int(t.n_bytes) - lo)
        except (OSError, ValueError):
            pass

    def quant_type(self, name: str) -> int | None:
        """The ggml type of a 2-D tensor that ``get_quantized`` keeps as stored (the block
        types and F16/BF16 of kernels.quant_ref.FORMATS); None for F32 and other types."""
        t = self._tensor(name)
        qtype = int(t.tensor_type)
        return qtype if qtype in FORMATS and len(t.shape) == 2 else None

    def get_quantized(self, name: str, shard: Shard | None = None,
                      act_dtype: torch.dtype = torch.float32) -> QuantizedTensor:
        """A 2-D block tensor (or a shard of it) as its blocks, in HF layout (q/k rows
        un-permuted). Rows (dim 0) slice freely; columns (dim 1) only at block boundaries,
        else a CheckpointError says where the blocks allow a cut."""
        t, shape, qtype = self._tensor(name), self.shape(name), self.quant_type(name)
        if qtype is None:
            raise CheckpointError(f"{self.path}: {t.name} ({t.tensor_type.name}) is not a "
                                  f"block type llamadist keeps quantized")
        dim, start, stop = shard if shard is not None else (0, 0, shape[0])
        lo, hi = self._rows(name, shape, dim, start, stop)
        raw = t.data[lo:hi]  # (rows, row bytes), a view of the file
        heads = self._qk_heads(name)
        if heads is not None:  # a permutation of whole rows: the blocks move as they are
            raw = reverse_permute(raw, (hi - lo) // (shape[0] // heads))
        # one copy, owned; F16 comes as float16 elements, the rest as bytes: keep the bytes
        raw = np.array(raw, order="C", copy=True).view(np.uint8).reshape(hi - lo, -1)
        self._release(t)
        qt = QuantizedTensor(torch.from_numpy(raw), qtype, (hi - lo, shape[1]), act_dtype)
        if dim == 0:
            return qt.rows(start - lo, stop - lo) if (start - lo, stop - lo) != (0, hi - lo) else qt
        try:
            return qt.cols(start, stop)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {name}: {e} (tensor parallel: use a tp "
                                  f"that cuts there, or --weights float32)") from None

    def get(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        t = self._tensor(name)
        shape = self.shape(name)
        heads = self._qk_heads(name)
        dim, start, stop = shard if shard is not None else (0, 0, shape[0])
        # t.data is (rows, bytes per row) for block types, so only 2-D rows can be sliced
        # before dequantizing (a 1-D block tensor is a byte vector).
        by_rows = dim == 0 and (len(shape) > 1 or t.tensor_type in _ELEMENT_TYPES)
        # columns cross quantization blocks: read everything; ggml rows are independent
        lo, hi = self._rows(name, shape, dim, start, stop) if by_rows else (0, shape[0])
        w = self._dequant(t, slice(lo, hi) if by_rows else None).reshape(hi - lo, *shape[1:])
        self._release(t)
        if heads is not None:  # (rows, in) with rows = whole heads of head_dim
            w = reverse_permute(w, (hi - lo) // (shape[0] // heads))
        out = torch.from_numpy(np.ascontiguousarray(w))
        offset = start - lo if dim == 0 else start  # lo > 0 only when rows were read partially
        out = out.narrow(dim, offset, stop - start)
        return out.contiguous()

    # ---- tokenizer -----------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        """The GGUF's own vocabulary as a ``tokenizers`` backend, built as transformers'
        GGUF loader builds it (so ids match), without importing transformers."""
        kind = self._field("tokenizer.ggml.model")
        tokens: list[str] = self._field("tokenizer.ggml.tokens") or []
        types: list[int] = self._field("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges: list[str] | None = self._field("tokenizer.ggml.merges")
        if kind == "gpt2":
            pre = self._field("tokenizer.ggml.pre")
            backend = _byte_level_backend(tokens, types, merges or [], pre)
        elif kind == "llama":
            scores = self._field("tokenizer.ggml.scores") or [0.0] * len(tokens)
            backend = _sentencepiece_backend(tokens, types, merges, scores)
        else:
            raise CheckpointError(f"{self.path}: tokenizer.ggml.model={kind!r} is not supported "
                                  f"(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        bos = self._field("tokenizer.ggml.bos_token_id")
        add_bos = bool(self._field("tokenizer.ggml.add_bos_token", kind == "llama"))
        special = {key: tokens[i] for key, i in (("bos_token", bos), ("eos_token", self._field(
            "tokenizer.ggml.eos_token_id"))) if i is not None and i < len(tokens)}
        backend.add_special_tokens([AddedToken(s, normalized=False, special=True)
                                    for s in special.values()])
        if add_bos and bos is not None:  # so an exported tokenizer.json adds BOS on its own too
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B:1",
                special_tokens=[(tokens[bos], bos)])
        pad = self._field("tokenizer.ggml.padding_token_id")
        tok = Tokenizer(backend=backend, bos_token_id=bos, eos_token_ids=self.config.eos_token_ids,
                        pad_token_id=pad, add_bos=add_bos,
                        chat_template=self._field("tokenizer.chat_template"), special_tokens=special)
        trim_heap()  # the vocabulary's transient dicts and lists (~4 MB resident otherwise)
        return tok


def _llama3_scaling_from_freqs(freqs: np.ndarray, base: float, head_dim: int) -> dict[str, Any] | None:
    """Recover llama3 rope_scaling from the ``rope_freqs`` divisors llama.cpp's convert writes.

    freqs: (head_dim // 2,). llama.cpp computes them with low_freq_factor=1, high_freq_factor=4
    and an original context of 8192 (its defaults); we check that and otherwise ignore them.
    """
    factor, low, high, orig = float(freqs.max()), 1.0, 4.0, 8192
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    expect = np.where(wavelen < orig / high, 1.0, np.where(
        wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if freqs.shape != expect.shape or not np.allclose(freqs, expect, rtol=1e-3):
        log.warning("rope_freqs.weight does not match llama3 scaling; ignoring it")
        return None
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": orig}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_backend(tokens: list[str], types: list[int], merges: list[str],
                        pre: str | None) -> tokenizers.Tokenizer:
    """Byte-level BPE as transformers builds it for a GGUF (``byte_level_tokenizer``)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet is respelled byte by byte, as transformers does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = tokenizers.Tokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:  # GPT-2's regex inside ByteLevel ("smollm", "gpt2", ...)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # A CONTROL token outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    _add_gguf_specials(backend, tokens, types, lambda t: set(t) <= alphabet)
    return backend


def _generate_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best score first (transformers' ``generate_merges``)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_backend(tokens: list[str], types: list[int], merges: list[str] | None,
                           scores: list[float]) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback, as transformers' LlamaTokenizer builds it."""
    pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges
             else _generate_merges(tokens, scores))
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs,
                     fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k == _UNKNOWN])
    _add_gguf_specials(backend, tokens, types, lambda t: True)
    return backend


def _add_gguf_specials(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int],
                       keep: Any) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED plain added tokens:
    either way they are matched whole in the text instead of being split."""
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k == _CONTROL and keep(t)])
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])


# ---- conversion to a Hugging Face folder ------------------------------------------------
_ST_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16),
              "bfloat16": ("BF16", torch.bfloat16)}


def _write_safetensors(ckpt: GGUFCheckpoint, names: list[str], path: Path, dtype: str,
                       progress: bool) -> None:
    """Stream tensors into one safetensors file: the header is known from shapes alone,
    so only one tensor is ever in memory."""
    tag, torch_dtype = _ST_DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape = ckpt.shape(name)
        nbytes = math.prod(shape) * torch_dtype.itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in tqdm(names, desc=f"converting {ckpt.path.name}", unit="tensor",
                         disable=not progress):
            t = ckpt.get(name).to(torch_dtype)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True,
                       dtype: str = "float32") -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from a GGUF file."""
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_ST_DTYPES)}")
    ckpt = GGUFCheckpoint(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = replace(ckpt.config, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tok = ckpt.tokenizer()
    tok.backend.save(str(out / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                               "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
                               **tok.special_tokens}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    eos = list(config.eos_token_ids)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    # Tied checkpoints have no output.weight, so lm_head.weight is never among the names.
    _write_safetensors(ckpt, sorted(ckpt.names()), out / "model.safetensors", dtype, progress)
    return out
