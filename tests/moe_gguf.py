"""Write a GGUF from a tiny Hugging Face Mixtral folder, the way llama.cpp's
convert_hf_to_gguf does: arch "llama" with llama.expert_count, q/k rows permuted to
interleaved RoPE pairs, the router as ffn_gate_inp and each layer's experts stacked into
ffn_gate_exps / ffn_up_exps / ffn_down_exps of shape (E, out, in)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from llamadist.config import ModelConfig

_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_STACK = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved RoPE pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tokenizer_fields(w: gguf.GGUFWriter, folder: Path) -> None:
    """The tokenizer of the HF ``folder`` (its tokenizer.json, BPE) as GGUF metadata."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)


def config_fields(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """A Llama-family ``cfg`` as GGUF metadata (the experts' counts where it has experts)."""
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)


def write_mixtral_gguf(folder: Path, path: Path,
                       expert_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                       ) -> Path:
    """``folder`` (a tiny Mixtral HF folder) as a GGUF at ``path``; stacked experts stored
    as ``expert_type`` (F32 keeps the weights exact), everything else F32."""
    cfg = ModelConfig.from_json_file(folder / "config.json")
    sd = load_file(folder / "model.safetensors")
    w = gguf.GGUFWriter(path, "llama")
    config_fields(w, cfg)
    tokenizer_fields(w, folder)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_add_bos_token(False)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(sd["model.embed_tokens.weight"]))
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        for leaf, name in _ATTN.items():
            t = sd[f"{pre}self_attn.{leaf}.weight"]
            heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(leaf)
            w.add_tensor(f"blk.{i}.{name}.weight", f32(llama_cpp_permute(t, heads) if heads else t))
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(sd[f"{pre}input_layernorm.weight"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(sd[f"{pre}post_attention_layernorm.weight"]))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", f32(sd[f"{pre}block_sparse_moe.gate.weight"]))
        for leaf, name in _STACK.items():
            stack = f32(np.stack([sd[f"{pre}block_sparse_moe.experts.{e}.{leaf}.weight"]
                                  for e in range(cfg.num_experts)]))  # (E, out, in)
            if expert_type == gguf.GGMLQuantizationType.F32:
                w.add_tensor(f"blk.{i}.{name}.weight", stack)
            else:
                w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(stack, expert_type),
                             raw_dtype=expert_type)
    w.add_tensor("output_norm.weight", f32(sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", f32(sd["lm_head.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
