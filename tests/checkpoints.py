"""Tiny random Hugging Face checkpoints for tests, written with transformers (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The KV cache holds keys and values of every token.",
    "Continuous batching keeps the batch full. Prefill computes the prompt; decode adds one token.",
    "Héllo wörld! Ünïcode façade naïve café — 東京 ありがとう 🙂 emoji and UTF-8 bytes.",
    "def f(x):\n    return x * 2  # numbers 0123456789 and punctuation ,.;:!?",
] * 20


def write_tokenizer(path: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def hf_config(arch: str, vocab_size: int):
    from transformers import (LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
                              Qwen3MoeConfig)

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=2, bos_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if arch == "llama_long":  # room for tool prompts (hundreds of tokens of the byte-level tokenizer)
        return LlamaConfig(**{**common, "max_position_embeddings": 2048}, tie_word_embeddings=True)
    if arch == "llama_wide":  # matrices of 1 MiB and more: CPU dense layers run on prepacked oneDNN weights
        return LlamaConfig(**{**common, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8},
                           tie_word_embeddings=True)
    if arch == "llama_mha":
        return LlamaConfig(**{**common, "num_key_value_heads": 4})
    if arch == "llama_mqa":
        return LlamaConfig(**{**common, "num_key_value_heads": 1})
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=24)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32)
    if arch == "qwen3_mqa":  # one KV head: tensor-parallel ranks replicate it
        return Qwen3Config(**{**common, "num_key_value_heads": 1}, head_dim=32)
    moe = dict(common, intermediate_size=96, num_experts_per_tok=2)
    if arch == "mixtral":
        return MixtralConfig(**moe, num_local_experts=4)
    if arch == "qwen2_moe":  # shared expert with a sigmoid gate, unnormalised top-k weights
        return Qwen2MoeConfig(**moe, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              norm_topk_prob=False)
    if arch == "qwen3_moe":  # normalised top-k weights, a dense layer among sparse ones
        return Qwen3MoeConfig(**moe, num_experts=4, moe_intermediate_size=32, head_dim=32, norm_topk_prob=True,
                              mlp_only_layers=[1])
    raise ValueError(arch)


DENSE_ARCHS = ["llama", "llama_mha", "llama_mqa", "mistral", "qwen2", "qwen3"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
ARCHS = DENSE_ARCHS + MOE_ARCHS


def make_checkpoint(path: Path, arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A random model of `arch` with the shared test tokenizer, saved as an HF directory."""
    from transformers import AutoModelForCausalLM

    write_tokenizer(path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    cfg = hf_config(arch, vocab_size=vocab)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # random init is tiny; larger weights make logits differ per token
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(path)
    return path
