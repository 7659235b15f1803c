"""The KV-cache block pool with prefix caching: fixed-size pages, shared by content.

Knows block ids only, never tensors: the model runner owns the memory the ids index into.

A full page is named by a chained hash of (parent page's hash, its token ids, cache salt), so two
requests that start with the same tokens (turn N+1 of a conversation, a shared system prompt)
map to the same pages. A page nobody holds stays cached until its space is needed; eviction
takes the least recently freed first and, within one sequence, its tail before its head, so a
cached chain never has a hole that would make its later pages unreachable (lesson 1: an idle
conversation is what gets evicted, and it is evicted from the end).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from chatscale.engine.kv_tier import HostTier
from chatscale.engine.sequence import Sequence

BlockHash = Hashable
HashFn = Callable[[BlockHash | None, tuple[int, ...], str | None], BlockHash]


def chained_hash(parent: BlockHash | None, tokens: tuple[int, ...], salt: str | None) -> BlockHash:
    """Python's tuple hash of the chain link; collisions are caught by comparing token ids."""
    return hash((parent, tokens, salt))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = None  # set once the page is full and registered in the cache
    tokens: tuple[int, ...] = ()
    parent: int | None = None  # the previous page of the chain, to verify a hit exactly
    parent_hash: BlockHash | None = None  # kept with the page if it moves to the second tier


@dataclass
class CacheStats:
    """Counters in tokens (vLLM's prefix_cache_queries / prefix_cache_hits) and pages."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0
    recomputed: int = 0  # tokens computed before, evicted, and computed again
    tier_stores: int = 0  # pages copied to the second tier on eviction
    tier_restores: int = 0  # pages copied back instead of recomputed
    evicted_memory: int = 1 << 16  # how many evicted page hashes are remembered to spot recomputes
    _evicted: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def remember_eviction(self, block_hash: BlockHash) -> None:
        self._evicted[block_hash] = None
        if len(self._evicted) > self.evicted_memory:
            self._evicted.popitem(last=False)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = chained_hash, tier: HostTier | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._fresh: deque[int] = deque(range(num_blocks))  # never cached: taken first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first
        self._cached: dict[BlockHash, int] = {}
        self.stats = CacheStats()
        self.tier = tier if enable_prefix_caching else None
        # Page copies for the runner, in order: ("out", block, slot) saves an evicted page to the
        # second tier before its new owner overwrites it; ("in", slot, block) restores one.
        self.copies: list[tuple[str, int, int]] = []

    # ---- accounting -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Pages a new allocation can take: never used, or cached but held by nobody."""
        return len(self._fresh) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        """Reclaimable pages that still hold a cached prefix."""
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of pages held by live sequences: the first half of "load" (lesson 3)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------------
    def _chain(self, seq: Sequence, upto_blocks: int) -> list[BlockHash]:
        """Hashes of the sequence's first `upto_blocks` full pages, computed once and kept."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < upto_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(self.hash_fn(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]), seq.cache_salt))
        return hashes[:upto_blocks]

    def _lookup(self, seq: Sequence) -> list[int]:
        """The longest chain of cached pages matching the sequence's tokens, verified token by token.

        At least one token is always left to compute: its logits are what the step samples from.
        """
        bs = self.block_size
        hits: list[int] = []
        for i, h in enumerate(self._chain(seq, (seq.num_tokens - 1) // bs)):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = hits[-1] if hits else None
            if block.parent != parent or block.tokens != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # a hash collision: different tokens never share a page
            hits.append(block_id)
        return hits

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name the pages that `num_tokens` computed tokens fill, so later requests can share them."""
        full = min(num_tokens // self.block_size, len(seq.block_table))
        if not self.enable_prefix_caching or full <= seq.num_registered_blocks:
            return
        bs = self.block_size
        for i, h in enumerate(self._chain(seq, full)[seq.num_registered_blocks:], start=seq.num_registered_blocks):
            block = self.blocks[seq.block_table[i]]
            twin = self._cached.get(h)
            if twin is not None and twin != block.block_id:
                # Another sequence computed the same tokens first (n choices of one prompt): use its
                # page, whose KV is identical, and give ours back, so every chain stays one chain.
                self._ref(twin)
                seq.block_table[i] = twin
                self._release(block)
            elif block.hash is None:
                self._name(block, h, tuple(seq.token_ids[i * bs:(i + 1) * bs]),
                           seq.block_table[i - 1] if i else None, seq.block_hashes[i - 1] if i else None)
        seq.num_registered_blocks = full

    def _name(self, block: Block, h: BlockHash, tokens: tuple[int, ...], parent: int | None,
              parent_hash: BlockHash | None) -> None:
        block.hash, block.tokens, block.parent, block.parent_hash = h, tokens, parent, parent_hash
        self._cached[h] = block.block_id

    def _forget(self, block: Block) -> None:
        del self._cached[block.hash]
        block.hash, block.tokens, block.parent, block.parent_hash = None, (), None, None

    # ---- allocation -----------------------------------------------------------------------------
    def _take(self) -> int:
        if self._fresh:
            block_id = self._fresh.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)  # least recently freed
            block = self.blocks[block_id]
            slot = None if self.tier is None else self.tier.store(block.hash, block.tokens, block.parent_hash)
            if slot is not None:
                self.copies.append(("out", block_id, slot))
                self.stats.tier_stores += 1
            else:
                self.stats.remember_eviction(block.hash)
            self.stats.evictions += 1
            self._forget(block)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]  # back in use: no longer a candidate for eviction
        block.ref_count += 1

    def _release(self, block: Block) -> None:
        if block.ref_count <= 0:
            raise AssertionError(f"block {block.block_id} freed twice")
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self._evictable[block.block_id] = None  # stays cached until its space is needed
            else:
                self._fresh.append(block.block_id)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` pages for `num_new_tokens` more tokens; all or nothing."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def _tier_hits(self, seq: Sequence, first: int) -> list[BlockHash]:
        """Pages after the first-tier hits that the second tier holds, verified like first-tier hits."""
        if self.tier is None:
            return []
        bs, chain, found = self.block_size, seq.block_hashes, []
        for i in range(first, (seq.num_tokens - 1) // bs):
            parent = chain[i - 1] if i else None
            if self.tier.find(chain[i], tuple(seq.token_ids[i * bs:(i + 1) * bs]), parent) is None:
                break
            found.append(chain[i])
        return found

    def allocate_prefix(self, seq: Sequence, token_budget: int) -> int | None:
        """Admit a waiting sequence: reuse its longest cached prefix (restoring pages from the second
        tier where the first lost them), then allocate pages for up to `token_budget` new tokens.
        Returns the tokens to compute this step, or None if it does not fit."""
        hits = self._lookup(seq) if self.enable_prefix_caching else []
        restores = self._tier_hits(seq, len(hits)) if self.enable_prefix_caching else []
        cached = (len(hits) + len(restores)) * self.block_size
        n = min(seq.num_tokens - cached, token_budget)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self.blocks_for(cached + n) - len(hits)
        if need + reclaimed > self.num_free_blocks:
            return None
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = list(hits)
        slots = [self.tier.take(h) for h in restores]  # first: evictions below must not overwrite them
        for h, slot in zip(restores, slots):
            block_id = self._take()
            self.copies.append(("in", slot, block_id))
            i = len(seq.block_table)
            bs = self.block_size
            self._name(self.blocks[block_id], h, tuple(seq.token_ids[i * bs:(i + 1) * bs]),
                       seq.block_table[-1] if i else None, seq.block_hashes[i - 1] if i else None)
            seq.block_table.append(block_id)
            self.stats.tier_restores += 1
        seq.num_computed_tokens = cached
        seq.num_registered_blocks = len(seq.block_table)
        if seq.num_cached_tokens == 0 and seq.num_preemptions == 0:
            seq.num_cached_tokens = cached  # what the client is told: usage.cached_tokens
            self.stats.queries += seq.num_tokens
            self.stats.hits += cached
        self._count_recomputed(seq, cached)
        for _ in range(need - len(restores)):
            seq.block_table.append(self._take())
        return n

    def drain_copies(self) -> list[tuple[str, int, int]]:
        """This step's page moves, for the runner to apply before the forward pass."""
        copies, self.copies = self.copies, []
        if self.tier is not None:
            self.tier.release()
        return copies

    def _count_recomputed(self, seq: Sequence, cached: int) -> None:
        """Tokens of pages this prefix had in cache before an eviction took them: paid twice."""
        chain = seq.block_hashes[cached // self.block_size:(seq.num_tokens - 1) // self.block_size]
        lost = sum(1 for h in chain if h in self.stats._evicted)
        self.stats.recomputed += lost * self.block_size

    def commit(self, seq: Sequence) -> None:
        """After a step computed tokens of `seq`: register the pages they filled."""
        self._register_full_blocks(seq, seq.num_computed_tokens)

    def trim(self, seq: Sequence) -> None:
        """Release the pages past the last computed token (a rejected speculative lookahead)."""
        keep = self.blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            self._release(self.blocks[seq.block_table.pop()])

    def free(self, seq: Sequence, keep_tokens: int | None = None) -> None:
        """Release every page of `seq` at once (finished, aborted or preempted).

        Pages are released tail first, so the head of the chain outlives its tail in the LRU. Pages
        holding tokens past `keep_tokens` (a stop string's overshoot) that nobody else holds are
        forgotten by the prefix cache: no later request may reuse text the client never saw."""
        for i in range(len(seq.block_table) - 1, -1, -1):
            block = self.blocks[seq.block_table[i]]
            overshoot = keep_tokens is not None and (i + 1) * self.block_size > keep_tokens
            if overshoot and block.hash is not None and block.ref_count == 1:
                self._forget(block)
            self._release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached page (e.g. after loading new weights)."""
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget(self.blocks[block_id])
            self._fresh.append(block_id)
