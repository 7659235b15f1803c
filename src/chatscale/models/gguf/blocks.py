"""GGUF tensor data -> torch: float types as dense tensors, block-quantized types as QuantizedWeight.

Each decoder reads llama.cpp's block layout (see gguf-py's quants.py) and returns the integers and
their per-group scale and offset, so `QuantizedWeight.dequantize()` reproduces the reference
dequantization bit for bit: the same fp32 products and sums in the same order. Q4_0 is stored as
-8..7 with no offset (d * (q - 8), as the reference writes it, keeps the sign of a zero).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from chatscale.models.quant.weight import QuantizedWeight

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
QUANT_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
SUPPORTED = (*FLOAT_TYPES, *QUANT_TYPES)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as fp32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each run of `chunk` bytes holds `chunk` values in its low nibbles, then `chunk` in its high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, chunk)
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, -1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block, from its 12 packed bytes."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mins.float()


def _q4_0(b: torch.Tensor) -> tuple:
    return _nibbles(b[:, 2:], 16).to(torch.int8) - 8, _half(b, 0), None, 32, 4


def _q4_1(b: torch.Tensor) -> tuple:
    return _nibbles(b[:, 4:], 16), _half(b, 0), _half(b, 2), 32, 4


def _q8_0(b: torch.Tensor) -> tuple:
    return b[:, 2:].contiguous().view(torch.int8), _half(b, 0), None, 32, 8


def _q4_k(b: torch.Tensor) -> tuple:
    sc, mins = _k_scales(b[:, 4:16])
    return _nibbles(b[:, 16:], 32), _half(b, 0) * sc, -(_half(b, 2) * mins), 32, 4


def _q5_k(b: torch.Tensor) -> tuple:
    sc, mins = _k_scales(b[:, 4:16])
    n = b.shape[0]
    high = (b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1
    q = _nibbles(b[:, 48:], 32) | (high.reshape(n, -1) << 4)
    return q, _half(b, 0) * sc, -(_half(b, 2) * mins), 32, 5


def _q6_k(b: torch.Tensor) -> tuple:
    n = b.shape[0]
    low = _nibbles(b[:, :128], 64)
    high = (b[:, 128:192].reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = (low | (high.reshape(n, -1) << 4)).to(torch.int8) - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return q, _half(b, 208) * scales, None, 16, 6


DECODERS = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q8_0: _q8_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}


def decode(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor | QuantizedWeight:
    """One tensor's bytes (as gguf's reader maps them) -> fp32 dense, or a QuantizedWeight when 2-D and
    block-quantized (a block-quantized vector or 3-D stack is dequantized: norms, experts)."""
    if qtype in FLOAT_TYPES:
        return torch.from_numpy(np.array(data)).view(FLOAT_TYPES[qtype]).float().reshape(shape)
    if qtype not in DECODERS:
        raise ValueError(f"unsupported tensor type {qtype.name}")
    block, size = GGML_QUANT_SIZES[qtype]
    raw = torch.from_numpy(np.array(data).reshape(-1, size))
    q, scale, offset, group, bits = DECODERS[qtype](raw)
    rows, k = int(np.prod(shape[:-1])), shape[-1]
    weight = QuantizedWeight(q.reshape(rows, k).to(torch.int8), scale.reshape(rows, k // group),
                             None if offset is None else offset.reshape(rows, k // group), group, bits, qtype.name)
    return weight if len(shape) == 2 else weight.dequantize().reshape(shape)
