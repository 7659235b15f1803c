"""LLMEngine: requests in, one scheduler step at a time, outputs out.

The loop is: schedule (pure Python) -> run the model on the scheduled tokens -> sample ->
append, detokenize, check stops -> free what finished. Everything that touches tensors lives in
the runner and the sampler.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import torch

from chatscale.engine.config import EngineConfig
from chatscale.engine.detokenizer import IncrementalDetokenizer
from chatscale.engine.kv_cache import KVCacheManager
from chatscale.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from chatscale.engine.kv_tier import HostTier
from chatscale.engine.runner import ModelRunner, Work, kv_bytes_per_block, weight_bytes, works_for
from chatscale.engine.tier_costs import TierCosts, measure_tier_costs
from chatscale.engine.sampler import Sampler
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.scheduler import Scheduler
from chatscale.engine.sequence import Sequence
from chatscale.engine.spec_decode import (DraftModelProposer, NgramProposer, Proposal, SpecDecodeStats,
                                          SpecPolicy, verify)
from chatscale.models.loader import GenerationDefaults, load_model
from chatscale.models.tokenizer import Tokenizer

log = logging.getLogger("chatscale.engine")


class ContextLengthError(ValueError):
    """The prompt plus the requested completion does not fit the model's context."""

    code = "context_length_exceeded"


class InvalidRequestError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class StepStats:
    """One step's shape, for metrics, benchmarks and the simulator's cost model."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_prefill_tokens: int = 0
    duration_s: float = 0.0
    # Per scheduled sequence: (tokens already in its KV cache, tokens computed this step). With
    # the model's shapes this gives the step's FLOPs and bytes (attention reads every cached token).
    chunks: list[tuple[int, int]] = field(default_factory=list)
    # MoE models: tokens routed to each expert, one list per MoE layer; None for dense models.
    expert_tokens: list[list[int]] | None = None


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    sent: list[int] = field(default_factory=list)  # tokens already reported, per choice

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, num_blocks: int | None = None) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.model = load_model(config.model, config.dtype, config.device, config.quantization,
                                config.quant_group_size)
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.generation_defaults = GenerationDefaults.from_dir(self.model_path)
        cfg = self.model.cfg
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = set(self.generation_defaults.eos_token_ids or cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(self.model, config, num_blocks)
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        log.info("weights %.1f MiB; KV cache %d pages of %d tokens, %.1f MiB (what the weights leave of the budget)",
                 weight_bytes(self.model) / 2**20, self.runner.num_blocks, config.block_size,
                 self.runner.num_blocks * kv_bytes_per_block(self.model, config.block_size) / 2**20)
        self.tier_report: TierCosts | None = None
        if config.kv_host_bytes and config.enable_prefix_caching:
            self._enable_second_tier()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.last_step = StepStats()
        # Called with every step's StepStats, on the engine's thread (metrics histograms).
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.total_scheduled_tokens = 0  # every token any step computed, prefill and decode
        self._ids = itertools.count()
        self.proposer: DraftModelProposer | NgramProposer | None = None
        self.spec_policy: SpecPolicy | None = None
        self.spec_stats: SpecDecodeStats | None = None
        self._spec_batch = 1  # running sequences when this step was planned
        if config.speculative_model:
            self._enable_speculation()

    def _enable_speculation(self) -> None:
        cfg = self.config
        draft_ratio = 0.0
        if cfg.speculative_model == "ngram":
            self.proposer = NgramProposer(cfg.ngram_prompt_lookup_max, cfg.ngram_prompt_lookup_min)
        else:
            path = cfg.speculative_model
            if path == "demo-draft":
                from chatscale.models.demo import demo_model_path

                path = str(demo_model_path("draft"))
            draft = load_model(path, cfg.dtype, cfg.device)
            if draft.cfg.vocab_size != self.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) differs from the "
                                 f"target's ({self.vocab_size}); a draft must share the target's tokenizer")
            self.proposer = DraftModelProposer(ModelRunner(draft, cfg, self.runner.num_blocks), self.sampler)
            draft_ratio = weight_bytes(draft) / weight_bytes(self.model)
        ridge_tokens = 0.0
        if cfg.speculative_max_batch is None:
            # The same peaks the metrics divide by: measured once per process, or a GPU's datasheet.
            from chatscale.device_peaks import PLANNER_DTYPES, device_peaks

            dtype = self.model.dtype
            ridge = device_peaks(self.runner.device).ridge_point(PLANNER_DTYPES[dtype])
            ridge_tokens = ridge * self.model.dtype.itemsize / 2
        self.spec_policy = SpecPolicy(cfg.num_speculative_tokens, ridge_tokens, draft_ratio,
                                      cfg.speculative_max_batch)
        self.spec_stats = SpecDecodeStats()
        self.scheduler.lookahead = self._lookahead
        log.info("speculative decoding with %s, %d tokens; pays up to batch %d by the roofline (ridge %.1f tokens)",
                 cfg.speculative_model, cfg.num_speculative_tokens,
                 self.spec_policy.largest_batch(SpecPolicy.PRIOR_ACCEPTANCE), ridge_tokens)

    def _enable_second_tier(self) -> None:
        """Keep the second tier only if restoring a page measures cheaper than recomputing it."""
        pages = self.config.kv_host_bytes // kv_bytes_per_block(self.model, self.config.block_size)
        if pages < 1:
            raise ValueError("--kv-host-bytes is smaller than one KV page")
        self.runner.allocate_host_tier(pages, self.config.kv_host_dir)
        self.tier_report = measure_tier_costs(self)
        if self.tier_report.pays:
            self.kv.tier = HostTier(pages)
        else:
            self.runner.host_pages = None
        log.info("second KV tier %s: %s", "on" if self.tier_report.pays else "off (does not pay)", self.tier_report)

    def _lookahead(self, seq: Sequence) -> int:
        """Tokens to propose for `seq`: none where the target's distribution depends on tokens not
        yet known (penalties, min_tokens) or logprobs are asked for, or where the roofline says it
        does not pay at this batch size and this sequence's acceptance; never past max_tokens."""
        p = seq.params
        if p.needs_penalties or p.logprobs is not None or seq.num_output_tokens < p.min_tokens:
            return 0
        if not self.spec_policy.pays(self._spec_batch, self.spec_policy.acceptance(seq)):
            return 0
        room = min(p.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
        return max(0, min(self.config.num_speculative_tokens, room))

    @property
    def model_path(self) -> Path:
        return Path(self.config.model)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, overridden by the caller."""
        return SamplingParams(**{**self.generation_defaults.sampling, **overrides})

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(ids, params)
        now = time.monotonic()
        seqs = [Sequence(request_id, ids, params, index=i, arrival_time=now, cache_salt=cache_salt)
                for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output,
                                         params.skip_special_tokens) for _ in seqs]
        self.requests[request_id] = _Request(request_id, ids, seqs, detoks, RequestMetrics(now), [0] * len(seqs))
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError or ContextLengthError for a request that cannot be served."""
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        bad_bias = [t for t in params.logit_bias if not 0 <= int(t) < vocab]
        if bad_bias:
            raise InvalidRequestError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary [0, {vocab})",
                                      "logit_bias")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids id {bad_stop[0]} is outside the vocabulary [0, {vocab})",
                                      "stop_token_ids")
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - len(ids))
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(ids)} in the messages, {params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        if self.kv.blocks_for(total) > self.kv.num_blocks:
            raise ContextLengthError(
                f"The request needs {total} tokens of KV cache but the cache holds only "
                f"{self.kv.num_blocks * self.kv.block_size}; reduce the prompt or max_tokens."
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is (queued, prefilling, decoding) and free all its pages."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._spec_batch = max(len(self.scheduler.running), 1)  # what speculation's roofline sees
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self.runner.apply_copies(plan.copies)
            return []
        start = time.monotonic()
        works = works_for(plan.scheduled)
        proposals = self.proposer.propose(plan.lookahead) if plan.lookahead else {}
        for w in works:
            proposal = proposals.get(w.seq)
            if proposal is not None and proposal.tokens:
                w.ids = w.ids + proposal.tokens
                w.num_logits = len(w.ids)
        chunks = [(w.start, len(w.ids)) for w in works]
        num_tokens = sum(n for _, n in chunks)
        logits = self.runner.run(works, plan.copies)
        for seq, _ in plan.scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = start
        self.scheduler.advance(plan)
        self.total_scheduled_tokens += num_tokens
        new_tokens = self._sample(works, logits, proposals)
        now = time.monotonic()
        self.last_step = StepStats(
            num_seqs=len(plan.scheduled),
            num_tokens=num_tokens,
            num_prefill_tokens=sum(n for _, n in plan.scheduled if n > 1),
            duration_s=now - start,
            chunks=chunks,
            expert_tokens=self.model.expert_tokens(),
        )
        for listener in self.step_listeners:
            listener(self.last_step)
        touched: dict[str, _Request] = {}
        for seq, tokens, logprobs in new_tokens:
            req = self.requests[seq.request_id]
            detok = req.detoks[seq.index]
            for token, lp in zip(tokens, logprobs):
                seq.append_token(token)
                if lp is not None:
                    seq.output_logprobs.append(lp)
                seq.first_token_time = seq.first_token_time or now
                seq.last_token_time = now
                detok.add(token)
                if seq.check_stop(self.eos_token_ids, self.max_model_len):
                    self.scheduler.finish(seq)
                elif detok.stopped_by is not None:
                    seq.stop_reason = detok.stopped_by
                    self.scheduler.finish(seq, "stop")
                if seq.is_finished:
                    break
            if seq in plan.lookahead and not seq.is_finished:
                self.scheduler.accept(seq, len(tokens) - 1)
                seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_computed_tokens)
            touched[req.request_id] = req
        return [self._output(req, now) for req in touched.values()]

    def _sample(self, works: list[Work], logits: torch.Tensor, proposals: dict[Sequence, Proposal]
                ) -> list[tuple[Sequence, list[int], list]]:
        """New tokens per sequence, in batch order: one sampled token for a plain row; for a
        speculating sequence, its accepted proposals plus one token of the target's."""
        plain_rows, plain, spec, row = [], [], [], 0
        for w in works:
            if w.num_logits > 1:
                spec.append((w.seq, row, w.num_logits))
            elif w.num_logits:
                plain_rows.append(row)
                plain.append(w.seq)
            row += w.num_logits
        result: dict[Sequence, tuple[list[int], list]] = {}
        if plain:
            tokens, logprobs = self.sampler(logits[torch.tensor(plain_rows, device=logits.device)], plain)
            result.update((seq, ([t], [lp])) for seq, t, lp in zip(plain, tokens, logprobs))
        if spec:
            rows = torch.cat([torch.arange(r, r + n) for _, r, n in spec]).to(logits.device)
            dist = self.sampler.distribution(logits[rows], [seq for seq, _, n in spec for _ in range(n)])
            at = 0
            for seq, _, n in spec:
                tokens = verify(dist[at:at + n], proposals[seq], seq)
                at += n
                self.spec_stats.drafts += 1
                self.spec_stats.draft_tokens += n - 1
                self.spec_stats.accepted_tokens += len(tokens) - 1
                seq.num_spec_draft_tokens += n - 1
                seq.num_spec_accepted_tokens += len(tokens) - 1
                result[seq] = (tokens, [None] * len(tokens))
        return [(w.seq, *result[w.seq]) for w in works if w.seq in result]

    def _output(self, req: _Request, now: float) -> RequestOutput:
        outs = []
        for i, (seq, detok) in enumerate(zip(req.seqs, req.detoks)):
            new = seq.output_token_ids[req.sent[i]:]
            sent_before, req.sent[i] = req.sent[i], seq.num_output_tokens
            want_lp = seq.params.logprobs is not None
            outs.append(CompletionOutput(
                index=seq.index,
                text=detok.text,
                token_ids=seq.output_token_ids,
                delta_text=detok.flush(seq.is_finished),
                delta_token_ids=new,
                logprobs=list(seq.output_logprobs) if want_lp else None,
                delta_logprobs=seq.output_logprobs[sent_before:] if want_lp else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        m = req.metrics
        m.first_scheduled_time = m.first_scheduled_time or min(
            (s.first_scheduled_time for s in req.seqs if s.first_scheduled_time), default=None)
        m.first_token_time = m.first_token_time or min(
            (s.first_token_time for s in req.seqs if s.first_token_time), default=None)
        finished = req.finished
        if finished:
            m.finished_time = now
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished,
                             min(s.num_cached_tokens for s in req.seqs), m, step_time=now)
