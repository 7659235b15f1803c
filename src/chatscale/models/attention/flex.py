"""FlexAttention backend: decode-like sequences read K/V from the cache pages in place.

`torch.nn.attention.flex_attention`, compiled by inductor (a C++ kernel on CPU, Triton on CUDA: the
same code on both), walks a block mask built straight from the block table: for each sequence its
full pages (no masking) and the one or two pages its queries fall in (causal mask). Nothing is
copied; each page is read once per step. The decode batch dimension is dynamic, so one compile
serves every batch size (one more for the k+1 queries of speculative verification).

Prefill chunks are compute-bound and take the reference path (SDPA over their K/V or gathered
pages). Pages must hold at least MAX_DECODE_QUERY tokens, so a multi-query decode spans at most
two of them; sliding windows are not supported here (the torch backend has them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from chatscale.models.attention.metadata import MAX_DECODE_QUERY, AttentionMetadata
from chatscale.models.attention.torch_ref import TorchAttention

NO_SECOND_PAGE = 1 << 62


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_num: torch.Tensor,
            kv_idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor, second_start: torch.Tensor,
            first_offset: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """q: [B, H, Q, D]; caches [KVH, slots, D] seen as one sequence per batch row (no copy)."""
    b, _, queries, _ = q.shape

    def causal(batch, head, q_idx, kv_idx):
        # A partial page is the first query's own page, or the next one: the page at second_start.
        start = second_start[batch]
        second = ((kv_idx >= start) & (kv_idx < start + block_size)).to(torch.int64)
        return kv_idx % block_size + second * block_size <= first_offset[batch] + q_idx

    mask = BlockMask((queries, k_cache.shape[1]), kv_num, kv_idx, full_num, full_idx, None, None, None, None,
                     BLOCK_SIZE=(MAX_DECODE_QUERY, block_size), mask_mod=causal)
    keys = k_cache.unsqueeze(0).expand(b, -1, -1, -1)
    values = v_cache.unsqueeze(0).expand(b, -1, -1, -1)
    return flex_attention(q, keys, values, block_mask=mask, scale=scale, enable_gqa=True)


# Each model shape (heads, head_dim) and query width compiles once; a process may serve several.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
_compiled_decode = torch.compile(_decode, dynamic=True, fullgraph=True)


class FlexAttention:
    name = "flex"

    def __init__(self, device: torch.device, num_slots: int, block_size: int, max_seqs: int = 1024) -> None:
        if block_size < MAX_DECODE_QUERY:
            raise ValueError(f"the flex backend needs pages of at least {MAX_DECODE_QUERY} tokens "
                             f"(--block-size {block_size}); use --attention-backend torch")
        self.block_size = block_size
        self.device = device
        self.reference = TorchAttention(block_size)  # prefill chunks
        pages = num_slots // block_size
        # Persistent host buffers (the kernel reads only the first kv_num / full_num entries of a row;
        # inductor's CPU kernel wants rows as wide as the cache).
        self._kv_idx = np.zeros((max_seqs, 1, 1, pages), dtype=np.int32)
        self._full_idx = np.zeros((max_seqs, 1, 1, pages), dtype=np.int32)
        self._first = True

    def plan(self, meta: AttentionMetadata) -> tuple[torch.Tensor, ...] | None:
        n = meta.num_decodes
        if n == 0:
            return None
        if n > len(self._kv_idx):
            self._kv_idx = np.zeros((n, *self._kv_idx.shape[1:]), dtype=np.int32)
            self._full_idx = np.zeros((n, *self._full_idx.shape[1:]), dtype=np.int32)
        bs = self.block_size
        table = meta.host_block_table[:n]
        lens, qlens = meta.host_seq_lens[:n], meta.host_query_lens[:n]
        first_pos = lens - qlens
        full = first_pos // bs  # pages entirely before the first query
        last = (lens - 1) // bs
        width = table.shape[1]
        self._full_idx[:n, 0, 0, :width] = table
        rows = np.arange(n)
        self._kv_idx[:n, 0, 0, 0] = table[rows, full]
        self._kv_idx[:n, 0, 0, 1] = table[rows, np.minimum(full + 1, width - 1)]
        two = last > full
        second = np.where(two, table[rows, last].astype(np.int64) * bs, NO_SECOND_PAGE)
        host = (np.ascontiguousarray(last - full + 1, dtype=np.int32).reshape(n, 1, 1),
                self._kv_idx[:n], full.astype(np.int32).reshape(n, 1, 1), self._full_idx[:n],
                second, (first_pos % bs).astype(np.int64))
        return tuple(torch.from_numpy(a).to(self.device, non_blocking=True) for a in host)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            tokens = meta.num_decode_tokens
            # Two query widths, so two compiles: plain decodes (1), and anything longer padded to 16.
            queries = 1 if meta.max_decode_query == 1 else MAX_DECODE_QUERY
            if tokens == n * queries:
                qd = q[:tokens].view(n, queries, q.shape[1], q.shape[2])
            else:  # pad each sequence's queries to the longest (padding repeats its last query)
                qd = q.index_select(0, self._pad_rows(meta)).view(n, queries, q.shape[1], q.shape[2])
            if self._first:  # one compile for every batch size
                for t in (qd,) + tuple(meta.plan[:6]):
                    torch._dynamo.mark_dynamic(t, 0)
                self._first = False
            o = _compiled_decode(qd.transpose(1, 2), kv_cache[0], kv_cache[1], *meta.plan, scale, self.block_size)
            o = o.transpose(1, 2)
            if tokens == n * queries:
                out[:tokens] = o.reshape(tokens, q.shape[1], q.shape[2])
            else:
                valid = np.arange(queries) < meta.host_query_lens[:n, None]
                out[:tokens] = o[torch.from_numpy(valid).to(q.device)]
        self.reference.prefill(q, k, v, kv_cache, meta, scale, out)
        return out

    def decode_plan(self, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        return self.plan(meta)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, plan: tuple[torch.Tensor, ...],
               scale: float) -> torch.Tensor:
        # The scaled query as its own [B, 1, H, D] buffer, seen as [B, H, 1, D]: inductor's CPU
        # template reads the shape of the buffer behind its query, which must be 4-d.
        qd = (q.reshape(q.shape[0], 1, q.shape[1], q.shape[2]) * scale).transpose(1, 2)
        # Flex is only right compiled (eager flex ignores the block table): inline it into the graph
        # being compiled, or call its own compiled kernel.
        attend = _decode if torch.compiler.is_compiling() else _compiled_decode
        return attend(qd, kv_cache[0], kv_cache[1], *plan, 1.0, self.block_size).squeeze(2)

    @staticmethod
    def _pad_rows(meta: AttentionMetadata) -> torch.Tensor:
        n, queries = meta.num_decodes, MAX_DECODE_QUERY
        at = np.arange(queries)
        rows = meta.host_query_start[:n, None] + np.minimum(at, meta.host_query_lens[:n, None] - 1)
        return torch.from_numpy(rows.reshape(-1)).to(meta.slot_mapping.device)
