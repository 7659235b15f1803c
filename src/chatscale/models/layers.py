"""Building blocks shared by the dense and mixture-of-experts decoders."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chatscale.models.quant.linear import Linear
from chatscale.models.quant.policy import Weight, WeightFormat


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused RMSNorm: one kernel instead of six, which matters on a launch-bound decode step."""
    return F.rms_norm(x, weight.shape, weight, eps)


def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


@dataclass(eq=False)
class FusedSlot:
    """A linear layer still being loaded: the checkpoint matrices it fuses (q, k, v or gate, up, or
    just one), stacked along the output in order. Nothing is allocated until every part arrived;
    then the format policy builds the layer (dense or quantized) and it replaces `owner.attr`."""

    owner: nn.Module
    attr: str | tuple[str, ...]  # several: a tied embedding is also the LM head
    rows: list[int]
    in_features: int
    has_bias: bool = False
    embedding: bool = False  # a table rows are looked up in (int8 per row when quantized)
    weights: dict[int, Weight] = field(default_factory=dict)
    biases: dict[int, torch.Tensor] = field(default_factory=dict)

    def parts(self, names: list[str], bias_names: list[str] | None = None) -> dict[str, "SlotPart"]:
        slots = {n: SlotPart(self, i, False) for i, n in enumerate(names)}
        return slots | {n: SlotPart(self, i, True) for i, n in enumerate(bias_names or ())}

    @property
    def complete(self) -> bool:
        return len(self.weights) == len(self.rows) and (not self.has_bias or len(self.biases) == len(self.rows))

    def build(self, fmt: WeightFormat) -> None:
        weights = [self.weights[i] for i in range(len(self.rows))]
        if self.embedding:
            layer = fmt.embedding(weights[0])
        else:
            bias = torch.cat([self.biases[i] for i in range(len(self.rows))]) if self.has_bias else None
            layer = fmt.linear(weights, bias)
        for attr in (self.attr,) if isinstance(self.attr, str) else self.attr:
            setattr(self.owner, attr, layer)
        self.weights.clear()
        self.biases.clear()


@dataclass(eq=False)
class SlotPart:
    """One checkpoint matrix (or bias) of a FusedSlot."""

    slot: FusedSlot
    index: int
    is_bias: bool

    @property
    def shape(self) -> tuple[int, ...]:
        rows = self.slot.rows[self.index]
        return (rows,) if self.is_bias else (rows, self.slot.in_features)

    def receive(self, tensor: Weight) -> None:
        (self.slot.biases if self.is_bias else self.slot.weights)[self.index] = tensor


class DenseMLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up: Linear | None = None  # set by loading
        self.down: Linear | None = None
        self._gate_up = FusedSlot(self, "gate_up", [intermediate, intermediate], hidden)
        self._down = FusedSlot(self, "down", [hidden], intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def weight_slots(self, prefix: str = "mlp.") -> dict[str, SlotPart]:
        return (self._gate_up.parts([f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"])
                | self._down.parts([f"{prefix}down_proj.weight"]))
