"""torch's packed int4 layouts: packing for the weight-only kernels, and unpacking back on CPU.

The CPU kernel (`_weight_int4pack_mm_for_cpu`) takes weights packed by
`_convert_weight_to_int4pack_for_cpu`, whose layout follows the CPU's vector width: blocks of 64
output rows on AVX-512 (32 on AVX2 and plain builds), each stored input-major; in a full block
byte j of a column holds row j in its low nibble and row j + block/2 in its high one (plain builds
pair rows 2i and 2i+1), and a shorter last block pairs neighbouring rows. Unpacking is needed to
dequantize a layer for a large batch without keeping a second copy of its weights; it is checked
once per process against torch's own packing, and a build that packs otherwise keeps the kernel
at every batch size.

The CUDA kernel (`_weight_int4pack_mm`) takes a tiled int32 layout made from [N, K/2] bytes with
the even column in the high nibble; it has no unpacking here (GPU layers always use the kernel).
"""

from __future__ import annotations

import functools

import torch

CPU_BLOCK = {"AVX512": 64, "AVX2": 32}
_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # read once: compiled code cannot call it
BLOCK = CPU_BLOCK.get(_CAPABILITY, 32)
SPLIT_HALVES = _CAPABILITY in CPU_BLOCK  # vectorized builds pair row j with row j + block/2


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> the packed weights of this device's kernel."""
    if q.device.type == "cuda":
        k = q.shape[1]
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        pairs = (q[:, ::2].to(torch.uint8) << 4) | q[:, 1::2].to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The CPU-packed [N, K/2] bytes -> [N, K] uint8 values 0..15 (inverse of `pack`)."""
    block = BLOCK
    flat = packed.reshape(-1)
    out = torch.empty(n, k, dtype=torch.uint8)
    full = n // block
    if full:
        blocks = flat[: full * k * block // 2].view(full, k, block // 2)
        lo, hi = blocks & 15, blocks >> 4
        if SPLIT_HALVES:
            rows = torch.cat([lo, hi], dim=2)  # [full, K, block]: rows j then j + block/2
        else:
            rows = torch.stack([lo, hi], dim=3).view(full, k, block)
        out[: full * block] = rows.transpose(1, 2).reshape(full * block, k)
    tail = n - full * block
    if tail:
        rest = flat[full * k * block // 2:].view(k, tail // 2)
        out[full * block:] = torch.stack([rest & 15, rest >> 4], dim=2).view(k, tail).t()
    return out


def unpack_rows_cpu(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the CPU-packed [N, K/2] bytes -> [len(rows), K] uint8 values 0..15 (an embedding
    lookup reads only these)."""
    block, full = BLOCK, n // BLOCK
    tail = n - full * block
    nb, j = rows // block, rows % block
    in_full = nb < full
    half = block // 2
    if SPLIT_HALVES:
        col, high = torch.where(in_full, j % half, j // 2), torch.where(in_full, j >= half, j % 2 == 1)
    else:
        col, high = j // 2, j % 2 == 1
    width = torch.where(in_full, half, max(tail, 2) // 2)
    base = nb * k * half
    index = base[:, None] + torch.arange(k, device=rows.device)[None, :] * width[:, None] + col[:, None]
    return (packed.reshape(-1)[index] >> (4 * high.to(torch.uint8))[:, None]) & 15


@functools.cache
def cpu_unpack_works() -> bool:
    """Whether `unpack_cpu` inverts this torch build's CPU packing (full and short blocks)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64 + 48, 64), generator=g, dtype=torch.uint8)
    rows = torch.tensor([0, 31, 32, 63, 64, 65, 111])
    packed = pack(q)
    whole = torch.equal(unpack_cpu(packed, *q.shape), q)
    return whole and torch.equal(unpack_rows_cpu(packed, *q.shape, rows), q[rows])
