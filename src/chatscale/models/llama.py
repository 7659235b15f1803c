"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

q/k/v and gate/up are fused into one matmul each at load time: on a bandwidth-bound step every
separate weight read costs a kernel launch and a pass over the activations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from chatscale.models.attention import AttentionMetadata, paged_attention
from chatscale.models.config import ModelConfig
from chatscale.models.layers import DenseMLP, param, rms_norm
from chatscale.models.moe import SparseMoE
from chatscale.models.rope import RotaryEmbedding, apply_rotary


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, index: int) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_size, self.kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.qkv_weight = param(self.q_size + 2 * self.kv_size, h, dtype=dtype)
        self.qkv_bias = param(self.q_size + 2 * self.kv_size, dtype=dtype) if cfg.attention_bias else None
        self.o_weight = param(h, self.q_size, dtype=dtype)
        self.mlp = SparseMoE(cfg, dtype) if cfg.is_moe_layer(index) else DenseMLP(h, cfg.intermediate_size, dtype)
        self.input_norm = param(h, dtype=dtype)
        self.post_attention_norm = param(h, dtype=dtype)
        self.q_norm = param(hd, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = param(hd, dtype=dtype) if cfg.qk_norm else None
        self.scale = hd**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        eps = cfg.rms_norm_eps
        qkv = F.linear(rms_norm(x, self.input_norm, eps), self.qkv_weight, self.qkv_bias)
        heads = qkv.view(t, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        qk, v = heads[:, : cfg.num_heads + cfg.num_kv_heads], heads[:, cfg.num_heads + cfg.num_kv_heads:]
        if self.q_norm is not None:
            qk = torch.cat([rms_norm(qk[:, : cfg.num_heads], self.q_norm, eps),
                            rms_norm(qk[:, cfg.num_heads:], self.k_norm, eps)], dim=1)
        qk = apply_rotary(qk, cos, sin)  # q and k rotated in one pass
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale)
        x = x + F.linear(attn.reshape(t, self.q_size), self.o_weight)
        return x + self.mlp(rms_norm(x, self.post_attention_norm, eps))

    def weight_slots(self) -> dict[str, torch.Tensor]:
        """HF parameter name (within the layer) -> the view of our fused parameters it fills."""
        q, kv = self.q_size, self.kv_size
        slots = {
            "self_attn.q_proj.weight": self.qkv_weight[:q], "self_attn.k_proj.weight": self.qkv_weight[q:q + kv],
            "self_attn.v_proj.weight": self.qkv_weight[q + kv:], "self_attn.o_proj.weight": self.o_weight,
            "input_layernorm.weight": self.input_norm, "post_attention_layernorm.weight": self.post_attention_norm,
        }
        if self.qkv_bias is not None:
            slots |= {"self_attn.q_proj.bias": self.qkv_bias[:q], "self_attn.k_proj.bias": self.qkv_bias[q:q + kv],
                      "self_attn.v_proj.bias": self.qkv_bias[q + kv:]}
        if self.q_norm is not None:
            slots |= {"self_attn.q_norm.weight": self.q_norm, "self_attn.k_norm.weight": self.k_norm}
        return slots | self.mlp.weight_slots()


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: silu")
        self.cfg = cfg
        self.embed = param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, i) for i in range(cfg.num_layers))
        self.norm = param(cfg.hidden_size, dtype=dtype)
        self.lm_head = self.embed if cfg.tie_word_embeddings else param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.to(device)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling, dtype, device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rope.tables(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def expert_tokens(self) -> torch.Tensor | None:
        """Tokens each expert got in the last forward, [MoE layers, experts] (the 'expert batch
        size'); None for a dense model. A device tensor: it travels with the step's sampled tokens."""
        moe = [layer.mlp.last_tokens_per_expert for layer in self.layers if isinstance(layer.mlp, SparseMoE)]
        return torch.stack(moe) if moe else None

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused layout, checking every shape and that none is missing."""
        cfg = self.cfg
        slots = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not cfg.tie_word_embeddings:
            slots["lm_head.weight"] = self.lm_head
        for n, layer in enumerate(self.layers):
            slots |= {f"model.layers.{n}.{k}": v for k, v in layer.weight_slots().items()}
        seen: set[str] = set()
        for name, tensor in weights:
            target = slots.get(name)
            if target is None:
                if (name == "lm_head.weight" and cfg.tie_word_embeddings) or "rotary_emb" in name:
                    continue  # a tied copy some checkpoints store anyway; precomputed RoPE tables
                raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
            if target.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"config expects {tuple(target.shape)}")
            target.copy_(tensor)
            seen.add(name)
        missing = slots.keys() - seen
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
