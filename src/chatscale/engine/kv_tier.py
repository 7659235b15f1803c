"""The second KV tier: where evicted prefix pages go instead of being forgotten.

On a GPU it is host memory; on a CPU run a separately budgeted area on disk. Pure bookkeeping:
hashes, tokens and slot numbers, LRU. The model runner moves the bytes, in the order the KV
manager records them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class TierEntry:
    slot: int
    tokens: tuple[int, ...]
    parent_hash: Hashable | None


class HostTier:
    """`num_slots` pages, least recently stored evicted first."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("the second KV tier needs at least one page")
        self.num_slots = num_slots
        self._entries: OrderedDict[Hashable, TierEntry] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))
        self._reserved: list[int] = []  # restored this step: not reusable until its copy has run

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, block_hash: Hashable, tokens: tuple[int, ...], parent_hash: Hashable | None) -> int | None:
        """A slot for a page; the oldest entry makes room when the tier is full. None when every
        slot is being restored from in this very step."""
        old = self._entries.pop(block_hash, None)
        if old is not None:
            self._free.append(old.slot)
        if not self._free:
            if not self._entries:
                return None
            _, evicted = self._entries.popitem(last=False)
            self._free.append(evicted.slot)
        entry = TierEntry(self._free.pop(), tokens, parent_hash)
        self._entries[block_hash] = entry
        return entry.slot

    def find(self, block_hash: Hashable, tokens: tuple[int, ...], parent_hash: Hashable | None) -> TierEntry | None:
        """The entry for exactly these tokens after exactly this parent, or None (a miss or a collision)."""
        entry = self._entries.get(block_hash)
        if entry is None or entry.tokens != tokens or entry.parent_hash != parent_hash:
            return None
        return entry

    def take(self, block_hash: Hashable) -> int:
        """Remove a page being restored; its slot stays reserved until `release` (after the copy)."""
        entry = self._entries.pop(block_hash)
        self._reserved.append(entry.slot)
        return entry.slot

    def release(self) -> None:
        """The step's copies are handed to the runner: restored slots can be reused."""
        self._free.extend(self._reserved)
        self._reserved.clear()
