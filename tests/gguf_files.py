"""Tiny GGUF files for tests, written with the `gguf` package from the tiny HF checkpoints.

They follow llama.cpp's converter where it matters to a reader: tensor names, q/k rows interleaved
for rope on the llama architecture, stacked experts, a byte-level BPE vocabulary with its merges,
control tokens typed as such, the chat template. Matrices are stored as `qtype` (F32, F16, Q8_0,
Q4_0, Q4_1: what gguf-py can quantize); vectors stay F32 as llama.cpp keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.torch import load_file

ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "block_sparse_moe.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
         "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
         "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
EXPERTS = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
           "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's two rope halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name: str) -> tuple[str, int | None, str]:
    """HF name -> (GGUF base name, expert index or None, suffix)."""
    base, suffix = name.rsplit(".", 1)
    if base in ("model.embed_tokens", "model.norm", "lm_head"):
        names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
        return names[base], None, suffix
    _, _, layer, rest = base.split(".", 3)
    if ".experts." in rest:
        _, _, expert, proj = rest.split(".")
        return f"blk.{layer}.{EXPERTS[proj]}", int(expert), suffix
    return f"blk.{layer}.{LAYER[rest]}", None, suffix


def write_gguf(hf_dir: Path, out: Path, qtype: T = T.F32) -> Path:
    cfg = json.loads((hf_dir / "config.json").read_text())
    hf_arch = cfg["architectures"][0]
    arch = ARCH[hf_arch]
    w = GGUFWriter(str(out), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        if arch == "qwen3moe":
            w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob")))
    _add_tokenizer(w, hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    stacked: dict[str, dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        base, expert, suffix = _gguf_name(name)
        a = t.float().numpy()
        if base.endswith("ffn_gate_inp_shexp"):
            a = a.reshape(-1)  # llama.cpp keeps the shared expert's gate as a vector
        if arch == "llama" and base.endswith(("attn_q", "attn_k")):
            a = _permute(a, heads if base.endswith("attn_q") else kv_heads)
        if expert is not None:
            stacked.setdefault(f"{base}.{suffix}", {})[expert] = a
            continue
        _add_tensor(w, f"{base}.{suffix}", a, qtype)
    for name, parts in stacked.items():
        _add_tensor(w, name, np.stack([parts[e] for e in range(len(parts))]), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_tensor(w: GGUFWriter, name: str, a: np.ndarray, qtype: T) -> None:
    if a.ndim == 1 or qtype == T.F32 or a.shape[-1] % 32:
        w.add_tensor(name, a.astype(np.float32))
    elif qtype == T.F16:
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, quants.quantize(a, qtype), raw_dtype=qtype)


def _add_tokenizer(w: GGUFWriter, hf_dir: Path) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab[config["eos_token"]])
    w.add_pad_token_id(vocab[config["pad_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(config["chat_template"])


def hf_from_gguf(gguf: Path) -> torch.nn.Module:
    """transformers' own GGUF loading (dequantized to fp32): the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
