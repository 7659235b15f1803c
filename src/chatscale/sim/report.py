"""What `chatscale simulate` prints: a summary a person reads (`--json` prints every figure instead).

Latencies in their natural unit, counts with thousands separators, and per replica what it served
and its peak queue, so that an imbalance (idle replicas beside a deep queue) is seen at a glance.
Beyond ROWS replicas the listing gives the spread and the deepest queues; the JSON has all of them.
"""

from __future__ import annotations

ROWS = 24  # replicas listed one per line; larger fleets get their spread and the deepest queues


def seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def percentiles(name: str, p: dict) -> str:
    return f"{name:<14}" + "   ".join(f"p{q} {seconds(p[f'p{q}']):>9}" for q in (50, 90, 99))


def summary_lines(s: dict) -> list[str]:
    slo = s["slo"]
    return [
        f"{'requests':<14}{s['requests']:,} (completed {s['completed']:,}, rejected {s['rejection_rate']:.1%}); "
        f"{s['requests_per_s']:,.1f} req/s, {s['throughput_tok_s']:,.0f} output tok/s",
        percentiles("TTFT", s["ttft"]), percentiles("TPOT", s["tpot"]), percentiles("end to end", s["e2e"]),
        f"{'SLO':<14}TTFT <= {seconds(slo['ttft_s'])} and TPOT <= {seconds(slo['tpot_s'])}: "
        f"{s['slo_attainment']:.1%} of requests (goodput {s['goodput_req_s']:,.1f} req/s)",
        f"{'prefix cache':<14}hit rate {s['cache_hit_rate']:.1%} of prompt tokens",
    ]


def replica_lines(per_replica: list[dict]) -> list[str]:
    served = [r["served"] for r in per_replica]
    queues = [r["peak_queue"] for r in per_replica]
    if len(per_replica) <= ROWS:
        lines = [f"{'per replica':<14}{'served':>10}  {'peak queue':>10}"]
        lines += [f"  r{r['replica']:<4} {r['region']:<8}{r['served']:>9,}  {r['peak_queue']:>10,}"
                  for r in per_replica]
        return lines
    deepest = sorted(per_replica, key=lambda r: -r["peak_queue"])[:5]
    return [f"{'per replica':<14}served min {min(served):,} / median {sorted(served)[len(served) // 2]:,} / "
            f"max {max(served):,}; peak queue min {min(queues):,} / median {sorted(queues)[len(queues) // 2]:,} / "
            f"max {max(queues):,}",
            f"{'deepest':<14}" + ", ".join(f"r{r['replica']} ({r['region']}) {r['peak_queue']:,}" for r in deepest)]


def render(out: dict) -> str:
    """The printed report of one `chatscale simulate replica|fleet|size` run (its JSON as `out`)."""
    head = f"{out['command']}: {out['workload']}, {out['requests']:,} requests, cost {out['cost']}"
    if out["command"] == "size":
        tried = ", ".join(f"{n}: {a:.1%}" for n, a in sorted(out["tried"].items(), key=lambda kv: int(kv[0])))
        found = (f"{out['replicas']} replicas" if out["replicas"] is not None else "no fleet up to the limit")
        return "\n".join([head, f"{'smallest fleet':<14}{found} serve {out['target']:.0%} of requests within the SLO",
                          f"{'tried':<14}{tried} (replicas: requests within the SLO)",
                          f"{'wall time':<14}{out['wall_s']:.1f} s"])
    lines = [head]
    if "topology" in out:
        regions = ", ".join(f"{name} {n}" for name, n in out["topology"].items())
        lines.append(f"{'fleet':<14}{sum(out['topology'].values())} replicas ({regions})")
    lines += summary_lines(out["summary"])
    if "spilled" in out:
        share = out["spilled"] / max(1, out["summary"]["completed"])
        lines.append(f"{'routing':<14}{out['spilled']:,} served outside their users' nearest region ({share:.0%})"
                     + (f"; {out['retried']:,} retried after a failure" if out.get("retried") else ""))
    if out.get("per_replica"):
        lines += replica_lines(out["per_replica"])
    lines.append(f"{'wall time':<14}{out['wall_s']:.1f} s" + (f", {out['steps']:,} steps" if "steps" in out else ""))
    return "\n".join(lines)
