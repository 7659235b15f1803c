"""Scheduler + KV manager as the simulator sees them: no model, just token counts."""

from __future__ import annotations

from collections import Counter

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


def step(sched: Scheduler) -> list[Sequence]:
    """One engine step with a fake model: every sequence that reaches its end gets token 7."""
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
    appended = sched.update_from_output(out, {seq: [7] for seq in out.sampled}, 0.0, 0.0)
    return [seq for seq, _ in appended if seq.is_finished]


# prompt length, max_tokens, arrival step, prompt family (same family: a shared prefix)
request = st.tuples(st.integers(1, 80), st.integers(1, 24), st.integers(0, 6), st.integers(0, 2))


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(request, min_size=1, max_size=24),
    block_size=st.sampled_from([1, 4, 16]),
    spare_blocks=st.integers(0, 40),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 96),
    aborts=st.sets(st.integers(0, 23), max_size=6),
    abort_step=st.integers(0, 30),
    prefix_caching=st.booleans(),
    tier_pages=st.sampled_from([0, 3, 64]),
)
def test_every_request_completes_and_no_block_leaks(requests, block_size, spare_blocks, max_num_seqs, budget,
                                                    aborts, abort_step, prefix_caching, tier_pages):
    need = max(-(-(p + m) // block_size) for p, m, _, _ in requests)
    tier = HostTier(tier_pages) if tier_pages else None
    kv = KVCacheManager(need + spare_blocks, block_size, prefix_caching, tier=tier)  # the largest fits alone
    sched = Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs = [Sequence(f"r{i}", [10 + f] * (p // 2) + list(range(p - p // 2)), SamplingParams(max_tokens=m))
            for i, (p, m, _, f) in enumerate(requests)]
    done: set[int] = set()
    for t in range(10_000):
        for seq, (_, _, arrival, _) in zip(seqs, requests):
            if arrival == t:
                sched.add(seq)
        if t == abort_step:
            for i in aborts:
                if i < len(seqs) and seqs[i].status is not SequenceStatus.FINISHED and requests[i][2] <= t:
                    sched.finish(seqs[i], "abort")
                    done.add(i)
        live = [s for s in seqs if s.status is not SequenceStatus.FINISHED]
        check_invariants(sched, live)
        finished = step(sched)
        done |= {seqs.index(s) for s in finished}
        if len(done) == len(seqs):
            break
    else:
        raise AssertionError("requests starved")
    assert kv.num_free_blocks == kv.num_blocks
    for i, seq in enumerate(seqs):
        assert seq.is_finished
        if seq.finish_reason == "length":
            assert seq.num_output_tokens == requests[i][1]


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
