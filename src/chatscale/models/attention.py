"""Paged attention: new K/V are written into cache pages; queries read their context from pages.

A step's batch is laid out as [decode tokens | prefill chunks]. Decodes (one query each) are
attended in one batched call over their pages; each prefill chunk attends causally to its own
pages, or, on its first chunk, directly to the K/V it just produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """Rows `[start_row, end_row)` of the batch: positions `[ctx_len - n, ctx_len)` of one sequence."""

    start_row: int
    end_row: int
    slots: torch.Tensor | None  # cache slots of positions [0, ctx_len); None: no earlier context
    mask: torch.Tensor | None  # [n, ctx_len] bool; None: plain causal over the chunk itself


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's layout, built once and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [D, L] slots of each decode's context (padded)
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, L] bool, False on padding
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, slots, KVH, D]. Returns [T, H, D]."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        ks = k_cache[meta.decode_slots].transpose(1, 2)  # [D, KVH, L, D]
        vs = v_cache[meta.decode_slots].transpose(1, 2)
        out[:d] = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2), ks, vs, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        ).squeeze(2)
    for chunk in meta.prefills:
        rows = slice(chunk.start_row, chunk.end_row)
        if chunk.slots is None:
            ks, vs = k[rows], v[rows]
        else:
            ks, vs = k_cache[chunk.slots], v_cache[chunk.slots]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out
