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
from chatscale.models.rope import RotaryEmbedding, apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused RMSNorm: one kernel instead of six, which matters on a launch-bound decode step."""
    return F.rms_norm(x, weight.shape, weight, eps)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_size, self.kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.qkv_weight = _param(self.q_size + 2 * self.kv_size, h, dtype=dtype)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size, dtype=dtype) if cfg.attention_bias else None
        self.o_weight = _param(h, self.q_size, dtype=dtype)
        self.gate_up_weight = _param(2 * cfg.intermediate_size, h, dtype=dtype)
        self.down_weight = _param(h, cfg.intermediate_size, dtype=dtype)
        self.input_norm = _param(h, dtype=dtype)
        self.post_attention_norm = _param(h, dtype=dtype)
        self.q_norm = _param(hd, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = _param(hd, dtype=dtype) if cfg.qk_norm else None
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
        x = x + F.linear(attn.view(t, self.q_size), self.o_weight)
        gate, up = F.linear(rms_norm(x, self.post_attention_norm, eps), self.gate_up_weight).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down_weight)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: silu")
        self.cfg = cfg
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, dtype=dtype)
        self.lm_head = self.embed if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.to(device)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling, dtype, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rope.tables(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused layout, checking every shape and that none is missing."""
        cfg = self.cfg
        q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        fused = {  # HF suffix -> (our parameter, first row, rows; None: the whole parameter)
            "self_attn.q_proj.weight": ("qkv_weight", 0, q), "self_attn.k_proj.weight": ("qkv_weight", q, kv),
            "self_attn.v_proj.weight": ("qkv_weight", q + kv, kv), "self_attn.q_proj.bias": ("qkv_bias", 0, q),
            "self_attn.k_proj.bias": ("qkv_bias", q, kv), "self_attn.v_proj.bias": ("qkv_bias", q + kv, kv),
            "mlp.gate_proj.weight": ("gate_up_weight", 0, i), "mlp.up_proj.weight": ("gate_up_weight", i, i),
            "self_attn.o_proj.weight": ("o_weight", 0, None), "mlp.down_proj.weight": ("down_weight", 0, None),
            "input_layernorm.weight": ("input_norm", 0, None),
            "post_attention_layernorm.weight": ("post_attention_norm", 0, None),
            "self_attn.q_norm.weight": ("q_norm", 0, None), "self_attn.k_norm.weight": ("k_norm", 0, None),
        }
        top = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not cfg.tie_word_embeddings:
            top["lm_head.weight"] = self.lm_head
        expected = set(top) | {
            f"model.layers.{n}.{suffix}"
            for n in range(cfg.num_layers) for suffix, (attr, _, _) in fused.items()
            if getattr(self.layers[n], attr) is not None
        }
        seen: set[str] = set()
        for name, tensor in weights:
            if name in top:
                target, offset, size = top[name], 0, None
            elif name.startswith("model.layers."):
                n, suffix = name[len("model.layers."):].split(".", 1)
                if suffix not in fused or int(n) >= cfg.num_layers:
                    raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
                attr, offset, size = fused[suffix]
                target = getattr(self.layers[int(n)], attr)
                if target is None:
                    raise ValueError(f"unexpected weight {name!r}: the config does not enable it")
            elif name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store the copy anyway
            elif "rotary_emb" in name:
                continue
            else:
                raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
            rows = target if size is None else target[offset: offset + size]
            if rows.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"config expects {tuple(rows.shape)}")
            rows.copy_(tensor)
            seen.add(name)
        missing = expected - seen
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
