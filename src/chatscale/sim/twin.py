"""A replica twin: chatscale's real Scheduler and KVCacheManager, stepped on a simulated clock.

It is the engine core's step with the model replaced by a step-cost model: schedule -> cost the
step's chunks -> `Scheduler.update_from_output` (the engine's own post-step bookkeeping: pages fill
and join the prefix cache, every sequence whose last known token was computed gains a token, stops
are checked, finished sequences freed). A step is split in two so a fleet can interleave many
replicas: `begin_step` plans and costs it and returns when it ends; `end_step` delivers its tokens
at that time. Arrivals in between wait for the next step, exactly as requests added while the
engine runs a step do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatscale.engine.config import EngineConfig
from chatscale.engine.kv_cache import KVCacheManager
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.scheduler import Scheduler, SchedulerOutput
from chatscale.engine.sequence import Sequence
from chatscale.sim.cost import StepCostModel
from chatscale.sim.results import RequestLog
from chatscale.sim.tokens import token_at

NO_EOS: frozenset[int] = frozenset()  # answers run to their trace length, as with ignore_eos


@dataclass
class TwinConfig:
    """The engine settings that shape scheduling (EngineConfig's names and, where it has them, its
    defaults, so the twin schedules as a default engine does)."""

    num_blocks: int = 4096
    block_size: int = EngineConfig.block_size
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    fair_share_seqs: int = EngineConfig.fair_share_seqs
    max_model_len: int = 1 << 20
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    vocab: int = 32000


@dataclass
class StepRecord:
    start: float
    seconds: float
    seqs: int
    tokens: int
    kv_usage: float


@dataclass(eq=False)
class ReplicaTwin:
    cost: StepCostModel
    config: TwinConfig = field(default_factory=TwinConfig)
    log: RequestLog | None = None  # where finished requests are written (by request index)
    record_steps: bool = False

    def __post_init__(self) -> None:
        c = self.config
        self.kv = KVCacheManager(c.num_blocks, c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len, NO_EOS,
                                   c.fair_share_seqs)
        self.steps: list[StepRecord] = []
        self.busy_until: float | None = None  # end of the step in flight
        self._plan: SchedulerOutput | None = None
        self._started = 0.0
        self._answer_key: dict[Sequence, int] = {}
        self.num_steps = 0
        self.outstanding = 0  # requests added and not finished

    # ---- requests -------------------------------------------------------------------------------
    def fits(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether the engine would accept it (LLMEngine.check_request's KV-capacity test)."""
        total = prompt_tokens + output_tokens
        return total <= self.config.max_model_len and self.kv.blocks_for(total) <= self.kv.num_blocks

    def add(self, index: int, prompt_ids: list[int], output_tokens: int, arrival: float,
            answer_key: int, cache_salt: str | None = None) -> None:
        seq = Sequence(str(index), prompt_ids, SamplingParams(max_tokens=output_tokens, ignore_eos=True),
                       arrival_time=arrival, cache_salt=cache_salt)
        self._answer_key[seq] = answer_key
        self.scheduler.add(seq)
        self.outstanding += 1

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------
    def begin_step(self, now: float) -> float | None:
        """Plan and cost a step starting at `now`; returns its end time, or None if idle."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return None
        chunks = [(seq.num_computed_tokens, n) for seq, n in plan.scheduled]
        seconds = self.cost.step_seconds(chunks)
        if self.record_steps:
            self.steps.append(StepRecord(now, seconds, len(chunks), plan.num_batched_tokens, self.kv.usage))
        self._plan, self._started = plan, now
        self.busy_until = now + seconds
        self.num_steps += 1
        return self.busy_until

    def end_step(self) -> list[Sequence]:
        """Deliver the planned step's tokens at its end time; returns the sequences that finished."""
        plan, now = self._plan, self.busy_until
        self._plan = self.busy_until = None
        vocab = self.config.vocab
        tokens = {seq: [token_at(self._answer_key[seq], seq.num_tokens, vocab)] for seq in plan.sampled}
        finished = []
        for seq, _ in self.scheduler.update_from_output(plan, tokens, self._started, now):
            if seq.is_finished:
                self._finish(seq, now)
                finished.append(seq)
        return finished

    def _finish(self, seq: Sequence, now: float) -> None:
        del self._answer_key[seq]
        self.outstanding -= 1
        if self.log is not None:
            i = int(seq.request_id)
            log = self.log
            log.first_token[i], log.finish[i] = seq.first_token_time, now
            log.output[i], log.cached[i] = seq.num_output_tokens, seq.num_cached_tokens

    def run_until_idle(self, now: float) -> float:
        """Step until nothing is left; returns the clock at the end."""
        while (end := self.begin_step(now)) is not None:
            self.end_step()
            now = end
        return now

    # ---- load, as the gateway sees it -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
