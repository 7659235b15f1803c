"""The model runner: the only place that turns scheduled sequences into tensors.

It owns the KV pages (one [2, kv_heads, slots, head_dim] tensor per layer, preallocated from a
byte budget), lays out each step's batch as [decodes | prefill chunks], and returns logits for
the sequences whose last token was computed this step.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from chatscale.engine.config import EngineConfig, available_memory_bytes
from chatscale.engine.sequence import Sequence
from chatscale.models.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from chatscale.models.llama import LlamaForCausalLM


DECODE_GROUP = 16  # decodes attended together: small enough that gathered pages stay in cache


@dataclass
class Work:
    """Tokens `ids` of `seq` at positions `[start, start + len(ids))`, whose KV goes into the pages
    of `seq.block_table`; logits are wanted for the last `num_logits` of them.

    A plain step computes each sequence's next tokens; speculative decoding also runs the draft
    model on its own positions and verifies several proposed tokens per sequence in one pass."""

    seq: Sequence
    start: int
    ids: list[int]
    num_logits: int = 1


def works_for(scheduled: list[tuple[Sequence, int]]) -> list[Work]:
    """A plain step: `n` new tokens per sequence; logits where the last known token is computed."""
    works = []
    for seq, n in scheduled:
        start = seq.num_computed_tokens
        works.append(Work(seq, start, seq.token_ids[start:start + n], int(start + n == seq.num_tokens)))
    return works


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int) -> int:
    cfg = model.cfg
    itemsize = model.dtype.itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * block_size


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes of weights a forward pass reads (tied embeddings counted once, quantized ones packed)."""
    return model.weight_bytes()


def kv_cache_budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.kv_cache_fraction)
    return int(available_memory_bytes() * config.kv_cache_fraction)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, num_blocks: int | None = None) -> None:
        self.model = model
        self.device = model.device
        self.block_size = config.block_size
        cfg = model.cfg
        per_block = kv_bytes_per_block(model, config.block_size)
        if num_blocks is None:
            num_blocks = kv_cache_budget(config, self.device) // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV-cache budget holds no block of {per_block} bytes; raise --kv-cache-bytes")
        self.num_blocks = num_blocks
        slots = num_blocks * config.block_size
        # Zeroed, not empty: padding pages are masked out of attention, but 0 * NaN would still poison it.
        self.kv_caches = [
            torch.zeros(2, cfg.num_kv_heads, slots, cfg.head_dim, dtype=model.dtype, device=self.device)
            for _ in range(cfg.num_layers)
        ]
        self.sliding_window = cfg.sliding_window
        self.host_pages: torch.Tensor | None = None

    def allocate_host_tier(self, num_pages: int, directory: str | None = None) -> None:
        """The second KV tier: pinned host memory behind a GPU, a file-backed area on disk on a CPU
        (mapped and unlinked at once, so nothing is left behind)."""
        cfg, dtype = self.model.cfg, self.model.dtype
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_pages, self.block_size * cfg.head_dim)
        if self.device.type == "cuda":
            self.host_pages = torch.empty(shape, dtype=dtype, pin_memory=True)
            return
        fd, path = tempfile.mkstemp(prefix="chatscale-kv-tier-", dir=directory)
        try:
            numel = 1
            for n in shape:
                numel *= n
            os.ftruncate(fd, numel * torch.empty((), dtype=dtype).element_size())
            self.host_pages = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            os.close(fd)
            os.unlink(path)

    def _device_pages(self, layer: int) -> torch.Tensor:
        cache = self.kv_caches[layer]
        return cache.view(2, cache.shape[1], self.num_blocks, -1)

    def apply_copies(self, copies: list[tuple[str, int, int]]) -> None:
        """Move pages between the tiers in the order the KV manager decided (runs batched)."""
        i = 0
        while i < len(copies):
            j = i
            while j < len(copies) and copies[j][0] == copies[i][0]:
                j += 1
            run = copies[i:j]
            if run[0][0] == "out":
                blocks, slots = self._tensor([c[1] for c in run]), torch.tensor([c[2] for c in run])
                for layer in range(len(self.kv_caches)):
                    pages = self._device_pages(layer).index_select(2, blocks).to("cpu")
                    self.host_pages[layer].index_copy_(2, slots, pages)
            else:
                slots, blocks = torch.tensor([c[1] for c in run]), self._tensor([c[2] for c in run])
                for layer in range(len(self.kv_caches)):
                    pages = self.host_pages[layer].index_select(2, slots).to(self.device)
                    self._device_pages(layer).index_copy_(2, blocks, pages)
            i = j

    def _tensor(self, data: list[int]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def _pages(self, block_tables: list[list[int]], length: int) -> torch.Tensor:
        """The pages holding positions [0, length) of each table, padded with page 0: [B, pages]."""
        width = -(-length // self.block_size)
        return self._tensor([bt[:width] + [0] * (width - len(bt[:width])) for bt in block_tables])

    def _visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Causal (and sliding-window) visibility of keys at k_pos from queries at q_pos."""
        ok = k_pos <= q_pos
        if self.sliding_window is not None:
            ok &= q_pos - k_pos < self.sliding_window
        return ok

    def prepare(self, works: list[Work]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Inputs, positions and attention layout of a step, and the rows whose logits are needed
        (in the order of `works`)."""
        # Decodes first, longest context first, so that neighbours in a decode group pad little.
        order = sorted(range(len(works)), key=lambda i: (len(works[i].ids) > 1, -works[i].start))
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        first_row = [0] * len(works)
        for i in order:
            w = works[i]
            first_row[i] = len(ids)
            ids += w.ids
            table = w.seq.block_table
            for pos in range(w.start, w.start + len(w.ids)):
                positions.append(pos)
                slot_mapping.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        meta = AttentionMetadata(slot_mapping=self._tensor(slot_mapping), block_size=self.block_size)
        decodes = [works[i] for i in order if len(works[i].ids) == 1]
        for start in range(0, len(decodes), DECODE_GROUP):
            group = decodes[start: start + DECODE_GROUP]
            lens = self._tensor([w.start + 1 for w in group])
            blocks = self._pages([w.seq.block_table for w in group], int(lens.max()))
            k_pos = torch.arange(blocks.shape[1] * self.block_size, device=self.device)
            hidden = ~self._visible((lens - 1)[:, None], k_pos[None, :])[:, None, :]
            meta.decode_groups.append(DecodeGroup(start, start + len(group), blocks, hidden))
        for i in order[len(decodes):]:
            w = works[i]
            start, n = w.start, len(w.ids)
            ctx = start + n
            windowed = self.sliding_window is not None and ctx > self.sliding_window
            pages = mask = None
            if start > 0 or windowed:
                pages = self._pages([w.seq.block_table], ctx) if start > 0 else None
                width = ctx if pages is None else pages.shape[1] * self.block_size
                q_pos = torch.arange(start, ctx, device=self.device)
                mask = self._visible(q_pos[:, None], torch.arange(width, device=self.device)[None, :])
            meta.prefills.append(PrefillChunk(first_row[i], first_row[i] + n, pages, mask))
        rows = [first_row[i] + len(w.ids) - k for i, w in enumerate(works) for k in range(w.num_logits, 0, -1)]
        return self._tensor(ids), self._tensor(positions), meta, rows

    @torch.inference_mode()
    def run(self, works: list[Work], copies: list[tuple[str, int, int]] = ()) -> torch.Tensor:
        """Run one forward pass (after its page moves); logits [rows, vocab] (fp32) in work order."""
        self.apply_copies(list(copies))
        input_ids, positions, meta, rows = self.prepare(works)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.logits(hidden[self._tensor(rows)])

    def execute(self, scheduled: list[tuple[Sequence, int]],
                copies: list[tuple[str, int, int]] = ()) -> tuple[torch.Tensor, list[Sequence]]:
        """A plain step: logits [S, vocab] for the sequences whose last known token it computes."""
        works = works_for(scheduled)
        return self.run(works, copies), [w.seq for w in works if w.num_logits]
