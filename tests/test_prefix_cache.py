"""Prefix caching: returning conversations compute only their new tokens, and nothing else changes."""

from __future__ import annotations


from chatscale.engine.kv_cache import KVCacheManager
from chatscale.engine.llm import LLM
from chatscale.engine.sampling_params import SamplingParams
from chatscale.engine.scheduler import Scheduler
from chatscale.engine.sequence import Sequence
from chatscale.engine.tier_costs import TierCosts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def run(llm: LLM, prompt, params=GREEDY, salt=None):
    """One request alone: its output and the tokens the scheduler computed for it."""
    e = llm.engine
    before = e.total_scheduled_tokens
    rid = e.add_request(prompt, params, cache_salt=salt)
    out = None
    while e.has_unfinished_requests():
        out = next((o for o in e.step() if o.request_id == rid), out)
    return out, e.total_scheduled_tokens - before


def test_second_turn_computes_only_its_new_tokens_and_matches_cache_off(checkpoint):
    on = LLM(str(checkpoint("llama")), num_blocks=256, block_size=4)
    off = LLM(str(checkpoint("llama")), num_blocks=256, block_size=4, enable_prefix_caching=False)
    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a KV cache?"}]
    turn1 = on.chat_prompt(conv)
    out1, cost1 = run(on, turn1)
    assert out1.num_cached_tokens == 0 and cost1 == len(turn1) + 24 - 1
    answer = out1.outputs[0].text
    conv2 = conv + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And paging?"}]
    turn2 = on.chat_prompt(conv2)
    assert turn2[: len(turn1)] == turn1
    out2, cost2 = run(on, turn2)
    # Everything turn 1 computed (its prompt and the answer's tokens) is reused, in whole pages.
    reusable = len(turn1) + len(out1.outputs[0].token_ids) - 1
    shared = next(i for i, (a, b) in enumerate(zip(turn2, turn1 + out1.outputs[0].token_ids)) if a != b)
    expected_hit = min(reusable, shared) // 4 * 4
    assert out2.num_cached_tokens == expected_hit > len(turn1) - 4
    assert cost2 == len(turn2) - expected_hit + 24 - 1
    ref2, ref_cost2 = run(off, turn2)
    assert out2.outputs[0].token_ids == ref2.outputs[0].token_ids
    assert ref_cost2 == len(turn2) + 24 - 1 and ref2.num_cached_tokens == 0


def test_batched_greedy_identical_with_cache_on_and_off(checkpoint):
    prefix = list(range(5, 45))
    prompts = [prefix + [50 + i] * (i + 1) for i in range(6)] + [prefix[:10]]
    on = LLM(str(checkpoint("qwen3")), num_blocks=256, block_size=4)
    off = LLM(str(checkpoint("qwen3")), num_blocks=256, block_size=4, enable_prefix_caching=False)
    on.generate(prompts[0], GREEDY)  # warm the cache with the shared prefix
    a = [o.outputs[0].token_ids for o in on.generate(prompts, GREEDY)]
    b = [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY)]
    assert a == b
    assert on.engine.kv.stats.hits > 0 and off.engine.kv.stats.hits == 0


def test_cache_salt_isolates_tenants(checkpoint):
    llm = LLM(str(checkpoint("llama")), num_blocks=256, block_size=4)
    prompt = list(range(5, 45))
    run(llm, prompt, salt="tenant-a")
    assert run(llm, prompt, salt="tenant-b")[0].num_cached_tokens == 0
    assert run(llm, prompt, salt="tenant-a")[0].num_cached_tokens == 36


def test_n_choices_share_the_prompt_pages(checkpoint):
    llm = LLM(str(checkpoint("llama")), num_blocks=256, block_size=4)
    out = llm.generate(list(range(5, 45)), SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8))[0]
    assert len(out.outputs) == 3
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks  # shared pages were released exactly once each


# ---- the KV manager alone ------------------------------------------------------------------------

def admit(sched: Scheduler, tokens: list[int], salt=None) -> Sequence:
    seq = Sequence("r", tokens, SamplingParams(max_tokens=1), cache_salt=salt)
    sched.add(seq)
    out = sched.schedule()
    sched.update_from_output(out, {}, 0.0, 0.0)  # computed, nothing sampled yet
    assert seq.num_computed_tokens == seq.num_tokens
    return seq


def test_idle_conversation_is_evicted_before_the_active_one_and_tail_first():
    kv = KVCacheManager(12, 4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256)
    old = admit(sched, [1] * 16 + [2])  # 5 pages, 4 full
    active = admit(sched, [3] * 16 + [4])  # 5 pages, 4 full
    sched.finish(old)  # old goes idle: its full pages stay cached
    sched.finish(active)
    again = admit(sched, [3] * 16 + [5])  # the active conversation returns: 16 tokens hit
    assert again.num_cached_tokens == 16
    newcomer = admit(sched, [9] * 20 + [9])  # 6 pages: 3 never used, 3 from the idle conversation
    assert newcomer.block_table
    # The idle conversation lost its tail first: its head is still a usable prefix.
    probe = Sequence("p", [1] * 16 + [2], SamplingParams(max_tokens=1))
    hits = kv._lookup(probe)
    assert len(hits) == 1 and kv.blocks[hits[0]].tokens == (1,) * 4
    assert kv.stats.evictions > 0
    assert all(kv.blocks[b].hash is not None for b in again.block_table[:4])  # the active one kept all


def test_colliding_hashes_never_share_a_page():
    kv = KVCacheManager(32, 4, hash_fn=lambda parent, tokens, salt: 42)  # every page collides
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256)
    a = admit(sched, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    sched.finish(a)
    b = admit(sched, [8, 7, 6, 5, 4, 3, 2, 1, 9])
    assert b.num_cached_tokens == 0  # same hash, different tokens: a miss, not a wrong hit
    c = admit(sched, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert c.num_cached_tokens == 4  # the first page verifies; its child's parent does not


def test_recomputed_tokens_are_counted():
    kv = KVCacheManager(4, 4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=256)
    first = admit(sched, [1] * 12 + [2])
    sched.finish(first)
    other = admit(sched, [7] * 12 + [8])  # evicts the first conversation's pages
    sched.finish(other)
    admit(sched, [1] * 12 + [2])  # it comes back: those 12 tokens are computed a second time
    assert kv.stats.recomputed == 12


# ---- the second tier -----------------------------------------------------------------------------

def test_evicted_pages_come_back_from_the_second_tier(checkpoint):
    path = str(checkpoint("llama"))
    tiered = LLM(path, num_blocks=16, block_size=4, kv_host_bytes=1 << 20,
                 kv_tier_costs=TierCosts(restore_s_per_page=1e-6, recompute_s_per_page=1e-3))
    assert tiered.engine.kv.tier is not None
    plain = LLM(path, num_blocks=16, block_size=4, enable_prefix_caching=False)
    conv_a, conv_b = list(range(5, 45)), list(range(100, 140))
    run(tiered, conv_a)
    run(tiered, conv_b)  # 16 pages: B's pages push A's out, into the second tier
    kv = tiered.engine.kv
    assert kv.stats.tier_stores >= 9
    again, cost = run(tiered, conv_a)
    assert kv.stats.tier_restores == 9 and again.num_cached_tokens == 36
    assert cost == 40 - 36 + 24 - 1  # only the tail of the prompt is computed
    assert again.outputs[0].token_ids == run(plain, conv_a)[0].outputs[0].token_ids
    assert kv.num_free_blocks == kv.num_blocks


def test_the_tier_is_kept_only_where_its_costs_say_it_pays(checkpoint):
    """Given costs decide (reproducibly); measured ones are real timings and decide the same way."""
    path = str(checkpoint("llama"))
    costly = LLM(path, num_blocks=16, block_size=4, kv_host_bytes=1 << 20,
                 kv_tier_costs=TierCosts(restore_s_per_page=1e-3, recompute_s_per_page=1e-6))
    assert costly.engine.kv.tier is None and costly.engine.runner.host_pages is None
    measured = LLM(path, num_blocks=16, block_size=4, kv_host_bytes=1 << 20)
    report = measured.engine.tier_report
    assert report.restore_s_per_page > 0 and report.recompute_s_per_page > 0
    assert (measured.engine.kv.tier is not None) == report.pays


def test_host_tier_is_lru_and_verifies_entries():
    from chatscale.engine.kv_tier import HostTier

    tier = HostTier(2)
    a = tier.store("a", (1, 2), None)
    tier.store("b", (3, 4), "a")
    assert tier.find("a", (1, 2), None).slot == a
    assert tier.find("b", (3, 5), "a") is None  # same hash, other tokens: a collision, not a hit
    assert tier.find("b", (3, 4), "x") is None  # other parent
    tier.store("c", (5, 6), "b")  # full: the oldest ("a") goes
    assert tier.find("a", (1, 2), None) is None and len(tier) == 2
    slot = tier.take("b")
    assert tier.find("b", (3, 4), "a") is None and len(tier) == 1
    assert tier.store("d", (7, 8), None) != slot  # a slot being restored from is not reused ...
    assert tier.store("e", (9,), None) != slot
    tier.release()  # ... until this step's copies have been handed over
    assert tier.store("f", (1,), None) == slot


def test_a_stop_strings_overshoot_never_joins_the_prefix_cache():
    """A choice a stop string ended after 10 of its 14 computed tokens: the pages holding tokens
    past the 10th leave the cache; the pages before stay, for the conversation's next turn."""
    kv = KVCacheManager(16, 4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seq = Sequence("r", list(range(1, 15)), SamplingParams(max_tokens=8))
    sched.add(seq)
    sched.update_from_output(sched.schedule(), {}, 0.0, 0.0)  # 14 tokens computed: 3 full pages named
    assert kv.num_cached_free_blocks == 0 and len(kv._cached) == 3
    sched.finish(seq, "stop", keep_tokens=10)
    assert len(kv._cached) == 2  # pages [0, 4) and [4, 8); [8, 12) held the overshoot
    again = Sequence("r2", list(range(1, 15)), SamplingParams(max_tokens=1))
    assert kv.allocate_prefix(again, 64) == 14 - 8
