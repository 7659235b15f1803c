"""The reference backend: pages gathered into contiguous K/V, then matmuls and SDPA.

Plain PyTorch on any device and any shape (sliding windows included), so it is the oracle the fast
backends are tested against. Decode-like sequences are attended in groups of similar context
length (the runner sorts them), two batched matmuls per group over the gathered pages; each prefill
chunk runs SDPA over its own new K/V, or over its gathered pages when it has earlier context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from chatscale.models.attention.metadata import AttentionMetadata

DECODE_GROUP = 16  # decodes attended together: small enough that gathered pages stay in cache


@dataclass
class DecodeGroup:
    """Decode-like sequences `[first, first + G)`, their queries padded to `Q` rows each."""

    rows: torch.Tensor  # [G * Q] row of every (sequence, query); padding repeats the last query
    valid: torch.Tensor  # [G * Q] bool: a real query (padding's outputs are dropped)
    out_rows: torch.Tensor  # [valid count] where the valid outputs go
    pages: torch.Tensor  # [G, W] pages holding each context
    hidden: torch.Tensor  # [G, Q, W * block_size] bool: key not visible to the query
    queries: int  # Q


def gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[KVH, slots, D] cache, [B, W] tables -> [KVH, B, W * block_size, D], whole pages at a time."""
    kv_heads, slots, dim = cache.shape
    pages = cache.view(kv_heads, slots // block_size, block_size * dim)
    b, n = block_tables.shape
    return pages.index_select(1, block_tables.reshape(-1)).view(kv_heads, b, n * block_size, dim)


def visible(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """Causal (and sliding-window) visibility of keys at k_pos from queries at q_pos (broadcast)."""
    ok = k_pos <= q_pos
    if window is not None:
        ok &= q_pos - k_pos < window
    return ok


class TorchAttention:
    name = "torch"

    def __init__(self, block_size: int, sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.window = sliding_window

    def plan(self, meta: AttentionMetadata) -> list[DecodeGroup]:
        device, bs = meta.slot_mapping.device, self.block_size
        groups = []
        for first in range(0, meta.num_decodes, DECODE_GROUP):
            sel = slice(first, min(first + DECODE_GROUP, meta.num_decodes))
            lens, qlens = meta.host_seq_lens[sel], meta.host_query_lens[sel]
            starts = meta.host_query_start[sel]
            queries = int(qlens.max())
            width = -(-int(lens.max()) // bs)
            at = np.arange(queries)
            rows = starts[:, None] + np.minimum(at, qlens[:, None] - 1)
            valid = at < qlens[:, None]
            q_pos = (lens - qlens)[:, None] + at  # [G, Q]
            hidden = ~visible(q_pos[:, :, None], np.arange(width * bs)[None, None, :], self.window)

            def dev(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)

            groups.append(DecodeGroup(dev(rows.reshape(-1)), dev(valid.reshape(-1)), dev(rows[valid]),
                                      dev(meta.host_block_table[sel, :width]), dev(hidden), queries))
        return groups

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in meta.plan:
            result = self._decode(q.index_select(0, group.rows), kv_cache, group, scale)
            out.index_copy_(0, group.out_rows, result[group.valid])
        self.prefill(q, k, v, kv_cache, meta, scale, out)
        return out

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
        """Each prefill chunk with SDPA: over its own K/V when it starts the sequence, else over its
        gathered pages (the earlier context) with a causal mask at its offset."""
        gqa = q.shape[1] != k.shape[1]
        for i in range(meta.num_decodes, meta.num_seqs):
            first, n, ctx = (int(x) for x in (meta.host_query_start[i], meta.host_query_lens[i], meta.host_seq_lens[i]))
            rows = slice(first, first + n)
            start = ctx - n
            if start == 0 and (self.window is None or ctx <= self.window):
                ks, vs, mask = k[rows].transpose(0, 1), v[rows].transpose(0, 1), None
            else:
                width = -(-ctx // self.block_size)
                pages = torch.from_numpy(meta.host_block_table[i:i + 1, :width]).to(q.device)
                ks = gather_pages(kv_cache[0], pages, self.block_size)[:, 0, :ctx]
                vs = gather_pages(kv_cache[1], pages, self.block_size)[:, 0, :ctx]
                ok = visible(np.arange(start, ctx)[:, None], np.arange(ctx)[None, :], self.window)
                mask = torch.from_numpy(ok).to(q.device)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
            out[rows] = o.squeeze(0).transpose(0, 1)

    def decode_plan(self, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        """Every decode in one group, padded to the longest context: its pages and hidden keys."""
        lens = meta.host_seq_lens
        width = -(-int(lens.max()) // self.block_size)
        pos = np.arange(width * self.block_size)
        hidden = ~visible((lens - 1)[:, None, None], pos[None, None, :], self.window)
        device = meta.slot_mapping.device
        return (meta.block_table[:, :width], torch.from_numpy(hidden).to(device))

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, plan: tuple[torch.Tensor, ...],
               scale: float) -> torch.Tensor:
        pages, hidden = plan
        return self._attend_pages(q, kv_cache, pages, hidden, 1, scale)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, group: DecodeGroup, scale: float) -> torch.Tensor:
        return self._attend_pages(q, kv_cache, group.pages, group.hidden, group.queries, scale)

    def _attend_pages(self, q: torch.Tensor, kv_cache: torch.Tensor, pages: torch.Tensor, hidden: torch.Tensor,
                      queries: int, scale: float) -> torch.Tensor:
        """Q queries per sequence against its paged context, as two batched matmuls; the heads that
        share a KV head are stacked, so K/V are never repeated (GQA/MQA). q: [G * Q, H, D]."""
        g = pages.shape[0]
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = kv_cache.shape[1]
        per_kv = heads // kv_heads
        ks = gather_pages(kv_cache[0], pages, self.block_size).view(kv_heads * g, -1, dim)
        vs = gather_pages(kv_cache[1], pages, self.block_size).view(kv_heads * g, -1, dim)
        qs = (q * scale).reshape(g, queries, kv_heads, per_kv, dim).permute(2, 0, 1, 3, 4)
        scores = torch.bmm(qs.reshape(kv_heads * g, queries * per_kv, dim), ks.transpose(1, 2)).float()
        scores = scores.view(kv_heads, g, queries, per_kv, -1).masked_fill(hidden[None, :, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype).view(kv_heads * g, queries * per_kv, -1)
        out = torch.bmm(probs, vs).view(kv_heads, g, queries, per_kv, dim)
        return out.permute(1, 2, 0, 3, 4).reshape(g * queries, heads, dim)
