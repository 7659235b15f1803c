"""Simulator speed: one simulated hour of a five-region fleet at request level, and the step level's
simulated requests per second.

Request level: a synthetic multi-region day from 23:00 UTC (Japan's morning spike) at >= 3,000
requests/s, >= 1,000 replicas (Llama-3-8B on H100s, roofline cost), the gateway's CacheAffinity
policy offered the prefix holders and 2 sampled replicas per request (power of two choices). Step level: the same kind of traffic on a few replicas for a short
stretch, every replica stepping the real scheduler.

    flock /tmp/chatscale-bench.lock .venv/bin/python benchmarks/sim_speed.py --json speed.json
"""

from __future__ import annotations

import argparse
import resource
import time

from common import save_json

from chatscale.sim import workloads as W
from chatscale.sim.cost import RooflineStepCost
from chatscale.sim.curves import ReplicaCurves
from chatscale.sim.fleet import StepLevelFleet
from chatscale.sim.gateway_sim import SimGateway, sim_policy
from chatscale.sim.request_level import RequestLevelFleet
from chatscale.sim.sizing import proportional
from chatscale.sim.twin import TwinConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--rate", type=float, default=4800, help="conversation-day rate at full load (see workloads)")
    ap.add_argument("--candidates", type=int, default=2, help="sampled replicas offered besides the prefix holders")
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--step-replicas", type=int, default=8)
    ap.add_argument("--step-seconds", type=float, default=60)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cost = RooflineStepCost.named("llama-3-8b", "h100")
    config = TwinConfig(num_blocks=cost.kv_blocks(16), max_num_seqs=256)
    t0 = time.time()
    w = W.conversations(args.rate, args.seconds, start_hour_utc=23, spike={"ap-japan": 1.5})
    gen_s = time.time() - t0
    topo = proportional(w, args.replicas)
    curves = ReplicaCurves.from_cost(cost, config.num_blocks * config.block_size, config.max_num_seqs)
    t1 = time.time()
    gateway = SimGateway(topo, sim_policy("cache-affinity", topo, curves.capacity_tokens, curves.max_seqs), w.regions,
                         candidates=args.candidates)
    res = RequestLevelFleet(topo, curves, gateway).run(w, show_progress=True)
    sim_s = time.time() - t1
    summary = res.log.summary()
    out = {"request_level": {"requests": len(w), "simulated_s": args.seconds, "mean_rate": len(w) / args.seconds,
                             "replicas": topo.size, "regions": topo.replicas, "workload_s": gen_s,
                             "simulate_s": sim_s, "total_s": time.time() - t0,
                             "simulated_requests_per_s": len(w) / sim_s,
                             "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                             "summary": summary}}
    print({k: v for k, v in out["request_level"].items() if k != "summary"})

    # The same traffic per replica: the day's rate scaled to the step-level fleet, past its first four
    # minutes (while conversations build up to their later turns).
    scale = args.step_replicas / topo.size
    small = W.conversations(args.rate * scale, args.step_seconds + 240, start_hour_utc=23,
                            spike={"ap-japan": 1.5}, seed=1).window(240, args.step_seconds)
    t2 = time.time()
    small_topo = proportional(small, args.step_replicas)
    gateway = SimGateway(small_topo, sim_policy("cache-affinity", small_topo, curves.capacity_tokens, curves.max_seqs), small.regions)
    step = StepLevelFleet(small_topo, cost, config, gateway).run(small, show_progress=True)
    step_s = time.time() - t2
    out["step_level"] = {"requests": len(small), "replicas": args.step_replicas, "simulated_s": args.step_seconds,
                         "steps": step.steps, "wall_s": step_s, "simulated_requests_per_s": len(small) / step_s,
                         "simulated_steps_per_s": step.steps / step_s}
    print(out["step_level"])
    save_json(args.json, out)


if __name__ == "__main__":
    main()
