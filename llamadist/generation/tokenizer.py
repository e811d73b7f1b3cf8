"""Tokenizer: a ``tokenizers.Tokenizer`` plus BOS/EOS handling and the chat template."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    pass


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    # each id's (bytes, text) for ByteStreamDecoder (None: not built; False: does not apply)
    _byte_table: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend's post-processor may already add BOS (Llama 2/3 tokenizer.json do).
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def byte_table(self) -> tuple[bytes, ...] | None:
        """Each token id's bytes as ``decode(..., skip_special_tokens=True)`` joins them
        (special tokens: b""), for a byte-level tokenizer whose decode is the lossy UTF-8
        decoding of its tokens' bytes put end to end; None for any other. Built on the
        first call and kept (~0.2 s for SmolLM2's 49k tokens, most of it checking)."""
        tables = self._byte_tables()
        return tables[0] if tables else None

    def _byte_tables(self) -> tuple[tuple[bytes, ...], tuple[str | None, ...]] | None:
        """The byte table and, beside it, each id's text where its bytes are whole UTF-8
        characters (None where they are not: a character split over tokens)."""
        if self._byte_table is None:
            table = _byte_level_table(self.backend)
            self._byte_table = False if table is None else (table, tuple(
                _whole_text(b) for b in table))
        return self._byte_table or None

    # ---- chat -----------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError(
                "this model has no chat template; use `llamadist generate --prompt` instead of chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(msg: str) -> None:
            raise TokenizerError(f"chat template error: {msg}")

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.apply_chat_template(messages)
        # The template already holds any BOS text it wants; do not add another.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            bos_text = self.backend.id_to_token(self.bos_token_id)
            if bos_text is not None and not text.startswith(bos_text):
                ids = [self.bos_token_id] + ids
        return ids


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's contents ({} when the file is absent), or a clear error."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path} holds a {type(d).__name__}, not a JSON object")
    return d


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_hf_tokenizer(folder: Path, eos_from_config: tuple[int, ...] = (),
                      bos_from_config: int | None = None) -> Tokenizer:
    """Read tokenizer.json, tokenizer_config.json and generation_config.json from a folder."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise TokenizerError(
            f"no tokenizer.json in {folder}; llamadist needs the fast-tokenizer file "
            f"(save it with `tokenizer.save_pretrained(...)` from transformers)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tj))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise TokenizerError(f"{tj} could not be read: {e}") from None
    cfg = _json_object(folder / "tokenizer_config.json")
    gen = _json_object(folder / "generation_config.json")

    special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    special = {k: v for k, v in special.items() if v}

    def tok_id(key: str) -> int | None:
        return backend.token_to_id(special[key]) if key in special else None

    eos: list[int] = []
    for src in (gen.get("eos_token_id"), list(eos_from_config), tok_id("eos_token")):
        for e in (src if isinstance(src, list) else [src]):
            if e is not None and e not in eos:
                eos.append(int(e))
    bos = gen.get("bos_token_id", bos_from_config)
    if bos is None:
        bos = tok_id("bos_token")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # a list of named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(backend=backend, bos_token_id=bos, eos_token_ids=tuple(eos),
                     pad_token_id=tok_id("pad_token"), add_bos=bool(cfg.get("add_bos_token", False)),
                     chat_template=template, special_tokens=special)


def _byte_alphabet() -> dict[str, int]:
    """The byte-level (GPT-2) spelling of bytes as characters, reversed: character -> byte.
    Printable Latin-1 bytes spell themselves; the other 68 take the characters from
    U+0100 up, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in set(kept)]
    chars = {chr(b): b for b in kept}
    chars.update((chr(0x100 + k), b) for k, b in enumerate(moved))
    return chars


def _whole_text(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _byte_level_table(backend: Any) -> tuple[bytes, ...] | None:
    """The byte table of ``Tokenizer.byte_table``, or None where it does not apply.

    It applies where the backend's decoder is ``ByteLevel`` alone (alone in a Sequence
    too): ``tokenizers`` then decodes a list of ids by taking each id's token string
    (special added tokens left out when skipped; unknown ids left out), turning each into
    bytes (every character through the byte alphabet, or the token's own UTF-8 where one
    of its characters is not in it), and decoding all the bytes at once as UTF-8 with
    U+FFFD for what is invalid. Normalizers, pre-tokenizers and post-processors play no
    part in decoding. Any other decoder (Metaspace, Replace/ByteFallback/Fuse/Strip of
    SentencePiece, WordPiece, ...) gets None: the window decoder. The table is checked
    against the backend's own decode of every id alone; a difference gives None too."""
    decoder = getattr(backend, "decoder", None)
    try:
        dec = json.loads(decoder.__getstate__()) if decoder is not None else {}
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    except Exception:  # a backend we cannot read: not one we can prove equal
        return None
    if dec.get("type") == "Sequence" and len(dec.get("decoders") or []) == 1:
        dec = dec["decoders"][0]
    if dec.get("type") != "ByteLevel":
        return None
    alphabet = _byte_alphabet()
    letters = set(alphabet)
    spell = str.maketrans({c: chr(b) for c, b in alphabet.items()})
    added = backend.get_added_tokens_decoder()
    n = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
    table = []
    for i in range(n):
        tok = None if i in special else backend.id_to_token(i)
        if not tok:
            table.append(b"")
        elif letters.issuperset(tok):
            table.append(tok.translate(spell).encode("latin-1"))
        else:
            table.append(tok.encode())
    # the backend's own decoding of every id alone, against the table's (one call per id:
    # faster here than decode_batch's threads on a busy machine, ~0.1 s for 49k ids)
    decode = backend.decode
    if any(b.decode("utf-8", "replace") != decode([i], True) for i, b in enumerate(table)):
        return None
    return tuple(table)


_utf_8_decode = codecs.utf_8_decode


def settled(text: str) -> int:
    """How many characters of a growing text may be streamed now: all but a trailing run
    of U+FFFD (a character whose bytes have not all come)."""
    return len(text.rstrip("\ufffd")) if text and text[-1] == "\ufffd" else len(text)


class IncrementalDecoder:
    """The text of a token list that only grows, a few microseconds per new token.

    ``IncrementalDecoder(tokenizer)`` gives a ``ByteStreamDecoder`` where the tokenizer
    has a byte table (byte-level BPE: SmolLM2, Llama 3, GPT-2), else a ``WindowDecoder``.
    Either way ``update(ids)`` returns the decode of ``ids`` less a trailing unfinished
    UTF-8 character."""

    def __new__(cls, tokenizer: "Tokenizer"):
        if cls is IncrementalDecoder:
            byte_table = getattr(tokenizer, "byte_table", None)
            cls = ByteStreamDecoder if byte_table is not None and byte_table() else WindowDecoder
        return object.__new__(cls)

    text: str

    def update(self, ids: list[int]) -> str:
        raise NotImplementedError


class ByteStreamDecoder(IncrementalDecoder):
    """The byte-level tokenizers' stream decoder: a new token costs a lookup of its text
    in the tokenizer's table (its bytes where they are not whole characters, or while
    bytes of an unfinished character wait) and, only then, an incremental UTF-8 decoding
    (errors replaced as ``tokenizers`` replaces them, ``codecs.utf_8_decode`` as
    Python's incremental decoder calls it), which holds back an unfinished character
    until its last byte comes. The text equals the backend's
    ``decode(ids, skip_special_tokens=True)``, less that unfinished character."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.text = ""
        self.read = 0
        self._table, self._texts = tokenizer._byte_tables()
        self._size = len(self._table)
        self._pending = b""  # the bytes of an unfinished character

    def update(self, ids: list[int]) -> str:
        """The text of ``ids`` (the previous call's list plus new tokens)."""
        n, read = len(ids), self.read
        if n == read + 1 and not self._pending:
            i = ids[read]
            piece = self._texts[i] if 0 <= i < self._size else ""
            if piece is None:
                piece = self._feed(self._table[i])
            self.text += piece
            self.read = n
        elif n > read:
            table, size = self._table, self._size
            self.text += self._feed(b"".join(table[i] if 0 <= i < size else b""
                                             for i in ids[read:]))
            self.read = n
        elif n < read:
            raise ValueError("IncrementalDecoder: the token list shrank")
        return self.text

    def _feed(self, data: bytes) -> str:
        data = self._pending + data
        piece, used = _utf_8_decode(data, "replace", False)
        self._pending = data[used:]
        return piece


class WindowDecoder(IncrementalDecoder):
    """The text of a token list that only grows, decoding a short window per new token
    instead of the whole list (which costs O(length) per token: at 256 requests it was
    a fifth of a serving run's time).

    The window starts a few tokens back (``prefix``), so a tokenizer that drops the
    leading space of a sequence's first token, or merges bytes across tokens, decodes the
    window's old part and the whole window alike; the new text is their difference. While
    the window ends in an unfinished UTF-8 character nothing is added."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = 0  # window start
        self.read = 0    # tokens whose text is in self.text
        # Tokenizer.decode(ids) is backend.decode(list(ids), skip_special_tokens=True):
        # called on the backend, with the flag by position, twice per token of every
        # stream (2.75 -> 2.47 us per token measured, SmolLM2's tokenizer)
        backend = getattr(tokenizer, "backend", None)
        self._decode = (backend.decode if backend is not None
                        else lambda ids, _skip: tokenizer.decode(ids))

    def update(self, ids: list[int]) -> str:
        """The text of ``ids`` (the previous call's list plus new tokens)."""
        if len(ids) < self.read:
            raise ValueError("IncrementalDecoder: the token list shrank")
        if len(ids) > self.read:
            decode = self._decode
            old = decode(ids[self.prefix:self.read], True)
            new = decode(ids[self.prefix:], True)
            if len(new) > len(old) and not new.endswith("\ufffd"):
                self.text += new[len(old):]
                self.prefix, self.read = max(0, len(ids) - 4), len(ids)
        return self.text
