"""`chatscale simulate`: replay traffic on simulated replicas and fleets, measure a step profile,
and size a fleet for an SLO.

  chatscale simulate profile --out profile.json            # measure this machine's engine
  chatscale simulate replica --workload poisson:8:60 --cost profile.json
  chatscale simulate fleet --workload day:3000:3600:23 --cost roofline:llama-3-8b:h100 --replicas 1000
  chatscale simulate size --workload azure-conv --cost roofline:llama-3-70b:h100:4 --slo-ttft 1

Workloads: poisson:RATE:SECONDS, day:RATE:SECONDS[:START_HOUR_UTC] (multi-region conversations,
Japan's morning spike), azure-conv, azure-code, mooncake, log:PATH (a gateway request log);
--rate and --length scale any of them. Costs: a profile JSON, or roofline:MODEL:HARDWARE[:TP].
Each run prints a summary; --json prints every figure as JSON instead, --output-json PATH writes
them (with the timeline) to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from chatscale.planner.roofline import Efficiency

WORKLOAD_HELP = ("poisson:RATE:SECONDS (independent requests), day:RATE:SECONDS[:START_HOUR_UTC] (conversations "
                 "in five regions over a day, Japan's morning spike), azure-conv, azure-code, mooncake (the "
                 "shipped production traces), log:PATH (a chatscale gateway request log)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate replicas and fleets on the real scheduler and KV cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="sim_command", required=True)

    prof = cmds.add_parser("profile", help="measure a real engine's step times here and fit the cost model")
    prof.add_argument("--model", default="", help="HF model directory (default: the demo target)")
    prof.add_argument("--threads", type=int, default=1)
    prof.add_argument("--repeats", type=int, default=1)
    prof.add_argument("--out", type=Path, default=Path("profile.json"))
    prof.set_defaults(func=_run_profile)

    for name, helptext in (("replica", "one replica twin, step level"),
                           ("fleet", "a multi-region fleet, request or step level"),
                           ("size", "the smallest fleet that meets an SLO")):
        c = cmds.add_parser(name, help=helptext)
        _common(c)
        if name != "replica":
            c.add_argument("--replicas", type=int, default=8, help="replicas, split by each region's traffic")
            c.add_argument("--routing", default="cache-affinity",
                           choices=["cache-affinity", "round-robin", "least-outstanding", "random"],
                           help="the gateway's routing policy")
            c.add_argument("--candidates", type=int, default=8,
                           help="replicas offered to the policy per request besides the prefix holders (0: all)")
            c.add_argument("--admission", action="store_true",
                           help="the gateway's admission control: queue above saturation, 429 when full")
            c.add_argument("--max-queue", type=int, default=256, help="admission queue per band and region")
        if name == "fleet":
            c.add_argument("--level", choices=["request", "step"], default="request")
        if name == "size":
            c.add_argument("--target", type=float, default=0.99, help="fraction of requests within the SLO")
        c.set_defaults(func=_run)


def _common(c: argparse.ArgumentParser) -> None:
    c.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    c.add_argument("--rate", type=float, default=1.0, help="speed arrivals up by this factor")
    c.add_argument("--length", type=float, default=1.0, help="scale prompt and answer lengths")
    c.add_argument("--max-requests", type=int, default=None)
    c.add_argument("--cost", required=True, help="profile JSON or roofline:MODEL:HARDWARE[:TP]")
    Efficiency.add_cli_args(c.add_argument_group("roofline costs (as `chatscale plan` takes them)"))
    c.add_argument("--num-blocks", type=int, default=None, help="KV pages per replica (default: what fits)")
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--max-num-seqs", type=int, default=256)
    c.add_argument("--max-num-batched-tokens", type=int, default=2048)
    c.add_argument("--slo-ttft", type=float, default=2.0)
    c.add_argument("--slo-tpot", type=float, default=0.1)
    c.add_argument("--json", action="store_true", help="print every figure as JSON instead of the summary")
    c.add_argument("--output-json", type=Path, default=None, help="write every figure and the timeline here")
    c.add_argument("--plots", type=Path, default=None, help="write PNG plots into this directory")
    c.add_argument("--seed", type=int, default=0)


def load_workload(spec: str, seed: int = 0):
    """A workload from its command-line spec (see the module docstring)."""
    from chatscale.sim import workloads as W

    kind, *args = spec.split(":", 1)[0], *spec.split(":")[1:]
    if kind == "poisson":
        return W.poisson(float(args[0]), float(args[1]), (64, 1024), (16, 512), seed=seed)
    if kind == "day":
        start = float(args[2]) if len(args) > 2 else 0.0
        return W.conversations(float(args[0]), float(args[1]), start_hour_utc=start,
                               spike={"ap-japan": 1.5}, seed=seed)
    if kind in ("azure-conv", "azure-code"):
        return W.azure(kind.split("-")[1])
    if kind == "mooncake":
        return W.mooncake()
    if kind == "log":
        return W.gateway_log(Path(spec.split(":", 1)[1]))
    raise ValueError(f"unknown workload {spec!r}; one of {WORKLOAD_HELP}")


def _run_profile(args: argparse.Namespace) -> int:
    from chatscale.sim.profile import run_profile

    cost = run_profile(args.model, args.threads, args.repeats)
    cost.save(args.out)
    print(f"wrote {args.out}: coefficients {cost.coefficients}, mean step error {cost.source['mean_abs_error']:.1%}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from chatscale.sim.cost import RooflineStepCost, load_cost_model
    from chatscale.sim.results import Slo
    from chatscale.sim.twin import TwinConfig

    w = load_workload(args.workload, args.seed).scaled(rate=args.rate, length=args.length)
    if args.max_requests:
        w = w.first(args.max_requests)
    cost = load_cost_model(args.cost, Efficiency.from_args(args))
    blocks = args.num_blocks or (cost.kv_blocks(args.block_size) if isinstance(cost, RooflineStepCost)
                                 else cost.source.get("num_blocks", 4096))
    config = TwinConfig(num_blocks=blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        vocab=getattr(cost, "source", {}).get("vocab", 32000))
    slo = Slo(args.slo_ttft, args.slo_tpot)
    started = time.time()
    out: dict = {"command": args.sim_command, "workload": args.workload, "requests": len(w), "cost": args.cost,
                 "num_blocks": blocks}
    timeline = None
    if args.sim_command == "replica":
        from chatscale.sim.replay import simulate_replica

        log, twin = simulate_replica(w, cost, config, show_progress=not args.json)
        out["steps"] = twin.num_steps
    elif args.sim_command == "fleet":
        log, timeline, extra = _fleet(args, w, cost, config)
        out.update(extra)
    else:
        from chatscale.sim.sizing import size_fleet

        found = size_fleet(w, lambda topo: _request_level(args, w, cost, config, topo).log, slo, args.target)
        out.update(replicas=found.replicas, tried=found.tried, target=args.target)
        log = None
    out["wall_s"] = time.time() - started
    if log is not None:
        out["summary"] = log.summary(slo)
    _print(out, args.json)
    if timeline is not None:
        out["timeline"] = timeline.as_dict()
    _save(args.output_json, out)
    if args.plots:
        from chatscale.sim import plots

        args.plots.mkdir(parents=True, exist_ok=True)
        plots.latency_cdfs({args.sim_command: log}, args.plots / "latency.png", args.workload)
        if timeline is not None:
            plots.timeline(timeline, args.plots / "timeline.png", args.workload)
    return 0


def _fleet(args, w, cost, config):
    from chatscale.sim.sizing import proportional

    topo = proportional(w, args.replicas)
    if args.level == "request":
        res = _request_level(args, w, cost, config, topo, show_progress=not args.json)
        extra = {"retried": res.retried}
    else:
        from chatscale.sim.fleet import StepLevelFleet

        res = StepLevelFleet(topo, cost, config, _gateway(args, w, topo, config)).run(w, show_progress=not args.json)
        extra = {"steps": res.steps}
    return res.log, res.timeline, {"topology": topo.replicas, **extra, "spilled": res.spilled,
                                   "per_replica": [asdict(s) for s in res.per_replica]}


def _request_level(args, w, cost, config, topo, show_progress: bool = False):
    from chatscale.sim.curves import ReplicaCurves
    from chatscale.sim.request_level import RequestLevelFleet

    curves = ReplicaCurves.from_cost(cost, config.num_blocks * config.block_size, config.max_num_seqs,
                                     config.block_size, config.max_num_batched_tokens)
    return RequestLevelFleet(topo, curves, _gateway(args, w, topo, config)).run(w, show_progress)


def _gateway(args, w, topo, config):
    from chatscale.sim.gateway_sim import AdmissionSettings, SimGateway, sim_policy

    admission = None
    if args.admission:
        admission = AdmissionSettings.for_replicas(config.max_num_seqs, max_queue=args.max_queue)
    policy = sim_policy(args.routing, topo, config.num_blocks * config.block_size, config.max_num_seqs)
    return SimGateway(topo, policy, w.regions, admission, args.candidates, seed=args.seed)


def _print(out: dict, as_json: bool) -> None:
    from chatscale.sim.report import render

    print(json.dumps(out, indent=2) if as_json else render(out))


def _save(path: Path | None, data: dict) -> None:
    if path:
        path.write_text(json.dumps(data))
