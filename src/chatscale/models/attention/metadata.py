"""One step's attention layout: flat tensors built once by the runner and read by every layer.

Tokens are laid out sequence by sequence, decode-like sequences first (each computes at most
MAX_DECODE_QUERY tokens: a decode, or a decode that verifies speculative tokens), then prefill
chunks. Every field is a tensor (or, for the host's own loops, a numpy array of the same numbers),
so a compiled or captured step can take it; nothing here is a Python object per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

MAX_DECODE_QUERY = 16  # a sequence computing at most this many tokens is attended as a (multi-query) decode


class AttentionBackend(Protocol):
    name: str

    def plan(self, meta: AttentionMetadata) -> Any:
        """Per-step data of this backend (built once per step, shared by all layers)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D] against each sequence's context in `kv_cache` (where k, v [T, KVH, D], the
        new tokens' keys and values, are already written): [T, H, D]."""

    def decode_plan(self, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        """For a step of plain decodes (one query per sequence): tensors only, batch first, so a
        compiled graph takes them with a dynamic batch size."""

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, plan: tuple[torch.Tensor, ...],
               scale: float) -> torch.Tensor:
        """One query per sequence, q: [B, H, D], traceable by torch.compile: [B, H, D]."""


@dataclass(eq=False)
class AttentionMetadata:
    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    block_table: torch.Tensor  # [B, W] pages of each sequence, padded with page 0
    seq_lens: torch.Tensor  # [B] context length after this step
    query_lens: torch.Tensor  # [B] tokens computed this step
    num_decodes: int  # the first num_decodes sequences are decode-like
    max_decode_query: int  # the most tokens one of them computes (1 without speculation)
    block_size: int
    # The same numbers on the host, for the backends' planning and the prefill loop (no device sync).
    host_block_table: np.ndarray
    host_seq_lens: np.ndarray
    host_query_lens: np.ndarray
    host_query_start: np.ndarray  # [B + 1] first row of each sequence, then T
    plan: Any = None  # the backend's per-step data

    @property
    def num_seqs(self) -> int:
        return len(self.host_seq_lens)

    @property
    def num_decode_tokens(self) -> int:
        return int(self.host_query_start[self.num_decodes])

    @property
    def uniform_decode(self) -> bool:
        """Every decode-like sequence computes the same number of tokens (no padding needed)."""
        return self.num_decode_tokens == self.num_decodes * self.max_decode_query


class DecodeStep(NamedTuple):
    """A step of plain decodes only (one new token per sequence), as a compiled graph takes it:
    tensors whose first dimension is the batch, and the backend that planned them."""

    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [B]
    plan: tuple[torch.Tensor, ...]  # the backend's per-step tensors, batch first
