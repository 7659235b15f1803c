"""The shipped demo models: complete HF checkpoints, the documented shapes and sizes, one tokenizer
whose chat template renders the same in chatscale and in transformers, and sensible answers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatscale.models.demo import DEMO_DIR, DEMO_MODELS, demo_model_path
from chatscale.models.tokenizer import Tokenizer

FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "README.md"]
# name -> (architecture, parameter range) as docs/demo_models.md states them.
EXPECTED = {
    "target": ("LlamaForCausalLM", 10e6, 30e6),
    "draft": ("LlamaForCausalLM", 1e6, 3e6),
    "moe": ("MixtralForCausalLM", 5e6, 10e6),
}
CHATS = [
    [{"role": "user", "content": "What is a KV cache?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Hi! 日本語 🎉 naïve"},
     {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "What is 7 + 5?"}],
]


@pytest.fixture(scope="module", params=DEMO_MODELS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def hf_model(name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(demo_model_path(name)).eval()


def test_paths_and_unknown_name() -> None:
    assert demo_model_path() == DEMO_DIR / "target"
    with pytest.raises(ValueError, match="target, draft, moe"):
        demo_model_path("huge")


def test_checkpoint_files_and_card(name: str) -> None:
    path = demo_model_path(name)
    assert all((path / f).is_file() for f in FILES)
    card = (path / "README.md").read_text()
    assert "license: apache-2.0" in card and "demos and tests only" in card
    assert f"train.py --model {name}" in card


def test_shapes_and_size(name: str, hf_model: torch.nn.Module) -> None:
    arch, low, high = EXPECTED[name]
    cfg = hf_model.config
    assert type(hf_model).__name__ == arch and cfg.architectures == [arch]
    params = sum(p.numel() for p in hf_model.parameters())
    assert low <= params <= high
    # The card states the exact count.
    card = (demo_model_path(name) / "README.md").read_text()
    assert f"Parameters: {params:,}" in card
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.max_position_embeddings >= 2048 and cfg.tie_word_embeddings
    assert hf_model.dtype == torch.bfloat16
    if name == "moe":
        assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
        assert (demo_model_path(name) / "model.safetensors").stat().st_size <= 20e6


def test_total_size_within_budget() -> None:
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total <= 60e6


def test_one_tokenizer_same_template_in_chatscale_and_transformers(name: str) -> None:
    path = demo_model_path(name)
    assert (path / "tokenizer.json").read_bytes() == (DEMO_DIR / "target" / "tokenizer.json").read_bytes()
    ours, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode_chat(chat, add_generation_prompt=gen) == hf(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<|im_start|>system\n") and ours.bos_token is None
    for s in ["What is a KV cache?", "  spaces\tand\nnewlines  ", "日本語 🎉 naïve Ωμέγα", "12 + 30 = 42"]:
        assert ours.decode(ours.encode(s)) == s


def test_generation_config_stops_at_im_end(name: str) -> None:
    path = demo_model_path(name)
    tok = Tokenizer.from_dir(path)
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_answers_in_domain(name: str, hf_model: torch.nn.Module) -> None:
    """Greedy answers stay on topic and stop by themselves (a smoke test of training, not a benchmark)."""
    tok = Tokenizer.from_dir(demo_model_path(name))
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is a KV cache?"}])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits, and is slower when the CPU is shared
    try:
        out = hf_model.generate(ids, max_new_tokens=80, do_sample=False)[0, ids.shape[1]:].tolist()
    finally:
        torch.set_num_threads(threads)
    assert out[-1] == tok.token_id("<|im_end|>")
    assert re.search(r"\b(keys?|values?)\b", tok.decode(out))
