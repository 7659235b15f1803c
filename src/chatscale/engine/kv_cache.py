"""The KV-cache block pool: fixed-size pages handed to sequences on demand.

Knows block ids only, never tensors: the model runner owns the memory the ids index into.
"""

from __future__ import annotations

from collections import deque

from chatscale.engine.sequence import Sequence


class KVCacheManager:
    """A free list of `num_blocks` pages of `block_size` tokens; each sequence holds a block table."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owned: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages held by sequences: the first half of "load" (lesson 3)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` pages for `num_new_tokens` more tokens; all or nothing."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.popleft()
            self._owned.add(block)
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        """Return every page of `seq` at once (finished, aborted or preempted)."""
        for block in seq.block_table:
            self._owned.remove(block)  # KeyError here would mean a double free
            self._free.append(block)
        seq.block_table = []
