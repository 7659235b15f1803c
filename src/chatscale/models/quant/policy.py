"""Which format each weight matrix is kept in, decided once at load and logged per source format.

- Dense checkpoint weights stay dense in the model's dtype, or with `--quantization int8|int4` are
  quantized once here (int8: one scale per output channel; int4: groups of `group_size`).
- GGUF matrices that a torch kernel computes directly are kept as they are: Q4_0, Q4_1 and Q4_K
  are int4 in groups of 32 (Q4_1/Q4_K's offset m becomes the kernel's zero m + 8d, rounded once
  to bf16; Q4_0's zero is exactly 0).
- Q8_0 has one scale per 32 weights, but the int8 kernel takes one per output channel: Q8_0 is
  requantized per channel (one more rounding, error measured in docs/quantization.md) rather than
  dequantized, which would double its bytes and so the time every decode step spends reading it.
- Q5_K and Q6_K have no torch kernel (5 and 6 bits): they are dequantized at load into the model's
  dtype, and the log states the memory that costs.
- Embedding tables (the tied LM head included) are per-row int8 when quantized, so a lookup reads
  one int8 row and the tied LM head is the same tensor; int4 has no cheap row lookup.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from chatscale.models.quant.linear import INT4_GROUPS, DenseLinear, Int8Linear, Linear, quantized_linear
from chatscale.models.quant.weight import QuantizedWeight, quantize_int4, quantize_int8

log = logging.getLogger("chatscale.models")

QUANTIZATIONS = ("int8", "int4")
Weight = torch.Tensor | QuantizedWeight


@dataclass
class WeightFormat:
    dtype: torch.dtype
    device: torch.device
    quantization: str | None = None  # None: keep dense weights dense
    group_size: int = 32
    # source format -> [matrices, what became of them, bytes resident]
    report: dict[str, list] = field(default_factory=lambda: defaultdict(lambda: [0, "", 0]))

    def __post_init__(self) -> None:
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
        if self.quantization == "int4" and self.group_size not in INT4_GROUPS:
            raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {self.group_size}")

    def linear(self, parts: list[Weight], bias: torch.Tensor | None = None) -> Linear:
        """One fused linear layer from its parts (q, k, v; gate, up; or a single matrix)."""
        quantized = [p for p in parts if isinstance(p, QuantizedWeight)]
        source = _source(parts)
        bias = None if bias is None else bias.to(device=self.device, dtype=self.dtype)
        if len(quantized) == len(parts) and _same_format(quantized):
            w = QuantizedWeight.cat_rows(quantized).to(self.device)
            if w.bits == 8 and w.group != w.shape[1]:
                layer = self._per_channel_int8(w, bias)
            elif w.bits == 4 and w.shape[0] % 16 == 0:
                layer = quantized_linear(w, bias)
            else:
                layer = self._from_dense(w.dequantize(), bias)
        else:
            dense = torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts])
            layer = self._from_dense(dense, bias)
        return self._record(source, layer)

    def embedding(self, weight: Weight) -> Linear:
        """An embedding table (and a tied LM head): dense, or per-row int8 when quantized."""
        source = _source([weight])
        if isinstance(weight, QuantizedWeight):
            layer = self._per_channel_int8(weight, None)
        elif self.quantization:
            layer = Int8Linear(quantize_int8(weight).to(self.device))
        else:
            layer = DenseLinear(weight.to(device=self.device, dtype=self.dtype))
        return self._record(source, layer)

    def _from_dense(self, w: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        if self.quantization == "int8":
            return Int8Linear(quantize_int8(w).to(self.device), bias)
        if self.quantization == "int4" and w.shape[0] % 16 == 0:
            return quantized_linear(quantize_int4(w, self.group_size).to(self.device), bias)
        return DenseLinear(w.to(device=self.device, dtype=self.dtype), bias)

    def _per_channel_int8(self, w: QuantizedWeight, bias: torch.Tensor | None) -> Linear:
        return Int8Linear(quantize_int8(w.dequantize()).to(self.device), bias)

    def _record(self, source: str, layer: Linear) -> Linear:
        entry = self.report[source]
        entry[0] += 1
        entry[1] = _describe(source, layer, self.group_size)
        entry[2] += sum(p.numel() * p.element_size() for p in layer.parameters())
        return layer

    def log_report(self, name: str) -> None:
        for source, (count, what, nbytes) in sorted(self.report.items()):
            log.info("%s: %d %s matrices %s, %.1f MiB", name, count, source, what, nbytes / 2**20)


def _source(parts: list[Weight]) -> str:
    names = sorted({p.source if isinstance(p, QuantizedWeight) else str(p.dtype).removeprefix("torch.")
                    for p in parts})
    return "+".join(names)


def _same_format(parts: list[QuantizedWeight]) -> bool:
    first = parts[0]
    return all((p.bits, p.group, p.offset is None) == (first.bits, first.group, first.offset is None) for p in parts)


def _describe(source: str, layer: Linear, group: int) -> str:
    if isinstance(layer, DenseLinear):
        return f"dense {str(layer.weight.dtype).removeprefix('torch.')}" + (
            " (dequantized at load: no torch kernel for this type)" if source.startswith(("Q5", "Q6")) else "")
    if layer.kind == "int4":
        return f"kept int4 (weight-only kernel, groups of {layer.group})"
    if source.startswith("Q8"):
        return "requantized to int8 with one scale per output channel (weight-only kernel)"
    return "int8, one scale per output channel (weight-only kernel)"
