"""The model runner: the only place that turns scheduled sequences into tensors.

It owns the KV pages (one [2, kv_heads, slots, head_dim] tensor per layer, preallocated from a
byte budget) and lays out each step flat: token ids, positions, cache slots, block table, sequence
and query lengths, the logits rows — built with numpy into persistent buffers, no Python loop over
tokens — then runs the model (a compiled graph for decode steps where the backend allows it) and
returns the logits. Nothing here reads a device value back: the step's one host sync is the
sampler's.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from chatscale.engine.config import EngineConfig, available_memory_bytes
from chatscale.engine.errors import EngineDeadError
from chatscale.engine.sequence import Sequence
from chatscale.models.attention import AttentionMetadata, make_backend
from chatscale.models.attention.metadata import MAX_DECODE_QUERY, DecodeStep
from chatscale.models.llama import LlamaForCausalLM

log = logging.getLogger("chatscale.engine")


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


def kv_cache_budget(config: EngineConfig, device: torch.device, bytes_per_block: int,
                    context_len: int) -> tuple[int, str]:
    """Bytes of the KV pool and why: --kv-cache-bytes if given; else what max_num_seqs sequences of
    the full context can use (a larger pool would only sit idle), at most kv_cache_fraction of the
    memory still free."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes, "--kv-cache-bytes"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory_bytes()
    share = int(free * config.kv_cache_fraction)
    if device.type == "cpu":
        share //= config.tensor_parallel_size  # CPU ranks share one host's memory
    usable = config.max_num_seqs * -(-context_len // config.block_size) * bytes_per_block
    if usable <= share:
        return usable, f"{config.max_num_seqs} sequences x {context_len} tokens"
    return share, f"{config.kv_cache_fraction:.0%} of {free / 2**30:.1f} GiB free"


@dataclass
class StepLayout:
    """One step, flat, on the host: what the model's tensors are made from (and what rank 0 sends
    the other tensor-parallel ranks). Rows are in the step's order (decodes first)."""

    ids: np.ndarray
    positions: np.ndarray
    block_table: np.ndarray  # [sequences, pages]
    seq_lens: np.ndarray
    query_lens: np.ndarray
    query_start: np.ndarray  # [sequences + 1]
    logits_rows: np.ndarray  # in the order of the works
    num_decodes: int


@dataclass
class StepInputs:
    """One step, flat: what the model reads, and which rows' logits the sampler wants."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata  # its plan: the backend's decode_plan for a step of plain decodes, else plan
    logits_rows: torch.Tensor  # in the order of the works
    plain_decodes: bool  # every sequence computes one token: the (compiled) decode graph runs it


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, num_blocks: int | None = None) -> None:
        self.model = model
        self.device = model.device
        self.block_size = config.block_size
        cfg = model.cfg
        self.tp = model.tp
        per_block = kv_bytes_per_block(model, config.block_size)
        if num_blocks is None and (self.tp is None or self.tp.rank == 0):
            context = config.context_len(cfg.max_position_embeddings)
            budget, why = kv_cache_budget(config, self.device, per_block, context)
            num_blocks = budget // per_block
            log.info("KV cache: %d pages of %d tokens, %.0f MiB%s (%s)", num_blocks, config.block_size,
                     num_blocks * per_block / 2**20, "" if self.tp is None else " on each rank", why)
        if self.tp is not None:  # every rank holds its share of the same pages
            num_blocks = self.tp.broadcast(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"the KV-cache budget holds no block of {per_block} bytes; raise --kv-cache-bytes")
        self.num_blocks = num_blocks
        slots = num_blocks * config.block_size
        # Zeroed, not empty: padding pages are masked out of attention, but 0 * NaN would still poison it.
        self.kv_caches = [
            torch.zeros(2, cfg.num_kv_heads, slots, cfg.head_dim, dtype=model.dtype, device=self.device)
            for _ in range(cfg.num_layers)
        ]
        compiled = config.compiles(self.device.type)
        self.backend = make_backend(config.attention_backend, self.device, slots, config.block_size,
                                    cfg.sliding_window, compiled)
        self.host_pages: torch.Tensor | None = None
        self._decode_graph = None
        self._compile_s = 0.0
        if compiled:
            if self.device.type == "cuda":  # captured: CUDA graphs replay a decode step's launches
                for cache in self.kv_caches:
                    torch._dynamo.mark_static_address(cache)  # written in place by the graphs
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_graph = torch.compile(self._decode_logits, dynamic=True, mode=mode)
        log.info("attention backend %s; decode steps %s", self.backend.name,
                 ("compiled (torch.compile, dynamic batch" + (", CUDA graphs)" if self.device.type == "cuda" else ")"))
                 if self._decode_graph else "eager")

    # ---- the second KV tier ---------------------------------------------------------------------------
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

    def _tensor(self, data: list[int] | np.ndarray) -> torch.Tensor:
        """Host ints as a tensor on the device: shared with numpy on a CPU, copied without waiting on a GPU."""
        t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.int64))
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    # ---- one step -------------------------------------------------------------------------------------
    def layout(self, works: list[Work]) -> StepLayout:
        """The step's flat layout, on the host. Decode-like sequences (at most MAX_DECODE_QUERY new
        tokens) come first, longest context first (so the reference backend's groups pad little),
        then prefills."""
        b, bs = len(works), self.block_size
        q_lens = np.fromiter((len(w.ids) for w in works), dtype=np.int64, count=b)
        starts = np.fromiter((w.start for w in works), dtype=np.int64, count=b)
        seq_lens = starts + q_lens
        decode_like = q_lens <= MAX_DECODE_QUERY
        order = np.lexsort((-seq_lens, ~decode_like))
        q_lens, starts, seq_lens = q_lens[order], starts[order], seq_lens[order]
        query_start = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        tokens = int(query_start[-1])
        ids = np.fromiter(itertools.chain.from_iterable(works[i].ids for i in order), dtype=np.int64, count=tokens)
        seq_of_token = np.repeat(np.arange(b), q_lens)
        positions = np.arange(tokens, dtype=np.int64) - query_start[seq_of_token] + starts[seq_of_token]
        width = int(-(-seq_lens.max() // bs))
        table = np.zeros((b, width), dtype=np.int64)
        for row, i in enumerate(order):
            pages = works[i].seq.block_table[:width]
            table[row, :len(pages)] = pages
        counts = np.fromiter((w.num_logits for w in works), dtype=np.int64, count=b)
        ends = np.empty(b, dtype=np.int64)
        ends[order] = query_start[1:]  # one past each work's last row, in the works' order
        # each work's last `counts` rows, in the works' order
        logits_rows = np.repeat(ends - counts, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts,
                                                                                           counts)
        return StepLayout(ids, positions, table, seq_lens, q_lens, query_start, logits_rows,
                          int(decode_like.sum()))

    def inputs(self, layout: StepLayout) -> StepInputs:
        """The layout as the model's tensors, with the attention backend's plan."""
        bs, q_lens, num_decodes = self.block_size, layout.query_lens, layout.num_decodes
        seq_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
        slots = layout.block_table[seq_of_token, layout.positions // bs] * bs + layout.positions % bs
        meta = AttentionMetadata(
            backend=self.backend, slot_mapping=self._tensor(slots), block_table=self._tensor(layout.block_table),
            seq_lens=self._tensor(layout.seq_lens), query_lens=self._tensor(q_lens), num_decodes=num_decodes,
            max_decode_query=int(q_lens[:num_decodes].max()) if num_decodes else 0, block_size=bs,
            host_block_table=layout.block_table, host_seq_lens=layout.seq_lens, host_query_lens=q_lens,
            host_query_start=layout.query_start)
        plain = num_decodes == len(q_lens) and len(layout.ids) == len(q_lens)
        meta.plan = self.backend.decode_plan(meta) if plain else self.backend.plan(meta)
        return StepInputs(self._tensor(layout.ids), self._tensor(layout.positions), meta,
                          self._tensor(layout.logits_rows), plain)

    def prepare(self, works: list[Work]) -> StepInputs:
        return self.inputs(self.layout(works))

    def run(self, works: list[Work], copies: list[tuple[str, int, int]] = ()) -> torch.Tensor:
        """Run one forward pass (after its page moves); logits [rows, vocab] (fp32) in work order.

        Under tensor parallelism the layout goes to every rank first (the step's one broadcast);
        from then on the ranks run in lockstep, and a failure here leaves them out of step: fatal."""
        layout = self.layout(works)
        if self.tp is None:
            return self.run_layout(layout, copies)
        self.tp.broadcast((layout, list(copies)))
        try:
            return self.run_layout(layout, copies)
        except Exception as exc:
            raise EngineDeadError(f"tensor-parallel rank 0 failed inside a step, the ranks are out of step: "
                                  f"{type(exc).__name__}: {exc}") from exc

    @torch.no_grad()  # not inference_mode: a compiled step writes into the (normal) KV-cache tensors
    def run_layout(self, layout: StepLayout, copies: list[tuple[str, int, int]] = ()) -> torch.Tensor:
        """The forward pass of a laid-out step (what every tensor-parallel rank runs)."""
        self.apply_copies(list(copies))
        step = self.inputs(layout)
        if step.plain_decodes and self._decode_graph is not None:
            return self._compiled(step)
        return self.model.logits(self.forward(step).index_select(0, step.logits_rows))

    def follow(self) -> None:
        """A tensor-parallel rank other than 0: run every step rank 0 lays out, until it sends None."""
        while (step := self.tp.broadcast()) is not None:
            layout, copies = step
            self.run_layout(layout, copies)

    def forward(self, step: StepInputs) -> torch.Tensor:
        """The model's hidden states for every token of the step, eagerly."""
        return self.model(step.input_ids, step.positions, self.kv_caches, self._attention(step))

    def _attention(self, step: StepInputs) -> AttentionMetadata | DecodeStep:
        meta = step.meta
        return DecodeStep(self.backend, meta.slot_mapping, meta.plan) if step.plain_decodes else meta

    def _decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                       step: DecodeStep, logits_rows: torch.Tensor) -> torch.Tensor:
        """A plain decode step, embedding to logits (in the works' order): what the compiled graph runs."""
        return self.model.logits(self.model(input_ids, positions, kv_caches, step).index_select(0, logits_rows))

    def _compiled(self, step: StepInputs) -> torch.Tensor:
        """A step of plain decodes as one graph, compiled on first use for every batch size (logged)."""
        decode = self._attention(step)
        first = self._compile_s == 0.0
        if first:
            for t in (step.input_ids, step.positions, decode.slot_mapping, step.logits_rows, *decode.plan):
                torch._dynamo.mark_dynamic(t, 0)
            start = time.monotonic()
        logits = self._decode_graph(step.input_ids, step.positions, self.kv_caches, decode, step.logits_rows)
        if first:
            self._compile_s = time.monotonic() - start
            log.info("decode step compiled in %.1f s", self._compile_s)
        return logits

    def execute(self, scheduled: list[tuple[Sequence, int]],
                copies: list[tuple[str, int, int]] = ()) -> tuple[torch.Tensor, list[Sequence]]:
        """A plain step: logits [S, vocab] for the sequences whose last known token it computes."""
        works = works_for(scheduled)
        return self.run(works, copies), [w.seq for w in works if w.num_logits]
