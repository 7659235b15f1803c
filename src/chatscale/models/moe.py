"""Sparse Mixture-of-Experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE).

Each token is routed to its top-k experts. Tokens are grouped by expert (one sort), so each
expert runs one matmul over all of its tokens: the seeds' "expert batch size" is exactly the
number of rows each of those matmuls gets, recorded per step in `last_tokens_per_expert`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chatscale.models.config import ModelConfig
from chatscale.models.layers import DenseMLP, param


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.mixtral = cfg.architecture == "MixtralForCausalLM"
        self.intermediate = i
        self.router = param(e, h, dtype=dtype)
        self.gate_up = param(e, 2 * i, h, dtype=dtype)  # per expert: gate rows, then up rows
        self.down = param(e, h, i, dtype=dtype)
        shared = cfg.shared_expert_intermediate_size
        self.shared = DenseMLP(h, shared, dtype) if shared else None
        self.shared_gate = param(1, h, dtype=dtype) if shared else None
        self.last_tokens_per_expert: list[int] = [0] * e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x, self.router).softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token_of = order // self.top_k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat, minlength=self.router.shape[0]).tolist()
        self.last_tokens_per_expert = counts
        rows = x[token_of]
        scale = weights.flatten()[order, None]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):  # a loop over experts, each a batched matmul over its tokens
            if n == 0:
                continue
            seg = slice(start, start + n)
            gate, up = F.linear(rows[seg], self.gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, token_of[seg], F.linear(F.silu(gate) * up, self.down[e]) * scale[seg])
            start += n
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x)
        return out

    def weight_slots(self) -> dict[str, torch.Tensor]:
        i = self.intermediate
        if self.mixtral:
            names, prefix = ("w1", "w3", "w2"), "block_sparse_moe."
            slots = {f"{prefix}gate.weight": self.router}
        else:
            names, prefix = ("gate_proj", "up_proj", "down_proj"), "mlp."
            slots = {f"{prefix}gate.weight": self.router}
        for e in range(self.router.shape[0]):
            gate, up, down = (f"{prefix}experts.{e}.{n}.weight" for n in names)
            slots |= {gate: self.gate_up[e, :i], up: self.gate_up[e, i:], down: self.down[e]}
        if self.shared is not None:
            slots |= self.shared.weight_slots("mlp.shared_expert.")
            slots["mlp.shared_expert_gate.weight"] = self.shared_gate
        return slots
