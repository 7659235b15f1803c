"""Which dtype dense layers compute in, stated once: `--dtype auto` decides per device, by measurement.

A GPU computes in bf16 (fp16 where it has no bf16). On a CPU a checkpoint stored in fp32 stays fp32
(16 bits would change its outputs: ask with --dtype bfloat16), and one stored in 16 bits is measured:
bf16 halves the bytes a decode step reads, but a CPU without native bf16 instructions (no
AVX512-BF16 or AMX) converts every element and runs slower than fp32, and even with them a
matrix-vector product (batch-1 decode, the bandwidth-bound case) may stream bf16 weights slower than
fp32 ones. So on a CPU with bf16 instructions the two are timed on a layer-sized matmul at batch 1
and 32, and bf16 is chosen only if it is faster at both; without them fp32 is chosen outright.
Quantized layers (weight-only int8/int4) keep their own activation dtype, whatever this says for
dense ones.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("chatscale.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def _matmul_seconds(dtype: torch.dtype, rows: int, size: int = 1024, repeats: int = 20) -> float:
    """Best time of a [rows, size] x [size, 4 * size] matmul: a decoder MLP's shape."""
    from chatscale.models.quant.linear import DenseLinear  # the layer serving would run

    layer = DenseLinear(torch.randn(4 * size, size).to(dtype))
    x = torch.randn(rows, size).to(dtype)
    layer(x)  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_compute_dtype() -> tuple[torch.dtype, str]:
    """The CPU's faster dense dtype for serving, and why (measured once per process)."""
    flags = cpu_flags()
    if not native_bf16(flags):
        return torch.float32, "this CPU has no bf16 instructions (AVX512-BF16/AMX): bf16 would be emulated"
    times = {dtype: [_matmul_seconds(dtype, rows) for rows in (1, 32)] for dtype in (torch.float32, torch.bfloat16)}
    faster = all(b < f for b, f in zip(times[torch.bfloat16], times[torch.float32]))
    ratios = ", ".join(f"batch {rows}: bf16 {b / f:.2f}x fp32's time"
                       for rows, b, f in zip((1, 32), times[torch.bfloat16], times[torch.float32]))
    return (torch.bfloat16 if faster else torch.float32), f"measured on a 1024x4096 matmul ({ratios})"


def compute_dtype(requested: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype dense layers compute (and the KV cache is stored) in."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unsupported dtype {requested!r}; choose from auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if checkpoint_dtype == "float32":
        return torch.float32
    dtype, why = cpu_compute_dtype()
    log.info("--dtype auto on this CPU: %s (the checkpoint stores %s); %s", str(dtype)[6:], checkpoint_dtype, why)
    return dtype
