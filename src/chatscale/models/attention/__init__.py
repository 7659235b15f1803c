"""Paged attention: new K/V go into cache pages, queries read their context from the pages.

One flat step layout (metadata.py) for every backend; backends, one file each, are chosen at
start-up (`--attention-backend`): `torch` (gathers pages, then SDPA/matmuls: the reference oracle,
any shape, any device) and `flex` (FlexAttention compiled by inductor: decode reads K/V from the
pages in place, on CPU and CUDA alike).
"""

from __future__ import annotations

import torch

from chatscale.models.attention.metadata import MAX_DECODE_QUERY, AttentionBackend, AttentionMetadata, DecodeStep

BACKENDS = ("torch", "flex")


def make_backend(name: str, device: torch.device, num_kv_slots: int, block_size: int,
                 sliding_window: int | None, compile: bool = True) -> AttentionBackend:
    """The backend `name`. "auto": flex on a GPU where it applies (and compiling is allowed: flex is
    fast only compiled); torch on a CPU, where inductor's flex kernel measured slower than gathering
    the pages (a fixed cost per call of the order of the whole decode attention; docs/benchmarks.md)."""
    if name == "auto":
        flex_fits = sliding_window is None and block_size >= MAX_DECODE_QUERY
        name = "flex" if flex_fits and compile and device.type == "cuda" else "torch"
    if name == "torch":
        from chatscale.models.attention.torch_ref import TorchAttention

        return TorchAttention(block_size, sliding_window)
    if name == "flex":
        if sliding_window is not None:
            raise ValueError("the flex attention backend has no sliding window yet; use --attention-backend torch")
        from chatscale.models.attention.flex import FlexAttention

        return FlexAttention(device, num_kv_slots, block_size)
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata | DecodeStep, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, KVH, slots, D]. Writes k, v to their slots,
    then returns each query's attention over its sequence's context: [T, H, D]."""
    write_kv(kv_cache, meta.slot_mapping, k, v)
    if isinstance(meta, DecodeStep):  # plain decodes, as a compiled graph runs them
        return meta.backend.decode(q, kv_cache, meta.plan, scale)
    return meta.backend.attend(q, k, v, kv_cache, meta, scale)


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """K and V of the new tokens into their slots: one scatter into the cache tensor itself (not a
    view of it), which a compiled step performs in place rather than by copying the cache."""
    kv_heads = kv_cache.shape[1]
    which = torch.arange(2, device=slots.device)[:, None, None]
    heads = torch.arange(kv_heads, device=slots.device)[None, :, None]
    kv_cache.index_put_((which, heads, slots[None, None, :]), torch.stack((k, v)).transpose(1, 2))


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "DecodeStep", "make_backend", "paged_attention"]
