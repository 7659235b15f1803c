"""The engine core: schedule -> execute -> update, one step at a time, on token ids only.

It owns the scheduler, the KV manager and an executor (the model), and knows nothing of text: the
server tokenizes, detokenizes and watches stop strings (engine/output_processor.py). Each step
returns the *new* tokens of the sequences it touched, a stats record and a load snapshot, as plain
messages, so the same core runs in the server's own engine process (engine/core_process.py) or
inside the offline engine (engine/engine.py).

A step that raises fails only the requests it scheduled (their pages freed); after
`max_failed_steps` failures in a row the core gives up (EngineDeadError).
"""

from __future__ import annotations

import logging
import time
import traceback

from chatscale.engine.config import EngineConfig
from chatscale.engine.errors import EngineDeadError
from chatscale.engine.executor import ModelOutput, make_executor
from chatscale.engine.kv_cache import KVCacheManager
from chatscale.engine.kv_tier import HostTier
from chatscale.engine.messages import AddRequest, EngineInfo, EngineSnapshot, SeqDelta, StepResult, StepStats
from chatscale.engine.native_memory import bound_matmul_kernel_caches
from chatscale.engine.runner import kv_bytes_per_block
from chatscale.engine.scheduler import Scheduler, SchedulerOutput
from chatscale.engine.sequence import Sequence
from chatscale.engine.spec_decode import SpecDecodeStats, SpecPolicy
from chatscale.engine.tier_costs import TierCosts, measure_tier_costs
from chatscale.engine.structured.hook import StructuredOutputs
from chatscale.models.loader import GenerationDefaults, model_config, model_path
from chatscale.models.tokenizer import Tokenizer

log = logging.getLogger("chatscale.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, num_blocks: int | None = None) -> None:
        import torch

        bound_matmul_kernel_caches()  # before the first matmul (the dtype probe, the peaks, the model)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.config = config
        path = model_path(config.model)
        self.generation_defaults = GenerationDefaults.from_dir(path)
        tokenizer = Tokenizer.from_dir(path)
        eos = set(self.generation_defaults.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        vocab = model_config(path).vocab_size
        # Grammars of constrained requests: compiled on a thread, masks filled while the forward runs.
        self.structured = StructuredOutputs(tokenizer.to_json(), vocab, sorted(eos))
        self.executor = make_executor(config, frozenset(eos), num_blocks, self.structured)
        self.model = self.executor.model
        cfg = self.model.cfg
        self.eos_token_ids = frozenset(eos or cfg.eos_token_ids)
        self.max_model_len = config.context_len(cfg.max_position_embeddings)
        self.kv = KVCacheManager(self.executor.num_blocks, config.block_size, config.enable_prefix_caching)
        self.tier_report: TierCosts | None = None
        if config.kv_host_bytes and config.enable_prefix_caching:
            self._enable_second_tier()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, self.eos_token_ids, config.fair_share_seqs)
        self.requests: dict[str, list[Sequence]] = {}
        self.spec_policy: SpecPolicy | None = None
        self.spec_stats: SpecDecodeStats | None = None
        self._spec_batch = 1  # running sequences when this step was planned
        if config.speculative_model:
            self._enable_speculation()
        self.failed_steps = 0  # in a row
        self.last_step = StepStats()

    # ---- set-up -----------------------------------------------------------------------------------
    def _enable_speculation(self) -> None:
        cfg = self.config
        ridge_tokens = 0.0
        if cfg.speculative_max_batch is None:
            ridge_tokens = self.peaks.ridge_point(self.dtype_name) * self.model.dtype.itemsize / 2
        self.spec_policy = SpecPolicy(cfg.num_speculative_tokens, ridge_tokens, self.executor.draft_weight_ratio,
                                      cfg.speculative_max_batch)
        self.spec_stats = SpecDecodeStats()
        self.scheduler.lookahead = self._lookahead
        log.info("speculative decoding with %s, %d tokens; pays up to batch %d by the roofline (ridge %.1f tokens)",
                 cfg.speculative_model, cfg.num_speculative_tokens,
                 self.spec_policy.largest_batch(SpecPolicy.PRIOR_ACCEPTANCE), ridge_tokens)

    def _enable_second_tier(self) -> None:
        """Keep the second tier only if restoring a page measures cheaper than recomputing it."""
        runner = self.executor.runner
        pages = self.config.kv_host_bytes // kv_bytes_per_block(self.model, self.config.block_size)
        if pages < 1:
            raise ValueError("--kv-host-bytes is smaller than one KV page")
        runner.allocate_host_tier(pages, self.config.kv_host_dir)
        self.tier_report = self.config.kv_tier_costs or measure_tier_costs(runner, self.kv)
        if self.tier_report.pays:
            self.kv.tier = HostTier(pages)
        else:
            runner.host_pages = None
        log.info("second KV tier %s: %s", "on" if self.tier_report.pays else "off (does not pay)", self.tier_report)

    @property
    def dtype_name(self) -> str:
        from chatscale.device_peaks import PLANNER_DTYPES

        return PLANNER_DTYPES[self.model.dtype]

    @property
    def peaks(self):
        """The device's peaks, measured once per process on a CPU (the metrics divide by the same)."""
        from chatscale.device_peaks import device_peaks

        return device_peaks(self.model.device)

    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.config.model, max_model_len=self.max_model_len, vocab_size=self.model.cfg.vocab_size,
            num_blocks=self.kv.num_blocks, block_size=self.kv.block_size, max_num_seqs=self.scheduler.max_num_seqs,
            dtype=self.dtype_name, device=str(self.model.device), model_config=self.model.cfg.raw,
            sampling_defaults=dict(self.generation_defaults.sampling), peaks=self.peaks,
            kv_cache_bytes=self.kv.num_blocks * kv_bytes_per_block(self.model, self.kv.block_size),
            weight_bytes=self.model.weight_bytes(), resident_weight_bytes=self.model.resident_bytes(),
            weight_storage=self.model.weight_storage(),
            kv_tier_pages=0 if self.kv.tier is None else self.kv.tier.num_slots,
            tensor_parallel_size=self.config.tensor_parallel_size)

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

    # ---- requests (already validated by whoever took them) ------------------------------------------
    def add_request(self, req: AddRequest) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        arrival = req.arrival_time or time.monotonic()
        seqs = [Sequence(req.request_id, req.prompt_token_ids, req.params, index=i, arrival_time=arrival,
                         cache_salt=req.cache_salt, group_id=req.group_id) for i in range(req.params.n)]
        self.requests[req.request_id] = seqs
        if req.params.structured is not None:
            self.structured.start(req.request_id, seqs)  # scheduled once its grammar is compiled
            return
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str, index: int | None = None, keep_tokens: int | None = None) -> None:
        """Stop a request wherever it is, or one of its choices that a stop string ended (the pages
        past `keep_tokens` leave the prefix cache); its pages are freed at once."""
        seqs = self.requests.get(request_id, [])
        if index is None:
            self.structured.abort(request_id)
        for seq in seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self.scheduler.finish(seq, "abort" if index is None else "stop", keep_tokens)
        self._forget_if_done(request_id)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[request_id]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.structured.num_pending > 0

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> StepResult | None:
        """Run one step; None when there was nothing to run."""
        failed = self._admit_compiled()
        self._spec_batch = max(len(self.scheduler.running), 1)  # what speculation's roofline sees
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self.executor.apply_copies(plan.copies)
            if failed:
                return StepResult(failed, self.snapshot())
            self.structured.wait()  # nothing to run but grammars compiling: wait for one
            return None
        start = time.monotonic()
        sampled_before = plan.sampled
        try:
            out = self.executor.execute(plan)
        except EngineDeadError:
            raise
        except Exception as exc:  # fail this step's requests, keep serving the rest
            return self._fail_step(plan, exc)
        self.failed_steps = 0
        now = time.monotonic()
        chunks = [(seq.num_computed_tokens, n + out.proposed.get(seq, 0)) for seq, n in plan.scheduled]
        appended = self.scheduler.update_from_output(plan, {s: out.tokens[s] for s in sampled_before}, start, now)
        self._count_speculation(out)
        self.last_step = StepStats(
            num_seqs=len(chunks), num_tokens=sum(n for _, n in chunks),
            num_prefill_tokens=sum(n for _, n in plan.scheduled if n > 1), duration_s=now - start, end_time=now,
            chunks=chunks, expert_tokens=out.expert_tokens, collective_s=out.collective_s)
        deltas = failed + [self._delta(seq, tokens, out) for seq, tokens in appended]
        for seq, _ in appended:
            if seq.is_finished:
                self._forget_if_done(seq.request_id)
        return StepResult(deltas, self.snapshot(), self.last_step)

    def _admit_compiled(self) -> list[SeqDelta]:
        """Schedule requests whose grammar compiled; end those whose grammar failed ("abort", the
        reason in stop_reason) and return their deltas."""
        failed = []
        for seqs, error in self.structured.ready():
            if error is None:
                for seq in seqs:
                    self.scheduler.add(seq)
                continue
            log.warning("request %s: its grammar failed to compile: %s", seqs[0].request_id, error)
            for seq in seqs:
                seq.stop_reason = f"grammar error: {error}"
                self.scheduler.finish(seq, "abort")
                failed.append(SeqDelta(seq.request_id, seq.index, [], None, "abort", seq.stop_reason))
            self._forget_if_done(seqs[0].request_id)
        return failed

    def _delta(self, seq: Sequence, tokens: list[int], out: ModelOutput) -> SeqDelta:
        lps = out.logprobs.get(seq) if seq.params.logprobs is not None else None
        return SeqDelta(seq.request_id, seq.index, tokens, None if lps is None else lps[:len(tokens)],
                        seq.finish_reason, seq.stop_reason, seq.num_cached_tokens, seq.first_scheduled_time)

    def _count_speculation(self, out: ModelOutput) -> None:
        for seq, n in out.proposed.items():
            accepted = len(out.tokens[seq]) - 1
            self.spec_stats.drafts += 1
            self.spec_stats.draft_tokens += n
            self.spec_stats.accepted_tokens += accepted
            seq.num_spec_draft_tokens += n
            seq.num_spec_accepted_tokens += accepted

    def _fail_step(self, plan: SchedulerOutput, exc: Exception) -> StepResult:
        self.failed_steps += 1
        log.error("engine step failed (%d in a row); failing its requests:\n%s", self.failed_steps,
                  "".join(traceback.format_exception(exc)))
        if self.failed_steps >= self.config.max_failed_steps:
            raise EngineDeadError(f"{self.failed_steps} engine steps failed in a row; the last: {exc!r}") from exc
        failed = {seq.request_id for seq, _ in plan.scheduled}
        for request_id in failed:
            for seq in self.requests.pop(request_id):
                if not seq.is_finished:
                    self.scheduler.finish(seq, "error")
        message = f"the engine step running this request failed: {type(exc).__name__}: {exc}"
        return StepResult([], self.snapshot(), None, {request_id: message for request_id in failed})

    def snapshot(self) -> EngineSnapshot:
        kv, stats, spec = self.kv, self.kv.stats, self.spec_stats
        return EngineSnapshot(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_blocks=kv.num_blocks, num_used_blocks=kv.num_used_blocks,
            num_cached_free_blocks=kv.num_cached_free_blocks, num_requests=len(self.requests),
            prefix_cache_queries=stats.queries, prefix_cache_hits=stats.hits,
            prefix_cache_recomputed=stats.recomputed, kv_cache_evictions=stats.evictions,
            kv_tier_stores=stats.tier_stores, kv_tier_restores=stats.tier_restores,
            num_preemptions=self.scheduler.num_preemptions,
            spec_drafts=None if spec is None else spec.drafts,
            spec_draft_tokens=None if spec is None else spec.draft_tokens,
            spec_accepted_tokens=None if spec is None else spec.accepted_tokens)

    def shutdown(self) -> None:
        self.executor.shutdown()
