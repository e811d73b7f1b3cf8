"""Tiny random Llama checkpoints saved as real Hugging Face folders, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distributed inference splits a model across devices, processes and hosts.",
    "Once upon a time there was a tiny language model that dreamed of GPUs.",
    "def main():\n    print('hello world')\n",
    "1 2 3 4 5 6 7 8 9 10 100 1000",
] * 20

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONFIGS = {
    # multi-head attention, untied head
    "mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    # grouped-query attention, tied embeddings
    "gqa_tied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=5,
                     num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                     rope_theta=100000.0),
    # llama3 rope scaling and an explicit head_dim that is not hidden/heads
    "llama3": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   tie_word_embeddings=False, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def make_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                   "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


# Made on demand (not by the tiny_models fixture): widths torch's tinygemm takes (inputs a
# multiple of the int4 group 128, outputs of 16), for the GPU weight-quantization tests.
WIDE_CONFIGS = {
    "wide": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 rope_theta=10000.0),
}


def make_tiny_model(folder: Path, kind: str = "gqa_tied", seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      **(CONFIGS | WIDE_CONFIGS)[kind])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default weights make the logits spread, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# Tiny Mixtral (sparse MoE) configurations: expert counts, top-1 and top-2, GQA and MHA.
MOE_CONFIGS = {
    # 4 experts, top-2, grouped-query attention
    "moe_top2_gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                         num_experts_per_tok=2, tie_word_embeddings=False),
    # 8 experts, top-1 (switch-style), multi-head attention
    "moe_top1": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
                     num_experts_per_tok=1, tie_word_embeddings=False),
    # 3 experts (not a power of two), top-2, GQA, tied embeddings
    "moe_e3_tied": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                        num_attention_heads=6, num_key_value_heads=3, num_local_experts=3,
                        num_experts_per_tok=2, tie_word_embeddings=True),
}


def make_tiny_mixtral(folder: Path, kind: str = "moe_top2_gqa", seed: int = 0) -> Path:
    """A tiny random MixtralForCausalLM saved as a Hugging Face folder (per-expert
    ``block_sparse_moe.experts.{e}.w1/w2/w3`` tensors, as the Hub's Mixtral checkpoints)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    cfg = MixtralConfig(vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
                        sliding_window=None, **MOE_CONFIGS[kind])
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # spread logits and router scores, as make_tiny_model does
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_fused_llama(seed: int = 0, **shape):
    """A 2-layer Llama of ``shape`` (hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, head_dim: HF names) with N(0, 0.3) weights, RoPE for 64
    positions on the CPU, q/k/v and gate/up fused, in eval mode."""
    from llamadist.config import ModelConfig
    from llamadist.model.fuse import fuse_projections
    from llamadist.model.llama import Llama
    cfg = ModelConfig.from_hf_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=50,
                                        num_hidden_layers=2, rms_norm_eps=1e-5,
                                        rope_theta=10000.0, **shape))
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.setup_rope(64, "cpu")
    return fuse_projections(model).eval()
