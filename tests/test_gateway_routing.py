"""Routing and admission as pure objects, in made-up time (the simulator runs them the same way)."""

from __future__ import annotations

from chatscale.gateway.admission import IDLE_AFTER, Admission, SaturationLimits, Ticket, saturated
from chatscale.gateway.routing import (AffinityWeights, CacheAffinity, LeastOutstanding, PrefixIndex, ReplicaState,
                                       RouteRequest, block_hashes, make_policy, text_block_hashes)


def fleet(n: int = 3, region: str = "eu") -> list[ReplicaState]:
    return [ReplicaState(f"r{i}", region) for i in range(n)]


def test_hash_chains_share_prefixes_and_are_stable():
    a, b = block_hashes(list(range(40)), 16), block_hashes(list(range(32)) + [7] * 16, 16)
    assert len(a) == 2 and a[:2] == b[:2] and len(b) == 3  # partial blocks are not hashed
    assert block_hashes(list(range(40)), 16) == a  # blake2b: the same in every process
    assert text_block_hashes("x" * 130, 64) == text_block_hashes("x" * 128 + "yz", 64)
    assert block_hashes([1] * 16)[0] != block_hashes([2] * 16)[0]


def test_prefix_index_matches_deepest_block_and_is_bounded():
    idx = PrefixIndex(max_blocks=4)
    idx.record([1, 2, 3], "a")
    idx.record([1, 2], "b")
    assert idx.matched([1, 2, 3, 9]) == {"a": 3, "b": 2}
    idx.record([5, 6], "c")  # 5 blocks > 4: the least recently used (1) goes, and with it the chain
    assert len(idx) == 4 and idx.matched([1, 2, 3]) == {}
    idx.forget("c")
    assert idx.matched([5, 6]) == {}


def test_turn_two_follows_turn_one_and_region_with_headroom_wins():
    replicas = fleet(3) + [ReplicaState("far", "us", kv_usage=0.95)]
    policy = make_policy("cache-affinity")
    turn1 = RouteRequest(chain=[11, 12])
    first = policy.choose(turn1, replicas, now=0.0)
    assert first.replica.region == "eu"
    policy.sent(turn1, first.replica)
    for r in replicas:  # others become a little less loaded: affinity still wins
        r.num_running = 0 if r is not first.replica else 1
    second = policy.choose(RouteRequest(chain=[11, 12, 13]), replicas, now=1.0)
    assert second.replica is first.replica and second.terms["prefix"] == 2 / 3


def test_affinity_yields_to_a_hot_spot():
    replicas = fleet(3)
    policy = CacheAffinity(weights=AffinityWeights(hotspot_margin=0.5, hotspot_slack=2))
    policy.sent(RouteRequest(chain=[1]), replicas[0])
    replicas[0].num_running = 9  # mean 3: 9 > 4.5 and 6 above it
    assert policy.choose(RouteRequest(chain=[1]), replicas, 0.0).replica is not replicas[0]
    replicas[0].num_running = 2  # mean 2/3: 2 > 1 but only 4/3 above it: affinity holds
    assert policy.choose(RouteRequest(chain=[1]), replicas, 0.0).replica is replicas[0]


def test_inflight_correction_and_cooldown():
    replicas = fleet(2)
    lo = LeastOutstanding()
    replicas[0].inflight = 3  # sent since the scrape, which saw both idle
    assert lo.choose(RouteRequest(), replicas, 0.0).replica is replicas[1]
    replicas[1].scraped(0.1, running=5, waiting=0)
    assert replicas[1].outstanding == 5 and replicas[0].outstanding == 3
    replicas[0].cooldown_until = 10.0
    assert lo.choose(RouteRequest(), replicas, 5.0).replica is replicas[1]
    assert make_policy("round-robin").choose(RouteRequest(), [replicas[0]], 5.0) is None


def test_saturation_from_kv_and_queue():
    limits = SaturationLimits(kv_usage=0.9, outstanding=4)
    replicas = fleet(2)
    assert not saturated(replicas, 0.0, limits)
    replicas[0].kv_usage, replicas[1].num_waiting = 0.95, 4
    assert saturated(replicas, 0.0, limits)


def test_admission_bands_fair_share_and_bounds():
    adm = Admission(bands=2, max_queue=50, max_wait=5.0)
    assert adm.arrive(Ticket("a", 1, 10, 0.0), False, 0.0).action == "admit"
    for i in range(20):  # a heavy key queues 20, a light one 5 later, in the same band
        assert adm.arrive(Ticket("heavy", 1, 10, 0.0), True, 0.0).action == "queue"
    for i in range(5):
        adm.arrive(Ticket("light", 1, 10, 0.1), True, 0.1)
    adm.arrive(Ticket("vip", 0, 10, 0.2), True, 0.2)
    order = [adm.next(1.0 + i / 10).key for i in range(11)]
    assert order[0] == "vip"  # strict priority
    assert order[1:].count("light") == 5 and order[1:].count("heavy") == 5  # alternating shares
    late = adm.expired(10.0)
    assert len(late) == 15 and adm.queued == 0
    adm.max_queue = 1
    adm.arrive(Ticket("x", 1, 1, 11.0), True, 11.0)
    d = adm.arrive(Ticket("y", 1, 1, 11.0), True, 11.0)
    assert d.action == "reject" and d.reason == "queue_full" and d.retry_after >= 1


def test_token_weighted_share_and_idle_keys_bank_no_credit():
    adm = Admission(bands=1)
    for _ in range(10):
        adm.arrive(Ticket("big", 0, 100, 0.0), True, 0.0)
        adm.arrive(Ticket("small", 0, 10, 0.0), True, 0.0)
    served = [adm.next(1.0).key for _ in range(11)]
    assert served.count("small") == 10  # equal tokens, not equal requests
    adm.counters["idle"] = 0.0  # long idle; on its return it starts level with the active keys
    adm.arrive(Ticket("idle", 0, 10, 2.0), True, 2.0)
    assert adm.counters["idle"] >= min(adm.counters[k] for k in ("big",))


def test_a_key_between_requests_keeps_its_deficit():
    """A key that is behind is served first, so its queue empties; back within IDLE_AFTER (its client's
    round trip) it was not idle and keeps its place. Back later, it starts level with the others."""
    adm = Admission(bands=1)
    for _ in range(5):
        adm.arrive(Ticket("busy", 0, 10, 0.0), True, 0.0)
    adm.arrive(Ticket("bob", 0, 10, 0.0), True, 0.0)
    adm.counters.update(busy=100.0, bob=40.0)  # bob is behind
    assert adm.next(0.1).key == "bob"  # bob's queue is empty now
    adm.arrive(Ticket("bob", 0, 10, 0.2), True, 0.2)
    assert adm.counters["bob"] == 50.0 and adm.next(0.3).key == "bob"
    adm.arrive(Ticket("bob", 0, 10, 0.3 + IDLE_AFTER + 0.1), True, 0.3 + IDLE_AFTER + 0.1)
    assert adm.counters["bob"] == 100.0


def test_load_from_chatscale_vllm_and_sglang_metrics():
    from chatscale.gateway.fleet import parse_load

    ours = ("# HELP x\nchatscale:kv_cache_usage_perc 0.25\nchatscale:num_requests_running 3\n"
            "chatscale:num_requests_waiting 1.0\nchatscale:load 9\n")
    assert parse_load(ours) == {"kv": 0.25, "running": 3, "waiting": 1}
    vllm = ('vllm:gpu_cache_usage_perc{model_name="m",engine="0"} 0.5\n'
            'vllm:num_requests_running{model_name="m",engine="0"} 2\n'
            'vllm:num_requests_running{model_name="m",engine="1"} 3\n')
    assert parse_load(vllm) == {"kv": 0.5, "running": 5}
    sglang = 'sglang:token_usage{name="a b"} 0.1\nsglang:num_queue_reqs{x="1"} 7\n'
    assert parse_load(sglang) == {"kv": 0.1, "waiting": 7}


def test_config_parses_regions_keys_and_rejects_mistakes():
    import pytest

    from chatscale.gateway.config import hash_key, parse

    cfg = parse({"regions": {"eu": {"replicas": ["http://a:1", {"url": "http://b:1", "weight": 2}],
                                    "dns": [{"host": "svc", "port": 8000}]}},
                 "weights": {"prefix": 5}, "admission": {"saturation": {"kv_usage": 0.8}},
                 "keys": [{"name": "k", "sha256": hash_key("s"), "policies": ["block", {"action": "throttle"}]}]})
    assert [(r.name, r.region, r.weight) for r in cfg.replicas] == [("eu-0", "eu", 1.0), ("eu-1", "eu", 2.0)]
    assert cfg.dns[0].host == "svc" and cfg.weights.prefix == 5 and cfg.admission.saturation.kv_usage == 0.8
    assert [p.action for p in cfg.keys[0].policies] == ["block", "throttle"]
    for wrong in ({"polcy": "x"}, {"keys": [{"name": "k", "sha256": "", "policies": ["purr"]}]},
                  {"regions": {"a": {"replicas": [{"name": "x", "url": "u"}, {"name": "x", "url": "v"}]}}}):
        with pytest.raises(ValueError):
            parse(wrong)


def test_key_policies():
    from chatscale.gateway.config import KeyPolicy, KeySpec
    from chatscale.gateway.policy import apply

    key = KeySpec("k", "", rpm=100, tpm=1000, policies=[KeyPolicy("throttle", factor=0.1),
                                                        KeyPolicy("lower-priority", by=1), KeyPolicy("rewrite")])
    a = apply(key, {"messages": [{"role": "user", "content": "hi"}]}, band=1)
    assert not a.blocked and (a.limits.rpm, a.limits.tpm, a.limits.concurrency) == (10, 100, None) and a.band == 2
    assert a.body["messages"][0] == {"role": "system", "content": KeyPolicy("rewrite").system}
    assert apply(key, {"prompt": "hi"}, 1).body["prompt"].endswith("voice of a cat.\n\nhi")


def test_the_example_fleet_yaml_loads(monkeypatch):
    from pathlib import Path

    from chatscale.gateway.config import load

    monkeypatch.setenv("USE_1_KEY", "sk-replica")  # the replica key it reads from the environment
    cfg = load(Path(__file__).parents[1] / "deploy" / "fleet.yaml")
    assert {r.region for r in cfg.replicas} == {"us-east", "eu-west"} and cfg.dns and len(cfg.keys) == 4
    assert [r.api_key for r in cfg.replicas if r.name == "use-1"] == ["sk-replica"]


def test_an_idle_replica_in_a_small_region_is_not_passed_over():
    """A region's headroom is its readiest replica's: one idle replica in a one-replica region beats
    three half-busy ones elsewhere (summed, their region's 1.5 kept the idle one's 1.0 out)."""
    busy = [ReplicaState(f"b{i}", "big", kv_usage=0.5) for i in range(3)]
    idle = ReplicaState("idle", "small")
    assert make_policy("cache-affinity").choose(RouteRequest(), [*busy, idle], 0.0).replica is idle
