"""The attention backends against each other on the same flat step: the FlexAttention backend (reads
pages in place) must give the reference backend's outputs for decodes, multi-query decodes
(speculative verification) crossing page boundaries, short prompts and prefill chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatscale.models.attention import make_backend, paged_attention
from chatscale.models.attention.metadata import AttentionMetadata

HEADS, KV_HEADS, DIM, PAGE = 4, 2, 16, 16


def step(backend, starts: list[int], q_lens: list[int], pages: int, seed: int = 0):
    """A random cache and one step computing q_lens[i] tokens at positions starts[i]... of sequence i."""
    rng = np.random.default_rng(seed)
    b = len(starts)
    seq_lens = np.array(starts) + np.array(q_lens)
    width = int(-(-seq_lens.max() // PAGE))
    table = rng.permutation(pages)[: b * width].reshape(b, width).astype(np.int64)
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    seq_of = np.repeat(np.arange(b), q_lens)
    pos = np.arange(query_start[-1]) - query_start[seq_of] + np.array(starts)[seq_of]
    slots = table[seq_of, pos // PAGE] * PAGE + pos % PAGE
    num_decodes = int((np.array(q_lens) <= 16).sum())
    meta = AttentionMetadata(
        backend=backend, slot_mapping=torch.from_numpy(slots), block_table=torch.from_numpy(table),
        seq_lens=torch.from_numpy(seq_lens), query_lens=torch.tensor(q_lens), num_decodes=num_decodes,
        max_decode_query=max(q_lens[:num_decodes], default=0), block_size=PAGE, host_block_table=table,
        host_seq_lens=seq_lens, host_query_lens=np.array(q_lens), host_query_start=query_start)
    meta.plan = backend.plan(meta)
    return meta


@pytest.mark.parametrize("case", [
    ([40, 3, 15, 16, 33], [1, 1, 1, 1, 1]),  # plain decodes, page boundaries around them
    ([12, 14, 30, 0, 60], [5, 5, 3, 5, 1]),  # speculative verification, some crossing a page
    ([0, 0, 70], [7, 16, 40]),  # short prompts (decode-like), then a prefill chunk with context
])
def test_flex_backend_equals_the_reference(case):
    starts, q_lens = case
    pages = 64
    torch.manual_seed(0)
    cache = torch.randn(2, KV_HEADS, pages * PAGE, DIM)
    tokens = sum(q_lens)
    q, k, v = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM)
    outs = []
    for name in ("torch", "flex"):
        backend = make_backend(name, torch.device("cpu"), pages * PAGE, PAGE, None)
        c = cache.clone()
        outs.append(paged_attention(q, k, v, c, step(backend, starts, q_lens, pages), DIM ** -0.5))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
