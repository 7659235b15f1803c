"""Fleets: request level against step level, routing, admission, failures, sizing and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from chatscale.sim import workloads as W
from chatscale.sim.cost import RooflineStepCost
from chatscale.sim.curves import ReplicaCurves
from chatscale.sim.fleet import StepLevelFleet
from chatscale.sim.gateway_sim import AdmissionSettings, SimGateway, sim_policy
from chatscale.sim.request_level import RequestLevelFleet
from chatscale.sim.results import Slo
from chatscale.sim.sizing import proportional, size_fleet
from chatscale.sim.topology import Failure, Topology
from chatscale.sim.twin import TwinConfig

COST = RooflineStepCost.named("llama-3-8b", "h100")
CONFIG = TwinConfig(num_blocks=3000, max_num_seqs=64)
CURVES = ReplicaCurves.from_cost(COST, CONFIG.num_blocks * CONFIG.block_size, CONFIG.max_num_seqs)
USERS = W.Users(think_s=20, max_context=4096)


def chat(rate: float, seconds: float = 120, regions=None, seed: int = 0) -> W.Workload:
    return W.conversations(rate, seconds, start_hour_utc=14, regions=regions or {"us-east": (-5, 1.0)},
                           users=USERS, seed=seed)


def gateway(w, topo, policy="cache-affinity", candidates=8, admission=None, curves=CURVES):
    return SimGateway(topo, sim_policy(policy, topo, curves.capacity_tokens, curves.max_seqs), w.regions, admission,
                      candidates)


def request_level(w, replicas, policy="cache-affinity", curves=CURVES, **kw):
    topo = replicas if isinstance(replicas, Topology) else Topology.even(w.regions, replicas)
    return RequestLevelFleet(topo, curves, gateway(w, topo, policy, curves=curves, **kw)).run(w)


def test_request_level_agrees_with_step_level_at_moderate_load():
    w = chat(40)
    topo = Topology.even(w.regions, 3)
    fast = request_level(w, topo).log.summary()
    step = StepLevelFleet(topo, COST, CONFIG, gateway(w, topo)).run(w).log.summary()
    assert fast["completed"] == step["completed"] == len(w)
    assert abs(fast["cache_hit_rate"] - step["cache_hit_rate"]) < 0.1
    for figure in (("ttft", "p50"), ("tpot", "p50")):
        a, b = fast[figure[0]][figure[1]], step[figure[0]][figure[1]]
        assert abs(a - b) / b < 0.35, (figure, a, b)


def test_affinity_routing_hits_the_cache_round_robin_misses():
    w = chat(200, seconds=300)
    whole_gpu = ReplicaCurves.from_cost(COST, COST.kv_blocks(16) * 16, 256)  # ~430k tokens of KV each
    hits = {p: request_level(w, 16, p, whole_gpu, candidates=4).log.summary()["cache_hit_rate"]
            for p in ("cache-affinity", "round-robin", "random")}
    ideal = w.prefix.sum() / w.prompt.sum()
    assert hits["cache-affinity"] > 0.8 * ideal and hits["round-robin"] < 0.2 * ideal
    assert abs(hits["round-robin"] - hits["random"]) < 0.05
    # a tenth of the KV budget holds a tenth of the conversations: the hit rate falls
    small = ReplicaCurves.from_cost(COST, COST.kv_blocks(16) * 16 // 10, 256)
    assert request_level(w, 16, "cache-affinity", small).log.summary()["cache_hit_rate"] < hits["cache-affinity"] - 0.2


def test_more_replicas_lower_latency_and_admission_caps_the_queue():
    w = chat(600, seconds=120)
    few, many = request_level(w, 2).log.summary(), request_level(w, 12).log.summary()
    assert few["ttft"]["p90"] > 5 * many["ttft"]["p90"]
    limited = request_level(w, 2, admission=AdmissionSettings.for_replicas(CURVES.max_seqs, max_queue=64, max_wait=5)).log
    s = limited.summary()
    assert 0.1 < s["rejection_rate"] < 1 and s["ttft"]["p99"] < few["ttft"]["p99"] / 3
    assert np.isnan(limited.first_token[limited.rejected]).all()


def test_failed_replica_requests_are_retried_elsewhere():
    w = chat(100, seconds=120)
    topo = Topology.even(w.regions, 4, failures=[Failure(at=30, replica=0, down_for=60)])
    res = request_level(w, topo)
    s = res.log.summary()
    assert res.retried > 0 and s["completed"] == len(w)
    during = (w.arrival > 31) & (w.arrival < 89)
    assert not np.any(res.log.replica[during] == 0)
    assert np.any(res.log.replica[w.arrival > 95] == 0)


def test_users_pay_the_round_trip_to_the_region_that_serves_them():
    """The gateway routes by readiness, not nearness (docs/gateway.md): in a calm two-region fleet
    both regions have headroom, so each region's users are served in both; the far ones pay 150 ms."""
    w = chat(100, seconds=60, regions={"us-east": (-5, 1.0), "ap-japan": (9, 1.0)})
    local = request_level(w, Topology({"ap-japan": 4})).log
    remote = request_level(w, Topology({"us-east": 4})).log
    japan = w.region == 1
    assert np.median(remote.ttft[japan] - local.ttft[japan]) > 0.1  # us-east <-> ap-japan: 150 ms
    topo = Topology({"us-east": 2, "ap-japan": 2})
    both = RequestLevelFleet(topo, CURVES, gateway(w, topo)).run(w)
    served_in = np.array(topo.region_of())[both.log.replica]
    assert {0, 1} <= set(served_in[japan].tolist()) and 0 < both.spilled < len(w)


def test_fleet_size_search_finds_the_smallest_fleet_that_meets_the_slo():
    w = chat(300, seconds=120)
    slo = Slo(ttft_s=0.5, tpot_s=0.05)
    found = size_fleet(w, lambda topo: request_level(w, topo).log, slo, target=0.95)
    assert found.replicas is not None and found.tried[found.replicas] >= 0.95
    assert any(n < found.replicas and a < 0.95 for n, a in found.tried.items())
    assert proportional(w, found.replicas).size == found.replicas


def test_cli_fleet_writes_summary_and_plots(tmp_path):
    from chatscale.cli import main

    out = tmp_path / "fleet.json"
    assert main(["simulate", "fleet", "--workload", "day:100:120:23", "--cost", "roofline:llama-3-8b:h100",
                 "--replicas", "10", "--output-json", str(out), "--plots", str(tmp_path)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == data["requests"] > 0
    assert sum(data["topology"].values()) == 10 and len(data["timeline"]["kv_usage"][0]) == 10
    assert (tmp_path / "latency.png").stat().st_size > 10_000 and (tmp_path / "timeline.png").is_file()


def test_step_level_fleet_routes_and_admits_with_the_gateway_classes():
    w = chat(60, seconds=60)
    topo = Topology.even(w.regions, 3)
    rr = StepLevelFleet(topo, COST, CONFIG, gateway(w, topo, "round-robin", candidates=0)).run(w)
    counts = np.bincount(rr.log.replica, minlength=3)
    assert counts.max() - counts.min() <= 1 and counts.sum() == len(w)
    # a replica whose batch holds 2 saturates at once: the gateway queues, then turns requests away
    tiny = TwinConfig(num_blocks=3000, max_num_seqs=2)
    admission = AdmissionSettings.for_replicas(2, max_queue=8, max_wait=2)
    limited = StepLevelFleet(topo, COST, tiny, gateway(w, topo, admission=admission)).run(w).log
    assert 0 < limited.rejected.mean() < 1
    assert np.nanmax(limited.ttft) < 2 + 1  # nothing waited past max_wait, plus its own service


def run_cli(capsys, *args: str) -> str:
    from chatscale.cli import main

    assert main(["simulate", *args]) == 0
    return capsys.readouterr().out


def test_an_overloaded_fleet_keeps_every_replica_busy_and_says_so_per_replica(capsys):
    """Ten H100s under twice what they serve (one minute of a day at 3,000 requests/s): the gateway's
    routing spreads the queue over every replica (it spilled region by region into a few: peak queues
    0, 0, 65, 0, 65, 1051, 0, 71, 0, 4110); the per-replica report shows it."""
    data = json.loads(run_cli(capsys, "fleet", "--workload", "day:3000:60:23", "--cost", "roofline:llama-3-8b:h100",
                              "--replicas", "10", "--json"))
    per = data["per_replica"]
    served, peaks = [r["served"] for r in per], [r["peak_queue"] for r in per]
    assert len(per) == 10 and sum(served) == data["summary"]["completed"]
    assert [r["region"] for r in per[:3]] == ["us-east"] * 3
    assert min(served) > 0.7 * max(served), served
    assert min(peaks) > 0 and max(peaks) < 1.5 * np.median(peaks), peaks


def test_queue_term_keeps_ordering_replicas_past_the_queue_norm():
    from chatscale.gateway.routing import AffinityWeights, CacheAffinity, ReplicaState, RouteRequest

    policy = CacheAffinity(weights=AffinityWeights(queue_norm=256))
    deep, shallow = ReplicaState("deep", num_waiting=40_000), ReplicaState("shallow", num_waiting=300)
    picks = {policy.choose(RouteRequest(), [deep, shallow], 0.0).replica.name for _ in range(4)}
    assert picks == {"shallow"}


def test_cli_prints_a_readable_summary_with_json_behind_a_flag(capsys):
    args = ("fleet", "--workload", "day:100:60:23", "--cost", "roofline:llama-3-8b:h100", "--replicas", "5")
    text = run_cli(capsys, *args)
    assert not text.lstrip().startswith("{") and "TTFT" in text and "per replica" in text
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert len([line for line in text.splitlines() if re.match(r"  r\d", line)]) == 5
    data = json.loads(run_cli(capsys, *args, "--json"))
    assert data["summary"]["completed"] == data["requests"] and len(data["per_replica"]) == 5
    size = run_cli(capsys, "size", "--workload", "azure-conv", "--max-requests", "2000", "--cost",
                   "roofline:llama-3-8b:h100")
    assert "smallest fleet" in size and "replicas serve 99%" in size
    from chatscale.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "fleet", "--help"])
    help_text = capsys.readouterr().out
    assert "poisson:RATE:SECONDS" in help_text and "azure-conv" in help_text  # --workload's help was empty


def test_progress_bar_ends_at_its_total(capsys):
    w = chat(60, seconds=60)
    n = len(w)
    assert n % (n // 200) != 0  # a partial last tick, which used to run the bar past its total
    topo = Topology.even(w.regions, 2)
    RequestLevelFleet(topo, CURVES, gateway(w, topo)).run(w, show_progress=True)
    counts = [int(k) for k in re.findall(rf"(\d+)/{n}\b", capsys.readouterr().err)]
    assert counts[-1] == n and max(counts) == n, counts


def test_simulate_takes_the_planners_efficiency_flags(capsys):
    args = ("fleet", "--workload", "day:100:60:23", "--cost", "roofline:llama-3-8b:h100", "--replicas", "5", "--json")
    served = json.loads(run_cli(capsys, *args))["summary"]["tpot"]["p50"]
    bound = json.loads(run_cli(capsys, *args, "--efficiency", "1", "--step-overhead", "0"))["summary"]["tpot"]["p50"]
    assert bound < 0.7 * served  # 60% of peak + 2 ms a step, against the roofline itself
