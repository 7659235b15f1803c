"""Integer weights with per-group affine parameters: the one form every quantized weight passes through.

`W[n, k] = scale[n, k // group] * q[n, k] + offset[n, k // group]`, in fp32. GGUF blocks (Q4_0,
Q4_1, Q8_0, the K-quants) decode into it exactly, `--quantization` produces it from dense weights,
and the kernels' packed layouts are made from it. It is kept unpacked until the end because it
splits exactly: along output rows anywhere (fusing q/k/v, column-parallel shards) and along the
input at group boundaries (row-parallel shards) — tensor parallelism splits this form, then packs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # int8 [N, K]: signed (-2^(bits-1)..) when symmetric, else unsigned (0..2^bits - 1)
    scale: torch.Tensor  # fp32 [N, K // group]
    offset: torch.Tensor | None  # fp32 [N, K // group]; None: symmetric
    group: int  # weights per scale along the input (K for one scale per output channel)
    bits: int  # width of q: 4, 5, 6 or 8
    source: str = ""  # the format it came from (Q4_1, int4, ...), for the load log

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if k % self.group or self.scale.shape != (n, k // self.group):
            raise ValueError(f"{self.source or 'quantized weight'}: scales {tuple(self.scale.shape)} do not fit "
                             f"{n}x{k} weights in groups of {self.group}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def qmin(self) -> int:
        """The smallest integer q can hold: symmetric formats are signed, asymmetric ones unsigned."""
        return -(1 << (self.bits - 1)) if self.offset is None else 0

    def dequantize(self) -> torch.Tensor:
        """fp32 weights, rounded exactly as llama.cpp's reference: one product, then one sum."""
        n, k = self.q.shape
        groups = self.q.view(n, k // self.group, self.group).float()
        w = groups * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k)

    def to(self, device: torch.device) -> "QuantizedWeight":
        off = None if self.offset is None else self.offset.to(device)
        return QuantizedWeight(self.q.to(device), self.scale.to(device), off, self.group, self.bits, self.source)

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end): a part of a fused matrix, or a column-parallel shard."""
        off = None if self.offset is None else self.offset[start:end]
        return QuantizedWeight(self.q[start:end], self.scale[start:end], off, self.group, self.bits, self.source)

    def columns(self, start: int, end: int) -> "QuantizedWeight":
        """Input columns [start, end) (a row-parallel shard); they must fall on group boundaries, except
        that one scale per output channel (a group as wide as the row) covers any columns."""
        if self.group == self.q.shape[1]:
            return QuantizedWeight(self.q[:, start:end], self.scale, self.offset, end - start, self.bits, self.source)
        if start % self.group or end % self.group:
            raise ValueError(f"columns [{start}, {end}) cut a group of {self.group} weights")
        g0, g1 = start // self.group, end // self.group
        off = None if self.offset is None else self.offset[:, g0:g1]
        return QuantizedWeight(self.q[:, start:end], self.scale[:, g0:g1], off, self.group, self.bits, self.source)

    @staticmethod
    def cat_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack parts along the output (q, k, v into qkv); they must share a format."""
        first = parts[0]
        if any((p.group, p.bits, p.offset is None) != (first.group, first.bits, first.offset is None) for p in parts):
            raise ValueError("cannot fuse weights quantized differently: " + ", ".join(p.source for p in parts))
        offset = None if first.offset is None else torch.cat([p.offset for p in parts])
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offset,
                               first.group, first.bits, first.source)


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each positive x, as fp32: the kernels take bf16 scales, so choosing
    them bf16 first keeps every weight within half a step of its level."""
    y = x.to(torch.bfloat16)
    up = (y.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(y.float() < x, up, y).float()


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8, one (bf16) scale per output channel (what `_weight_int8pack_mm` takes)."""
    w = w.float()
    scale = _bf16_at_least(w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127)
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(q, scale, None, w.shape[1], 8, "int8")


def quantize_int4(w: torch.Tensor, group: int) -> QuantizedWeight:
    """Asymmetric int4 in groups of `group` inputs: 16 levels from the group's min to its max, with the
    bf16 scale and zero the kernel computes with (w = (q - 8) * scale + zero)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 group size {group} does not divide the input size {k}; choose one that does")
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = _bf16_at_least((hi - lo).clamp_min(1e-30) / 15)
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.int8)
    return QuantizedWeight(q.view(n, k), scale, zero - 8 * scale, group, 4, "int4")
