"""Sparse Mixture-of-Experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE).

Each token is routed to its top-k experts. Tokens are grouped by expert (one sort) and every
expert's matmul runs in one grouped matmul (`torch._grouped_mm`, offsets from a bincount): no
per-expert loop and nothing read back to the host, so a step stays one graph with one sync. The
seeds' "expert batch size" is exactly the rows each expert's group gets, kept per step as a
tensor in `last_tokens_per_expert` (read after the step's sync).
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
        self.last_tokens_per_expert = torch.zeros(e, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x, self.router).softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token_of = order // self.top_k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat, minlength=self.router.shape[0])
        self.last_tokens_per_expert = counts
        rows = x[token_of]
        scale = weights.flatten()[order, None]
        ends = counts.cumsum(0).to(torch.int32)  # each expert's rows end here in `rows`
        gate, up = torch._grouped_mm(rows, self.gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        expert_out = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=ends)
        out = torch.zeros_like(x).index_add_(0, token_of, expert_out * scale)
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
