"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

q/k/v and gate/up are fused into one matmul each at load time: on a bandwidth-bound step every
separate weight read costs a kernel launch and a pass over the activations. Each fused matmul is a
`Linear` layer (models/quant/linear.py) holding its weights dense or weight-only quantized.

Under tensor parallelism (`tp`) the same classes hold one rank's shard: `cfg` is the rank's shape
(its heads, its slice of each intermediate; distributed/sharding.py), the row-parallel o and down
outputs are all-reduced, and the vocabulary-parallel embedding and LM head go through the group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from chatscale.models.attention import AttentionMetadata, paged_attention
from chatscale.models.config import ModelConfig
from chatscale.models.layers import DenseMLP, FusedSlot, SlotPart, param, rms_norm
from chatscale.models.moe import SparseMoE
from chatscale.models.quant.linear import DenseLinear, Linear
from chatscale.models.quant.policy import Weight, WeightFormat
from chatscale.models.quant.weight import QuantizedWeight
from chatscale.models.rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from chatscale.distributed.group import TensorParallelGroup


def _stored_bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, index: int, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.cfg, self.tp = cfg, tp
        self.q_size, self.kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.qkv: Linear | None = None  # set by loading: dense or quantized
        self.o: Linear | None = None
        self._qkv = FusedSlot(self, "qkv", [self.q_size, self.kv_size, self.kv_size], h, cfg.attention_bias)
        self._o = FusedSlot(self, "o", [h], self.q_size)
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
        qkv = self.qkv(rms_norm(x, self.input_norm, eps))
        heads = qkv.view(t, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        qk, v = heads[:, : cfg.num_heads + cfg.num_kv_heads], heads[:, cfg.num_heads + cfg.num_kv_heads:]
        if self.q_norm is not None:
            qk = torch.cat([rms_norm(qk[:, : cfg.num_heads], self.q_norm, eps),
                            rms_norm(qk[:, cfg.num_heads:], self.k_norm, eps)], dim=1)
        qk = apply_rotary(qk, cos, sin)  # q and k rotated in one pass
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]
        attn = paged_attention(q, k, v, kv_cache, meta, self.scale)
        x = x + self._reduce(self.o(attn.reshape(t, self.q_size)))
        return x + self._reduce(self.mlp(rms_norm(x, self.post_attention_norm, eps)))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's output: this rank's partial sum, all-reduced under tensor parallelism."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def weight_slots(self) -> dict[str, torch.Tensor | SlotPart]:
        """HF parameter name (within the layer) -> the parameter, or the fused layer's part, it fills."""
        proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        biases = [f"{p}.bias" for p in proj] if self._qkv.has_bias else None
        slots = self._qkv.parts([f"{p}.weight" for p in proj], biases)
        slots |= self._o.parts(["self_attn.o_proj.weight"])
        slots |= {"input_layernorm.weight": self.input_norm,
                  "post_attention_layernorm.weight": self.post_attention_norm}
        if self.q_norm is not None:
            slots |= {"self_attn.q_norm.weight": self.q_norm, "self_attn.k_norm.weight": self.k_norm}
        return slots | self.mlp.weight_slots()


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: silu")
        self.cfg, self.tp = cfg, tp
        start, end = (0, cfg.vocab_size) if tp is None else tp.shard.vocab_range
        vocab_rows = end - start  # a vocabulary-parallel rank's rows of the embedding and LM head
        self.dtype, self.device = dtype, device  # of activations, norms and the KV cache
        # Set by loading, dense or quantized; a tied LM head is the embedding table itself.
        self.embed: Linear | None = None
        self.lm_head: Linear | None = None
        tied = ("embed", "lm_head") if cfg.tie_word_embeddings else ("embed",)
        self._embed = FusedSlot(self, tied, [vocab_rows], cfg.hidden_size, embedding=True)
        self._lm_head = None if cfg.tie_word_embeddings else FusedSlot(self, "lm_head", [vocab_rows],
                                                                       cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, i, tp) for i in range(cfg.num_layers))
        self.norm = param(cfg.hidden_size, dtype=dtype)
        self.to(device)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling, dtype, device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        x = self.embed.embed(input_ids, self.dtype) if self.tp is None else self.tp.embed(self.embed, input_ids,
                                                                                          self.dtype)
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
        logits = self.lm_head.logits(hidden)
        return logits if self.tp is None else self.tp.gather_logits(logits)

    def weight_bytes(self) -> int:
        """Bytes of weights a forward reads (a tied table counted once): quantized layers at their
        packed size."""
        return _stored_bytes(self.parameters())

    def resident_bytes(self) -> int:
        """Bytes the weights hold in memory: weight_bytes() plus the oneDNN-prepacked copies of dense
        CPU layers (models/quant/linear.py)."""
        packed = [m.onednn_weight for m in self.modules()
                  if isinstance(m, DenseLinear) and m.onednn_weight is not None]
        return self.weight_bytes() + _stored_bytes(packed)

    def weight_storage(self) -> tuple[float, float, float]:
        """Stored bytes per weight of (the shared weights, an embedding value, the planner's 'expert'
        weights: routed experts, or a dense model's MLPs), for the per-step bytes the metrics count
        (step_work.WeightBytes)."""
        moe = [m for m in self.modules() if isinstance(m, SparseMoE)]
        if moe:
            experts = [p for m in moe for p in (m.gate_up, m.down)]
            expert = sum(p.numel() for p in experts), _stored_bytes(experts)
        else:
            mlps = [lin for m in self.modules() if isinstance(m, DenseMLP) for lin in (m.gate_up, m.down)]
            expert = sum(m.num_weights for m in mlps), _stored_bytes(p for m in mlps for p in m.parameters())
        table = self.embed.num_weights, _stored_bytes(self.embed.parameters())
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        in_linears = {id(p) for m in linears for p in m.parameters()}
        values = sum(m.num_weights for m in linears) + sum(p.numel() for p in self.parameters()
                                                           if id(p) not in in_linears)
        untied = (0, 0) if self.cfg.tie_word_embeddings else table
        shared = (values - expert[0] - untied[0], self.weight_bytes() - expert[1] - untied[1])
        return shared[1] / shared[0], table[1] / table[0], expert[1] / expert[0]

    def load_weights(self, weights: Iterable[tuple[str, Weight]], fmt: WeightFormat | None = None) -> None:
        """Put HF-named tensors into the fused layout, checking every shape and that none is missing.
        Fused linear layers are built (dense or quantized, by `fmt`) as soon as all their parts are in."""
        cfg = self.cfg
        fmt = fmt or WeightFormat(self.dtype, self.device)
        slots: dict[str, torch.Tensor | SlotPart] = {"model.norm.weight": self.norm}
        slots |= self._embed.parts(["model.embed_tokens.weight"])
        if self._lm_head is not None:
            slots |= self._lm_head.parts(["lm_head.weight"])
        for n, layer in enumerate(self.layers):
            slots |= {f"model.layers.{n}.{k}": v for k, v in layer.weight_slots().items()}
        seen: set[str] = set()
        for name, tensor in weights:
            target = slots.get(name)
            if target is None:
                if (name == "lm_head.weight" and cfg.tie_word_embeddings) or "rotary_emb" in name:
                    continue  # a tied copy some checkpoints store anyway; precomputed RoPE tables
                raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"config expects {tuple(target.shape)}")
            if isinstance(target, SlotPart):
                target.receive(tensor)
                if target.slot.complete:
                    target.slot.build(fmt)
            else:
                target.copy_(tensor.dequantize() if isinstance(tensor, QuantizedWeight) else tensor)
            seen.add(name)
        missing = slots.keys() - seen
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        fmt.log_report(cfg.architecture)
