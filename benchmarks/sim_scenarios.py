"""The scenario reports of docs/simulations.md, with their plots (docs/img/sim_*.png).

  0. Request level against step level: the same fleet and traffic at three loads.
  1. The cost of cache misses: KV budget vs prefix-cache hit rate vs TTFT (step level, real LRU).
  2. Batch size vs throughput and latency against the roofline's ridge point (step level).
  3. The Japan spike on fixed capacity: admission control vs none (request level), and the fleet
     size that meets the SLO through the spike.
  4. Cache-affinity routing vs round-robin (and least-outstanding, random) at fleet scale.

Model and hardware: Llama-3-8B on one H100 per replica (planner roofline, 60% of peak, 2 ms per step).

    .venv/bin/python benchmarks/sim_scenarios.py --json docs/sim/scenarios.json [--only 3 4]

(--only reruns some parts and keeps the others' results in the JSON.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import save_json

from chatscale.planner.roofline import step_cost
from chatscale.sim import plots
from chatscale.sim import workloads as W
from chatscale.sim.cost import RooflineStepCost
from chatscale.sim.curves import ReplicaCurves
from chatscale.sim.fleet import StepLevelFleet
from chatscale.sim.gateway_sim import AdmissionSettings, SimGateway, sim_policy
from chatscale.sim.replay import simulate_replica
from chatscale.sim.request_level import RequestLevelFleet
from chatscale.sim.results import RequestLog, Slo
from chatscale.sim.sizing import proportional, size_fleet
from chatscale.sim.topology import Topology
from chatscale.sim.twin import TwinConfig

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
COST = RooflineStepCost.named("llama-3-8b", "h100")
BLOCKS = COST.kv_blocks(16)
CONFIG = TwinConfig(num_blocks=BLOCKS, max_num_seqs=256)
SLO = Slo(ttft_s=1.0, tpot_s=0.05)
ONE_REGION = {"us-east": (-5, 1.0)}


def curves(config: TwinConfig = CONFIG) -> ReplicaCurves:
    return ReplicaCurves.from_cost(COST, config.num_blocks * config.block_size, config.max_num_seqs)


def gateway(w: W.Workload, topo: Topology, policy: str = "cache-affinity", candidates: int = 8,
            admission: AdmissionSettings | None = None) -> SimGateway:
    return SimGateway(topo, sim_policy(policy, topo, BLOCKS * 16, CONFIG.max_num_seqs), w.regions, admission,
                      candidates)


def request_level(w: W.Workload, topo: Topology, policy: str = "cache-affinity", config: TwinConfig = CONFIG,
                  **kw):
    return RequestLevelFleet(topo, curves(config), gateway(w, topo, policy, **kw)).run(w)


def figures(s: dict) -> dict:
    keys = ("ttft", "tpot", "e2e")
    return {**{k: s[k] for k in keys}, **{k: s[k] for k in s if k not in keys + ("slo",)}}


def validation() -> dict:
    """Same traffic, same 4 replicas, both levels: TTFT/TPOT percentiles and hit rates side by side."""
    out, logs = {}, {}
    for rate in (60, 180, 300):
        w = W.conversations(rate, 300, start_hour_utc=14, regions=ONE_REGION, seed=rate)
        topo = Topology.even(w.regions, 4)
        fast = request_level(w, topo).log
        t = time.time()
        step = StepLevelFleet(topo, COST, CONFIG, gateway(w, topo)).run(w)
        step_wall = time.time() - t
        out[f"{rate}/s"] = {"requests": len(w), "request_level": figures(fast.summary(SLO)),
                            "step_level": figures(step.log.summary(SLO)), "step_level_wall_s": step_wall,
                            "step_level_steps": step.steps}
        logs[f"request level {rate}/s"], logs[f"step level {rate}/s"] = fast, step.log
    plots.latency_cdfs(logs, IMG / "sim_validation.png", "request level vs step level, 4 replicas")
    return out


def kv_budget() -> dict:
    """One replica, conversations, KV budgets from 1/32 of an H100's to all of it (step level)."""
    w = W.conversations(14, 600, start_hour_utc=14, regions=ONE_REGION, users=W.Users(think_s=60), seed=3)
    rows = []
    for fraction in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1):
        config = TwinConfig(num_blocks=int(BLOCKS * fraction), max_num_seqs=256)
        log, twin = simulate_replica(w, COST, config, record_steps=False)
        s = log.summary(SLO)
        gb = config.num_blocks * 16 * 131072 / 1e9  # Llama-3-8B: 128 KiB of KV per token
        rows.append({"kv_gb": gb, "blocks": config.num_blocks, "hit_rate": s["cache_hit_rate"],
                     "ttft_p50": s["ttft"]["p50"], "ttft_p90": s["ttft"]["p90"], "tpot_p50": s["tpot"]["p50"],
                     "recomputed_tokens": twin.kv.stats.recomputed, "evictions": twin.kv.stats.evictions,
                     "preemptions": twin.scheduler.num_preemptions})
    ideal = float(w.prefix.sum() / w.prompt.sum())
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    gbs = [r["kv_gb"] for r in rows]
    ax.plot(gbs, [r["hit_rate"] for r in rows], "o-", label="prefix-cache hit rate")
    ax.axhline(ideal, ls=":", color="gray", label="every repeated prefix hit")
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache budget of the replica (GB)")
    ax.set_ylabel("hit rate")
    ax2 = ax.twinx()
    ax2.plot(gbs, [r["ttft_p90"] for r in rows], "s--", color="C3", label="TTFT p90")
    ax2.set_yscale("log")
    ax2.set_ylabel("TTFT p90 (s)")
    fig.legend(loc="upper center", fontsize=8, ncol=3)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(IMG / "sim_kv_budget.png", dpi=110)
    plt.close(fig)
    return {"requests": len(w), "ideal_hit_rate": ideal, "rows": rows}


def batch_size() -> dict:
    """max_num_seqs from 1 to 512, each with 4 x that many requests queued at once (a full batch
    throughout): tokens/s and TPOT, and the decode step's arithmetic intensity against the H100's
    ridge point."""
    ridge = COST.hw.ridge_point("bf16")
    rows = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512):
        w = W.poisson(1e6, max(4 * b, 32) / 1e6, (100, 300), (100, 300), seed=5)
        log, twin = simulate_replica(w, COST, TwinConfig(num_blocks=BLOCKS, max_num_seqs=b), record_steps=False)
        s = log.summary(SLO)
        cost = step_cost(COST.model, COST.hw, COST.layout, decode_contexts=[350] * b)
        rows.append({"max_num_seqs": b, "requests": len(w), "throughput_tok_s": s["throughput_tok_s"],
                     "tpot_p50": s["tpot"]["p50"], "intensity": cost.intensity, "bound": cost.bound})
    plt = plots._pyplot()
    fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    bs = [r["max_num_seqs"] for r in rows]
    ax.plot(bs, [r["throughput_tok_s"] for r in rows], "o-", label="output tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(bs, [r["tpot_p50"] * 1000 for r in rows], "s--", color="C3", label="TPOT p50 (ms)")
    ax2.set_ylabel("TPOT p50 (ms)")
    fig.legend(loc="upper center", fontsize=8, ncol=2)
    low.plot(bs, [r["intensity"] for r in rows], "o-", color="C2", label="decode step FLOPs/byte (context 350)")
    low.axhline(ridge, ls=":", color="gray", label=f"H100 bf16 ridge point {ridge:.0f}")
    low.set_yscale("log")
    low.set_xlabel("max_num_seqs (batch size)")
    low.set_ylabel("FLOPs per byte")
    low.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(IMG / "sim_batch.png", dpi=110)
    plt.close(fig)
    return {"ridge_point": ridge, "rows": rows}


def japan_spike(replicas: int, rate: float, size: bool = True) -> dict:
    """22:45-00:15 UTC (7:45-9:15 am in Japan), a fixed fleet placed by the first twenty minutes'
    traffic: the gateway without admission control, and with it (queue above saturation, 429 +
    Retry-After when the queue is full or a request waited too long) at its default queue and at
    one sized to the TTFT SLO; then the size that meets the SLO for 99% of requests."""
    w = W.conversations(rate, 1.5 * 3600, start_hour_utc=22.75, spike={"ap-japan": 1.5}, seed=7)
    topo = proportional(w.window(0, 1200), replicas)
    japan = w.region == w.regions.index("ap-japan")
    deep = AdmissionSettings.for_replicas(CONFIG.max_num_seqs)  # AdmissionSettings defaults: 256 queued, 30 s
    short = AdmissionSettings.for_replicas(CONFIG.max_num_seqs, max_queue=32, max_wait=1.0)  # sized to the SLO
    runs = {"no admission control": request_level(w, topo),
            "admission, queue 256 / 30 s": request_level(w, topo, admission=deep),
            "admission, queue 32 / 1 s": request_level(w, topo, admission=short)}
    out = {"requests": len(w), "topology": topo.replicas, "runs": {}}
    plt = plots._pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    minutes = (w.arrival // 60).astype(int)
    for name, res in runs.items():
        log = res.log
        s = log.summary(SLO)
        js = _subset(log, japan).summary(SLO)
        out["runs"][name] = {"all": figures(s), "ap-japan": figures(js), "spilled": res.spilled}
        ttft90 = _per_minute(minutes[japan], log.ttft[japan], lambda v: np.nanpercentile(v, 90) if np.isfinite(v).any() else np.nan)
        rej = _per_minute(minutes[japan], log.rejected[japan].astype(float), np.mean)
        axes[0].plot(ttft90[0] / 60, ttft90[1], label=name)
        axes[1].plot(rej[0] / 60, rej[1], label=name)
    counts = np.bincount(minutes[japan])
    axes[2].plot(np.arange(len(counts)) / 60, counts / 60, color="gray")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ap-japan TTFT p90 (s)")
    axes[1].set_ylabel("ap-japan rejected")
    axes[2].set_ylabel("ap-japan requests/s")
    axes[2].set_xlabel("hours after 22:45 UTC")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(IMG / "sim_japan_spike.png", dpi=110)
    plt.close(fig)
    plots.timeline(runs["no admission control"].timeline, IMG / "sim_japan_timeline.png",
                   "fixed fleet through the Japan spike, no admission control")
    if size:
        found = size_fleet(w, lambda t: request_level(w, t).log, SLO, target=0.99, start=replicas)
        out["sizing"] = {"replicas": found.replicas, "tried": found.tried}
    return out


def _subset(log: RequestLog, mask: np.ndarray) -> RequestLog:
    return RequestLog(*(getattr(log, f)[mask] for f in RequestLog.__dataclass_fields__))


def _per_minute(minute: np.ndarray, values: np.ndarray, fn) -> tuple[np.ndarray, np.ndarray]:
    keys = np.unique(minute)
    return keys, np.array([fn(values[minute == k]) for k in keys])


def routing(replicas: int, rate: float, seconds: float) -> dict:
    """Four policies on the same multi-region traffic and fleet."""
    w = W.conversations(rate, seconds, start_hour_utc=23, spike={"ap-japan": 1.5}, seed=11)
    topo = proportional(w, replicas)
    out, logs = {"requests": len(w), "replicas": topo.size}, {}
    for policy in ("cache-affinity", "round-robin", "least-outstanding", "random"):
        t = time.time()
        res = request_level(w, topo, policy)
        s = res.log.summary(SLO)
        prefill = int((res.log.prompt - res.log.cached).sum())
        out[policy] = {**figures(s), "prefill_tokens": prefill, "wall_s": time.time() - t}
        logs[policy] = res.log
    plots.latency_cdfs(logs, IMG / "sim_routing.png", f"{topo.size} replicas, {len(w) / seconds:.0f} requests/s")
    for policy in ("cache-affinity", "round-robin"):
        found = size_fleet(w, lambda t: request_level(w, t, policy).log, SLO, target=0.99, start=replicas // 4)
        out[policy]["fleet_for_slo"] = {"replicas": found.replicas, "tried": found.tried}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=int, nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-sizing", action="store_true", help="part 3 without its fleet-size search")
    args = ap.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    parts = {0: ("validation", validation), 1: ("kv_budget", kv_budget), 2: ("batch_size", batch_size),
             3: ("japan_spike", lambda: japan_spike(10, 500, not args.no_sizing)),
             4: ("routing", lambda: routing(300, 15000, 180))}
    out = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    for k, (name, fn) in parts.items():
        if args.only is None or k in args.only:
            t = time.time()
            out[name] = {**out.get(name, {}), **fn()}
            out[name]["wall_s"] = time.time() - t
            print(name, f"{out[name]['wall_s']:.0f} s")
    save_json(args.json, out)


if __name__ == "__main__":
    main()
