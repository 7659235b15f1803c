"""Which format each weight matrix is kept in, decided once at load and logged per source format.

- Dense checkpoint weights stay dense in the model's dtype, or with `--quantization int8|int4` are
  quantized once here (int8: one scale per output channel; int4: groups of `group_size`).
- GGUF matrices that a torch kernel computes directly are kept as they are: Q4_0, Q4_1 and Q4_K
  are int4 in groups of 32 (Q4_1/Q4_K's offset m becomes the kernel's zero m + 8d, rounded once
  to bf16; Q4_0's zero is exactly 0).
- Q8_0 has one scale per 32 weights, but the int8 kernel takes one per output channel, so a Q8_0
  matrix is requantized per channel (one more rounding; one pass of the int8 kernel, which reads
  1 byte a weight as fast as the int4 kernel reads half a byte). As an embedding / LM head it also
  keeps its exact rows: lookups and the LM head's top logits are computed from them
  (docs/quantization.md measures why).
- Q5_K and Q6_K have no torch kernel (5 and 6 bits): they are dequantized at load into the model's
  dtype, and the log states the memory that costs.
- Embedding tables are looked up in whatever format they are kept (rows unpacked on the fly); a dense
  table quantized at load becomes int8, not int4: the (often tied) LM head is the most sensitive matmul.
- "dense" dequantizes everything at load, GGUF files included: the exact model, for reference.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from chatscale.models.quant.linear import INT4_GROUPS, DenseLinear, Int8Linear, Linear, quantized_linear
from chatscale.models.quant.weight import QuantizedWeight, quantize_int4, quantize_int8

log = logging.getLogger("chatscale.models")

QUANTIZATIONS = ("int8", "int4")  # and "dense": every weight dequantized at load, GGUF files too
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
        if self.quantization not in (None, "dense", *QUANTIZATIONS):
            raise ValueError(f"unknown quantization {self.quantization!r}; "
                             f"choose from dense, {', '.join(QUANTIZATIONS)}")
        if self.quantization == "int4" and self.group_size not in INT4_GROUPS:
            raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {self.group_size}")

    def linear(self, parts: list[Weight], bias: torch.Tensor | None = None) -> Linear:
        """One fused linear layer from its parts (q, k, v; gate, up; or a single matrix)."""
        bias = None if bias is None else bias.to(device=self.device, dtype=self.dtype)
        quantized = [p for p in parts if isinstance(p, QuantizedWeight)]
        if self.quantization != "dense" and len(quantized) == len(parts) and _same_format(quantized):
            w = QuantizedWeight.cat_rows(quantized)
            if _is_q8_groups(w):  # Q8_0: the int8 kernel takes one scale per output channel
                return self._record(parts, Int8Linear(quantize_int8(w.dequantize()).to(self.device), bias))
            if _has_kernel(w):
                return self._record(parts, quantized_linear(w.to(self.device), bias))
        dense = torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts])
        if self.quantization == "int8":
            return self._record(parts, Int8Linear(quantize_int8(dense).to(self.device), bias))
        if self.quantization == "int4" and dense.shape[0] % 16 == 0:
            return self._record(parts, quantized_linear(quantize_int4(dense, self.group_size).to(self.device), bias))
        return self._record(parts, DenseLinear(dense.to(device=self.device, dtype=self.dtype), bias))

    def embedding(self, weight: Weight) -> Linear:
        """An embedding table (and a tied LM head): as a linear layer, but int8 rather than int4 when a
        dense one is quantized (a row lookup reads it too, and the LM head is the most sensitive matmul),
        and a Q8_0 one keeps its exact rows beside the per-channel copy the matmul reads."""
        if isinstance(weight, torch.Tensor) and self.quantization in QUANTIZATIONS:
            return self._record([weight], Int8Linear(quantize_int8(weight).to(self.device)))
        if isinstance(weight, QuantizedWeight) and self.quantization != "dense" and _is_q8_groups(weight):
            layer = Int8Linear(quantize_int8(weight.dequantize()).to(self.device), exact=weight.to(self.device))
            return self._record([weight], layer)
        return self.linear([weight])

    def _record(self, parts: list[Weight], layer: Linear) -> Linear:
        source = _source(parts)
        entry = self.report[source]
        entry[0] += 1
        entry[1] = _describe(source, layer)
        entry[2] += sum(p.numel() * p.element_size() for p in layer.parameters())
        return layer

    def log_report(self, name: str) -> None:
        for source, (count, what, nbytes) in sorted(self.report.items()):
            log.info("%s: %d %s matrices %s, %.1f MiB", name, count, source, what, nbytes / 2**20)


def _source(parts: list[Weight]) -> str:
    names = sorted({p.source if isinstance(p, QuantizedWeight) else str(p.dtype).removeprefix("torch.")
                    for p in parts})
    return "+".join(names)


def _has_kernel(w: QuantizedWeight) -> bool:
    """4-bit groups the int4 kernel takes (Q4_0, Q4_1, Q4_K), or per-channel int8."""
    int4 = w.bits == 4 and w.group in INT4_GROUPS and w.shape[0] % 16 == 0
    return int4 or (w.bits == 8 and w.group == w.shape[1] and w.offset is None)


def _is_q8_groups(w: QuantizedWeight) -> bool:
    return w.bits == 8 and w.offset is None and w.group < w.shape[1]


def _same_format(parts: list[QuantizedWeight]) -> bool:
    first = parts[0]
    return all((p.bits, p.group, p.offset is None) == (first.bits, first.group, first.offset is None) for p in parts)


def _describe(source: str, layer: Linear) -> str:
    if isinstance(layer, DenseLinear):
        dtype = str(layer.weight.dtype).removeprefix("torch.")
        return f"dense {dtype}" + (" (dequantized at load: no torch kernel for this type)"
                                   if source.startswith(("Q5", "Q6")) else "")
    if layer.kind == "int4":
        return f"kept int4 (weight-only kernel, groups of {layer.group})"
    if source.startswith("Q8"):
        exact = ", exact rows kept for lookups and the LM head's top logits" if layer.exact else ""
        return f"requantized to int8 with one scale per output channel (weight-only kernel){exact}"
    return "int8, one scale per output channel (weight-only kernel)"
