"""Paged attention: new K/V are written into cache pages; queries read their context from pages.

A step's batch is laid out as [decode tokens | prefill chunks]. Decodes (one query each) are
attended in groups of similar context length, two batched matmuls per group over gathered pages;
each prefill chunk attends causally to its own pages, or, on its first chunk, directly to the K/V
it just produced.
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
    blocks: torch.Tensor | None  # pages holding positions [0, ctx_len); None: no earlier context
    mask: torch.Tensor | None  # [n, pages * block_size] bool; None: plain causal over the chunk itself


@dataclass
class DecodeGroup:
    """Decode rows `[start_row, end_row)` whose contexts are padded to one length.

    Decodes are sorted by context length and attended in groups, so padding stays small and each
    group's gathered pages stay a few megabytes, instead of one batch padded to the longest context.
    """

    start_row: int
    end_row: int
    blocks: torch.Tensor  # [G, pages] block tables (padded with page 0)
    hidden: torch.Tensor  # [G, 1, pages * block_size] bool: True on padding (and outside a window)


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's layout, built once and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    block_size: int = 16
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # decodes of similar context length
    prefills: list[PrefillChunk] = field(default_factory=list)


def gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[KVH, slots, dim] cache, [B, pages] tables -> [KVH, B, pages * block_size, dim].

    Whole pages are copied (block_size * dim contiguous values each), far faster than a
    token-by-token gather.
    """
    kv_heads, slots, dim = cache.shape
    pages = cache.view(kv_heads, slots // block_size, block_size * dim)
    b, n = block_tables.shape
    return pages.index_select(1, block_tables.reshape(-1)).view(kv_heads, b, n * block_size, dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, KVH, slots, D]. Returns [T, H, D].

    The cache is heads-first so that gathering a context by slot yields, per KV head, one
    contiguous [tokens, D] matrix: the batched matmuls read it without another copy.
    """
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)
    for group in meta.decode_groups:
        rows = slice(group.start_row, group.end_row)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, group, meta.block_size, scale)
    gqa = q.shape[1] != k.shape[1]
    for chunk in meta.prefills:
        rows = slice(chunk.start_row, chunk.end_row)
        if chunk.blocks is None:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            ks = gather_pages(k_cache, chunk.blocks, meta.block_size)[:, 0]
            vs = gather_pages(v_cache, chunk.blocks, meta.block_size)[:, 0]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
            attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=gqa,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      group: DecodeGroup, block_size: int, scale: float) -> torch.Tensor:
    """One query per sequence against its paged context, as two batched matmuls per step.

    Queries of the `group` heads sharing a KV head are stacked, so K/V are never repeated (GQA/MQA).
    """
    d, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    per_kv = heads // kv_heads
    ks = gather_pages(k_cache, group.blocks, block_size).view(kv_heads * d, -1, dim)  # [KVH*D, L, dim]
    vs = gather_pages(v_cache, group.blocks, block_size).view(kv_heads * d, -1, dim)
    qs = (q * scale).view(d, kv_heads, per_kv, dim).transpose(0, 1).reshape(kv_heads * d, per_kv, dim)
    scores = torch.bmm(qs, ks.transpose(1, 2)).float()  # [KVH*D, per_kv, L]
    scores = scores.view(kv_heads, d, per_kv, -1).masked_fill_(group.hidden, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).view(kv_heads * d, per_kv, -1)
    out = torch.bmm(probs, vs)  # [KVH*D, per_kv, dim]
    return out.view(kv_heads, d, per_kv, dim).transpose(0, 1).reshape(d, heads, dim)
