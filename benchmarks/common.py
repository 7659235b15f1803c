"""Helpers shared by the benchmark scripts: cached random checkpoints and JSON output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CACHE = Path(os.environ.get("CHATSCALE_BENCH_CACHE", Path.home() / ".cache" / "chatscale-bench"))

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), random bf16 weights.
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
)


def smollm2_checkpoint() -> Path:
    """A random bf16 Llama with SmolLM2-135M's shape, made once with transformers and cached."""
    return random_llama_checkpoint("smollm2-135m-random-bf16", SMOLLM2_135M)


def save_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2))


def random_llama_checkpoint(name: str, shape: dict, dtype: str = "bfloat16") -> Path:
    """A random Llama of `shape` (LlamaConfig fields) stored in `dtype`, made once with transformers and
    cached under `name`, with the tests' byte-level tokenizer (benchmark prompts are token ids)."""
    path = CACHE / name
    if (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import write_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).to(getattr(torch, dtype)).save_pretrained(path)
    write_tokenizer(path)
    return path
