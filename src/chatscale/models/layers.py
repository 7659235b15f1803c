"""Building blocks shared by the dense and mixture-of-experts decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused RMSNorm: one kernel instead of six, which matters on a launch-bound decode step."""
    return F.rms_norm(x, weight.shape, weight, eps)


def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class DenseMLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = param(2 * intermediate, hidden, dtype=dtype)
        self.down = param(hidden, intermediate, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)

    def weight_slots(self, prefix: str = "mlp.") -> dict[str, torch.Tensor]:
        i = self.intermediate
        return {f"{prefix}gate_proj.weight": self.gate_up[:i], f"{prefix}up_proj.weight": self.gate_up[i:],
                f"{prefix}down_proj.weight": self.down}
