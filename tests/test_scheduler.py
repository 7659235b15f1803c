"""Scheduler + KV manager as the simulator sees them: no model, just token counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from chatscale.engine.kv_cache import KVCacheManager
from chatscale.engine.kv_tier import HostTier
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.scheduler import Scheduler
from chatscale.engine.sequence import Sequence, SequenceStatus


def check_invariants(sched: Scheduler, live: list[Sequence]) -> None:
    kv = sched.kv
    holders = Counter(b for s in live for b in s.block_table)
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"
    for block in kv.blocks:
        assert block.ref_count == holders[block.block_id], "reference count out of step with holders"
    assert len(holders) + kv.num_free_blocks == kv.num_blocks, "a block leaked"
    for block in kv.blocks:  # a cached chain never has a hole: every cached page's parent is cached
        if block.hash is not None and block.parent is not None:
            assert kv.blocks[block.parent].hash is not None
    for s in sched.waiting:
        assert s.status is SequenceStatus.WAITING
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) >= kv.blocks_for(s.num_computed_tokens)
    assert len(sched.running) <= sched.max_num_seqs


def step(sched: Scheduler, token: Callable[[Sequence], int] = lambda seq: 7) -> list[Sequence]:
    """One engine step with a fake model: every sequence that reaches its end gets `token(seq)`."""
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    for kind, a, b in out.copies:  # page moves name real pages and tier slots
        block, slot = (a, b) if kind == "out" else (b, a)
        assert kind in ("out", "in") and 0 <= block < sched.kv.num_blocks
        assert 0 <= slot < sched.kv.tier.num_slots
    assert len({id(s) for s, _ in out.scheduled}) == len(out.scheduled)
    for seq, n in out.scheduled:
        assert n >= 1 and seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) * sched.kv.block_size >= seq.num_computed_tokens + n
    assert len(out.preempted) == len(set(map(id, out.preempted)))
    appended = sched.update_from_output(out, {seq: [token(seq)] for seq in out.sampled}, 0.0, 0.0)
    return [seq for seq, _ in appended if seq.is_finished]


def distinct_token(seq: Sequence) -> int:
    """Different tokens per choice, as sampling gives: no two choices share a page past the prompt."""
    return 100 + (seq.index * 31 + seq.num_tokens) % 5000


# prompt length, max_tokens, arrival step, prompt family (same family: a shared prefix), choices (n)
request = st.tuples(st.integers(1, 80), st.integers(1, 24), st.integers(0, 6), st.integers(0, 2), st.integers(1, 4))


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(request, min_size=1, max_size=16),
    block_size=st.sampled_from([1, 4, 16]),
    spare_blocks=st.integers(0, 40),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 96),
    aborts=st.sets(st.integers(0, 15), max_size=4),
    abort_step=st.integers(0, 30),
    prefix_caching=st.booleans(),
    tier_pages=st.sampled_from([0, 3, 64]),
    fair_share=st.sampled_from([None, 1, 2]),
)
def test_every_request_completes_and_no_block_leaks(requests, block_size, spare_blocks, max_num_seqs, budget,
                                                    aborts, abort_step, prefix_caching, tier_pages, fair_share):
    need = max(-(-(p + m) // block_size) for p, m, *_ in requests)
    tier = HostTier(tier_pages) if tier_pages else None
    kv = KVCacheManager(need + spare_blocks, block_size, prefix_caching, tier=tier)  # the largest fits alone
    sched = Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, fair_share_seqs=fair_share)
    choices = [[Sequence(f"r{i}", [10 + f] * (p // 2) + list(range(p - p // 2)), SamplingParams(n=n, max_tokens=m),
                         index=j) for j in range(n)] for i, (p, m, _, f, n) in enumerate(requests)]
    seqs = [s for c in choices for s in c]
    for t in range(10_000):
        for request, (_, _, arrival, _, _) in zip(choices, requests):
            if arrival == t:
                for seq in request:
                    sched.add(seq)
        if t == abort_step:
            for i in aborts:
                for seq in choices[i] if i < len(choices) and requests[i][2] <= t else []:
                    if not seq.is_finished:
                        sched.finish(seq, "abort")
        check_invariants(sched, [s for s in seqs if not s.is_finished])
        step(sched, distinct_token)
        if all(s.is_finished for s in seqs):
            break
    else:
        raise AssertionError("requests starved")
    assert kv.num_free_blocks == kv.num_blocks
    for seq in seqs:
        if seq.finish_reason == "length":
            assert seq.num_output_tokens == seq.params.max_tokens


def test_decodes_keep_flowing_while_a_long_prompt_is_chunked():
    kv = KVCacheManager(100, 4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16)
    short = Sequence("short", [1] * 3, SamplingParams(max_tokens=50))
    sched.add(short)
    step(sched)  # prefill of the short prompt
    long = Sequence("long", [1] * 100, SamplingParams(max_tokens=5))
    sched.add(long)
    for _ in range(6):
        out = sched.schedule()
        sizes = {s.request_id: n for s, n in out.scheduled}
        assert sizes["short"] == 1 and sizes["long"] == 15  # decode first, the chunk fills the rest
        sched.update_from_output(out, {seq: [7] for seq in out.sampled}, 0.0, 0.0)


def test_preemption_takes_the_newest_and_requeues_it_first():
    kv = KVCacheManager(6, 4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = (Sequence(x, [ord(x)] * 8, SamplingParams(max_tokens=20)) for x in "abc")
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # a, b, c prefilled: 2 blocks each, the pool is full
    out = sched.schedule()  # a needs a third block: c, the newest, is preempted
    assert [s.request_id for s in out.preempted] == ["c"]
    assert sched.waiting[0] is c and c.num_computed_tokens == 0 and not c.block_table
    assert [s.request_id for s, _ in out.scheduled] == ["a", "b"]


def n_choices(request_id: str, n: int, max_tokens: int, prompt: list[int]) -> list[Sequence]:
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, logprobs=20 if n > 1 else None)
    return [Sequence(request_id, prompt, params, index=i) for i in range(n)]


def steps_until_a_small_request_finishes(num_blocks: int, fair_share: int | None,
                                        arrive_after: int = 1) -> tuple[int, list[Sequence], Sequence]:
    """Issue 17: n=128 x 200 tokens fills the batch, then an 8-token request arrives."""
    sched = Scheduler(KVCacheManager(num_blocks, 16), max_num_seqs=128, max_num_batched_tokens=2048,
                      fair_share_seqs=fair_share)
    big = n_choices("big", 128, 200, [1, 2, 3])
    for seq in big:
        sched.add(seq)
    step(sched, distinct_token)
    assert len(sched.running) == 128  # alone, one request may fill the whole batch
    for _ in range(arrive_after - 1):
        step(sched, distinct_token)
    (small,) = n_choices("small", 1, 8, [5, 6, 7, 8])
    sched.add(small)
    steps = 0
    while not small.is_finished:
        step(sched, distinct_token)
        steps += 1
    while sched.has_work():
        step(sched, distinct_token)
    assert all(s.num_output_tokens == 200 and s.finish_reason == "length" for s in big)
    return steps, big, small


def test_a_request_over_its_fair_share_lends_its_slots_to_a_newcomer():
    """8 steps (one prefill, seven decodes), as if alone; 207 before, behind all 128 choices."""
    assert steps_until_a_small_request_finishes(4096, fair_share=None)[0] == 207  # plain FCFS
    steps, big, _ = steps_until_a_small_request_finishes(4096, fair_share=16)
    assert steps == 8
    assert sum(s.num_preemptions for s in big) == 1  # one slot taken back, from the newest choice
    assert big[-1].num_preemptions == 1


def test_a_request_over_its_fair_share_is_preempted_first_when_pages_run_out():
    """900 pages hold 69 of the 128 choices at full length: by step 120 preemptions have begun. Under
    plain FCFS the newcomer queues behind the preempted choices (92 steps); with fair shares it
    takes pages back from the big request at once."""
    steps, _, small = steps_until_a_small_request_finishes(900, fair_share=None, arrive_after=120)
    assert steps > 80
    steps, big, small = steps_until_a_small_request_finishes(900, fair_share=16, arrive_after=120)
    assert steps == 8 and small.num_preemptions == 0 and sum(s.num_preemptions for s in big) > 50


def test_requests_within_their_share_are_fcfs_and_over_share_ones_go_last():
    kv = KVCacheManager(1000, 4)
    sched = Scheduler(kv, max_num_seqs=6, max_num_batched_tokens=256, fair_share_seqs=2)
    a, b, c = n_choices("a", 5, 4, [1] * 4), n_choices("b", 3, 4, [2] * 4), n_choices("c", 1, 4, [3] * 4)
    for seq in a + b + c:
        sched.add(seq)
    out = sched.schedule()
    # a's and b's first two, then c (under its share), then the free slot goes to a (FCFS)
    assert [(s.request_id, s.index) for s, _ in out.scheduled] == [("a", 0), ("a", 1), ("b", 0), ("b", 1),
                                                                    ("c", 0), ("a", 2)]
    assert not out.preempted


def test_a_request_at_its_share_is_never_preempted_for_another():
    kv = KVCacheManager(1000, 4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=256, fair_share_seqs=2)
    for seq in n_choices("a", 2, 50, [1] * 4) + n_choices("b", 2, 50, [2] * 4):
        sched.add(seq)
    step(sched)
    late = n_choices("c", 1, 4, [3] * 4)[0]
    sched.add(late)
    out = sched.schedule()
    assert not out.preempted and late.status is SequenceStatus.WAITING  # a full batch of fair shares


def test_pages_running_out_preempt_the_request_over_its_share_not_the_newest_sequence():
    def run(fair_share: int | None) -> tuple[list[str], list[str]]:
        sched = Scheduler(KVCacheManager(7, 4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, fair_share_seqs=fair_share)
        for seq in n_choices("big", 4, 20, [1] * 4) + n_choices("small", 1, 20, [2] * 4):
            sched.add(seq)
        step(sched)  # five prompts of one page each; every decode now needs a second page, two are free
        out = sched.schedule()
        names = [f"{s.request_id}{s.index}" for s, _ in out.scheduled]
        return names, [f"{s.request_id}{s.index}" for s in out.preempted]

    assert run(None) == (["big0", "big1", "big2"], ["small0", "big3"])  # FCFS: the newest goes first
    # big2 was scheduled already when small0 needed its page: it is taken out of the step again
    assert run(2) == (["big0", "big1", "small0"], ["big3", "big2"])
