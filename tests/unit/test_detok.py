"""The byte-table stream decoder (ByteStreamDecoder) against the tokenizer's own decode:
every id alone, random id lists (special tokens, unknown ids, characters whose bytes are
split over tokens), and growth one token at a time; tokenizers it does not apply to get the
window decoder, which is checked the same way."""

import random

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from llamadist.generation.generate import text_delta
from llamadist.generation.tokenizer import (ByteStreamDecoder, IncrementalDecoder, Tokenizer,
                                            WindowDecoder, load_hf_tokenizer)
from llamadist.weights.checkpoint import open_checkpoint
from tests.tiny import make_tokenizer

TEXT = ("Héllo wörld, 你好世界 🙂🚀 naïve café — ok\n  spaced   out 日本語の文字 "
        "👩‍👩‍👧 <|im_start|> x = [1, 2]\n")


@pytest.fixture(params=["tiny", "tiny+added", "smollm2"])
def tok(request, tmp_path) -> Tokenizer:
    if request.param == "smollm2":
        return open_checkpoint(request.getfixturevalue("smollm2")).tokenizer()
    make_tokenizer(tmp_path)
    tok = load_hf_tokenizer(tmp_path)
    if request.param == "tiny+added":
        # added tokens: special ones are skipped, plain ones decode through the byte
        # alphabet where every character is in it (its own UTF-8 where one is not)
        tok.backend.add_special_tokens([AddedToken("<|im_start|>", special=True)])
        tok.backend.add_tokens([AddedToken("<日本>", normalized=False, special=False),
                                AddedToken("Ġab", normalized=False, special=False),
                                AddedToken("ñé", normalized=False, special=False)])
    return tok


def pieces(tok: Tokenizer) -> list[int]:
    """Ids that split multi-byte characters, the specials, and ids past the vocabulary."""
    ids = tok.encode(TEXT, add_special_tokens=False)
    byte_ids = [i for i in range(tok.vocab_size)
                if len(tok.backend.id_to_token(i) or "") == 1][:300]
    specials = list(tok.backend.get_added_tokens_decoder())
    return ids + byte_ids + specials + [tok.vocab_size, tok.vocab_size + 7]


def test_byte_level_tokenizers_get_the_table(tok):
    table = tok.byte_table()
    assert table is not None and len(table) >= tok.vocab_size
    assert isinstance(IncrementalDecoder(tok), ByteStreamDecoder)
    assert tok.byte_table() is table  # built once


def test_every_id_alone(tok):
    table = tok.byte_table()
    n = len(table)
    for i in range(n):
        assert table[i].decode("utf-8", "replace") == tok.decode([i]), i
    specials = [i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special]
    assert specials and all(table[i] == b"" for i in specials)
    assert all(tok.decode([i], skip_special_tokens=False) for i in specials)


def held_back(got: str, full: str) -> bool:
    """``full`` is ``got`` and an unfinished tail the decoder holds back: at most 3 bytes,
    each a U+FFFD in the full decode (CPython's codec holds b"\\xed\\xa5" back, two of them,
    until the next byte; the full decode of those bytes alone is the same two)."""
    tail = full[len(got):]
    return len(tail) <= 3 and set(tail) <= {"\ufffd"}


def check_stream(tok: Tokenizer, dec: IncrementalDecoder, ids: list[int]) -> None:
    """After each token the text is the decode of the prefix less a trailing unfinished
    character (never a wrong or a later-changed one); at the end, the whole decode."""
    got = ""
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n])
        prev, got = got, dec.update(ids[:n])
        assert got.startswith(prev) and full.startswith(got), (ids[:n], got, full)
        if not full.endswith("\ufffd"):
            assert got == full, (ids[:n], got, full)
        else:  # what is held back is an unfinished tail of at most 3 bytes, U+FFFD in full
            assert held_back(got, full), (ids[:n], got, full)
    complete = tok.decode(ids + tok.encode(" done", add_special_tokens=False))
    got = dec.update(ids + tok.encode(" done", add_special_tokens=False))
    assert got == complete


def test_random_lists_equal_decode(tok):
    rng = random.Random(1234)
    pool = pieces(tok)
    n = tok.vocab_size
    for k in range(2000):
        length = rng.randrange(1, 24)
        # half of them from the pieces (byte tokens, specials, the text's ids), half any id
        ids = [rng.choice(pool) if (k % 2 or rng.random() < 0.3) else rng.randrange(n)
               for _ in range(length)]
        dec = IncrementalDecoder(tok)
        text = dec.update(ids)
        full = tok.decode(ids)
        assert full.startswith(text) and held_back(text, full), (ids, text, full)
        if not full.endswith("\ufffd"):
            assert text == full, (ids, text, full)
        if k < 300:
            check_stream(tok, IncrementalDecoder(tok), ids)


def test_text_split_over_tokens_streams_exactly(tok):
    ids = tok.encode(TEXT * 3, add_special_tokens=False)
    check_stream(tok, IncrementalDecoder(tok), ids)
    # several tokens at a time too
    dec, rng, n = IncrementalDecoder(tok), random.Random(5), 0
    while n < len(ids):
        n = min(len(ids), n + rng.randrange(1, 5))
        full = tok.decode(ids[:n])
        got = dec.update(ids[:n])
        assert full.startswith(got) and held_back(got, full)
    assert got == tok.decode(ids)
    with pytest.raises(ValueError):
        dec.update(ids[:-1])


def test_text_delta_streams_the_same_text(tok):
    """Stop strings and streamed deltas through text_delta: the byte decoder streams the
    window decoder's text, each part no later (sooner where the window decoder held a
    whole token back for its unfinished last character)."""
    ids = tok.encode(TEXT * 2, add_special_tokens=False)
    for stops in [(), ("界 🙂",), ("ok\n", "wörld"), ("\n  spaced  ",), ("ld, 你", "é")]:
        out = []
        for cls in (ByteStreamDecoder, WindowDecoder):
            dec, emitted, sent = cls(tok), 0, []
            for n in range(1, len(ids) + 1):
                text, delta, stopped = text_delta(tok, ids[:n], stops, emitted, n == len(ids),
                                                  dec)
                emitted += len(delta)
                sent.append(emitted)
                assert text.startswith(text[:emitted]) and tok.decode(ids[:n]).startswith(
                    text[:emitted])
                if stopped:
                    break
            out.append((text, sent, stopped))
        (text, sent, stopped), (w_text, w_sent, w_stopped) = out
        assert (text, len(sent), stopped) == (w_text, len(w_sent), w_stopped)
        assert all(a >= b for a, b in zip(sent, w_sent)) and sent[-1] == len(text)
        assert stopped == bool(stops) and not any(s in text for s in stops)
        # the text is the whole decode cut at its first stop string, whichever is listed first
        full = tok.decode(ids)
        cut = min([full.find(s) for s in stops if s in full], default=len(full))
        assert text == full[:cut]


def metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer: metaspace, byte fallback, a leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁a": 4, "b": 5, "▁ab": 6, "a": 263}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    backend = Backend(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁a", "b")],
                                 unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return Tokenizer(backend=backend, bos_token_id=1, eos_token_ids=(2,))


def test_other_tokenizers_fall_back_to_the_window_decoder(tmp_path):
    sp = metaspace_tokenizer()
    assert sp.byte_table() is None
    assert isinstance(IncrementalDecoder(sp), WindowDecoder)
    rng = random.Random(7)
    # lists of whole characters' ids (the window decoder, unlike the byte table, can put a
    # wrong character where a window starts inside an invalid byte sequence: random
    # byte-fallback ids are not a case it covers)
    words = [sp.encode(w, add_special_tokens=False) for w in ["ab", " a", "日本", " 🙂", "b"]]
    words += [[1], [2], [3]]
    for k in range(200):
        ids = [i for _ in range(rng.randrange(1, 8)) for i in rng.choice(words)]
        dec = IncrementalDecoder(sp)
        for n in range(1, len(ids) + 1):
            # (ByteFallback makes every byte of an unfinished character a U+FFFD: the
            # full decode of a prefix ending in one is not a prefix of the next one's)
            full, got = sp.decode(ids[:n]), dec.update(ids[:n])
            if not full.endswith("\ufffd"):
                assert got == full, (ids[:n], got, full)
        assert got == full
    # a byte-level pre-tokenizer with another decoder: the decoder decides, not the rest
    make_tokenizer(tmp_path)
    tiny = load_hf_tokenizer(tmp_path)
    tiny.backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    assert tiny.byte_table() is None and isinstance(IncrementalDecoder(tiny), WindowDecoder)
    # a tokenizer-like object without a backend (a test's fake) gets the window decoder
    class Fake:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)
    dec = IncrementalDecoder(Fake())
    assert isinstance(dec, WindowDecoder) and dec.update([0, 1, 2]) == "abc"
