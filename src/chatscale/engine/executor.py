"""The executor: where the engine core hands a planned step to the model and gets tokens back.

The core (scheduler, KV manager, bookkeeping) never touches a tensor; it calls `execute(plan)` and
receives each sampled sequence's new tokens. `InProcessExecutor` runs the model, the sampler and
the speculative proposer right here; a multi-process executor (tensor parallelism: one worker per
device, each with its shard) implements the same three methods, so neither the core nor the server
changes when the model spreads over several devices.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from chatscale.engine.config import EngineConfig
from chatscale.engine.messages import TokenLogprobs
from chatscale.engine.runner import ModelRunner, Work, works_for
from chatscale.engine.sampler import Sampler, host_tensor
from chatscale.engine.scheduler import SchedulerOutput
from chatscale.engine.sequence import Sequence
from chatscale.engine.spec_decode import DraftModelProposer, NgramProposer, Proposal, verify
from chatscale.engine.structured.hook import StructuredOutputs
from chatscale.models.llama import LlamaForCausalLM
from chatscale.models.loader import load_model

if TYPE_CHECKING:
    from chatscale.distributed.group import TensorParallelGroup

log = logging.getLogger("chatscale.engine")


@dataclass
class ModelOutput:
    """One step's results: per sampled sequence its new tokens (one, or a speculative decode's
    accepted proposals plus the target's own token) and their logprobs where asked."""

    tokens: dict[Sequence, list[int]] = field(default_factory=dict)
    logprobs: dict[Sequence, list[TokenLogprobs | None]] = field(default_factory=dict)
    proposed: dict[Sequence, int] = field(default_factory=dict)  # speculative tokens verified, per sequence
    expert_tokens: list[list[int]] | None = None  # MoE: tokens per expert and layer
    collective_s: float = 0.0  # tensor parallelism: seconds rank 0 spent in the model's collectives


class Executor(Protocol):
    """What the engine core needs from whatever runs the model."""

    model: LlamaForCausalLM  # the model's shape and dtype (rank 0's shard under tensor parallelism)
    num_blocks: int  # KV pages each device holds (its share of every page)
    draft_weight_ratio: float  # draft model bytes / target bytes (0: no draft model)

    def execute(self, plan: SchedulerOutput) -> ModelOutput: ...

    def apply_copies(self, copies: list[tuple[str, int, int]]) -> None: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """The model, sampler and proposer in the engine core's own process, on one device."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], num_blocks: int | None = None,
                 structured: StructuredOutputs | None = None, tp: TensorParallelGroup | None = None) -> None:
        """On one device; with `tp`, as tensor-parallel rank 0, holding its shard (the other ranks
        follow the steps its runner lays out: distributed/executor.py)."""
        self.model = load_model(config.model, config.dtype, config.device, config.quantization,
                                config.quant_group_size, tp)
        self.runner = ModelRunner(self.model, config, num_blocks)
        self.num_blocks = self.runner.num_blocks
        self.sampler = Sampler(eos_token_ids)
        self.structured = structured  # grammar masks of constrained sequences
        self.proposer: DraftModelProposer | NgramProposer | None = None
        self.draft_weight_ratio = 0.0
        if config.speculative_model == "ngram":
            self.proposer = NgramProposer(config.ngram_prompt_lookup_max, config.ngram_prompt_lookup_min)
        elif config.speculative_model:
            self._load_draft(config)

    def _load_draft(self, config: EngineConfig) -> None:
        """The draft model, whole, beside the target (under tensor parallelism: on rank 0 only)."""
        path = config.speculative_model
        if path == "demo-draft":
            from chatscale.models.demo import demo_model_path

            path = str(demo_model_path("draft"))
        draft = load_model(path, config.dtype, config.device)
        if draft.cfg.vocab_size != self.model.cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) differs from the "
                             f"target's ({self.model.cfg.vocab_size}); a draft must share the target's tokenizer")
        self.proposer = DraftModelProposer(ModelRunner(draft, config, self.num_blocks), self.sampler, self.structured)
        self.draft_weight_ratio = draft.weight_bytes() / self.model.weight_bytes()

    def apply_copies(self, copies: list[tuple[str, int, int]]) -> None:
        self.runner.apply_copies(copies)

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        works = works_for(plan.scheduled)
        proposals = self.proposer.propose(plan.lookahead) if plan.lookahead else {}
        if self.structured is not None:
            self.structured.check_proposals(proposals)
        for w in works:
            proposal = proposals.get(w.seq)
            if proposal is not None and proposal.tokens:
                w.ids = w.ids + proposal.tokens
                w.num_logits = len(w.ids)
        masks = self.structured.fill_masks(_logit_rows(works)) if self.structured else None  # overlaps the forward
        logits = self.runner.run(works, plan.copies)
        if masks is not None:
            self.structured.apply(logits, masks)
        return self._sample(works, logits, proposals)

    def _sample(self, works: list[Work], logits: torch.Tensor, proposals: dict[Sequence, Proposal]) -> ModelOutput:
        """One sampled token for a plain row; for a speculating sequence, its accepted proposals
        plus one token of the target's."""
        out = ModelOutput()
        experts = self.model.expert_tokens()  # comes back with the plain rows' tokens
        plain_rows, plain, spec, row = [], [], [], 0
        for w in works:
            if w.num_logits > 1:
                spec.append((w.seq, row, w.num_logits))
            elif w.num_logits:
                plain_rows.append(row)
                plain.append(w.seq)
            row += w.num_logits
        if plain:
            every_row = len(plain_rows) == logits.shape[0]  # then no [rows, vocab] copy
            rows = logits if every_row else logits[host_tensor(plain_rows, logits.device)]
            tokens, logprobs, counts = self.sampler(rows, plain, experts)
            for seq, token, lp in zip(plain, tokens, logprobs):
                out.tokens[seq], out.logprobs[seq] = [token], [lp]
            if experts is not None:
                out.expert_tokens = [counts[i:i + experts.shape[1]] for i in range(0, len(counts), experts.shape[1])]
        if spec:
            rows = torch.cat([torch.arange(r, r + n) for _, r, n in spec]).to(logits.device)
            dist = self.sampler.distribution(logits[rows], [seq for seq, _, n in spec for _ in range(n)])
            at = 0
            for seq, _, n in spec:
                tokens = verify(dist[at:at + n], proposals[seq], seq)
                at += n
                out.tokens[seq], out.logprobs[seq], out.proposed[seq] = tokens, [None] * len(tokens), n - 1
        if experts is not None and out.expert_tokens is None:  # a step of speculative rows only
            out.expert_tokens = experts.tolist()
        return out

    def shutdown(self) -> None:
        pass


def _logit_rows(works: list[Work]) -> list[tuple[Sequence, int, list[int]]]:
    """(sequence, its first logits row, the proposals verified after it) for each work with logits."""
    rows, row = [], 0
    for w in works:
        if w.num_logits:
            rows.append((w.seq, row, w.ids[len(w.ids) - w.num_logits + 1:]))
        row += w.num_logits
    return rows


def make_executor(config: EngineConfig, eos_token_ids: frozenset[int], num_blocks: int | None = None,
                  structured: StructuredOutputs | None = None) -> Executor:
    """The executor `config.executor` names: "inprocess" (one device, or one process per rank with
    --tensor-parallel-size), or "package.module:Class" (same arguments)."""
    if config.executor == "inprocess" and config.tensor_parallel_size > 1:
        from chatscale.distributed.executor import TensorParallelExecutor

        return TensorParallelExecutor(config, eos_token_ids, num_blocks, structured)
    if config.executor == "inprocess":
        return InProcessExecutor(config, eos_token_ids, num_blocks, structured)
    module, _, name = config.executor.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"--executor {config.executor!r}: expected 'inprocess' or 'module:Class' ({exc})") from exc
    return cls(config, eos_token_ids, num_blocks, structured)
