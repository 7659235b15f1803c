"""How many replicas a workload needs to meet an SLO: a search over fleet sizes, each size one
request-level simulation, replicas spread over regions in proportion to their traffic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from chatscale.sim.results import RequestLog, Slo
from chatscale.sim.topology import Topology
from chatscale.sim.workloads import Workload


def proportional(w: Workload, total: int) -> Topology:
    """`total` replicas split by each region's share of requests (largest remainders; one at least)."""
    share = np.bincount(w.region, minlength=len(w.regions)) / len(w)
    base = np.maximum(1, np.floor(share * total)).astype(int)
    for r in np.argsort(-(share * total - np.floor(share * total))):
        if base.sum() >= total:
            break
        base[r] += 1
    return Topology(dict(zip(w.regions, base.tolist())))


@dataclass
class SizingResult:
    replicas: int | None  # the smallest size that met the target; None if none tried did
    tried: dict[int, float] = field(default_factory=dict)  # size -> SLO attainment


def size_fleet(w: Workload, simulate: Callable[[Topology], RequestLog], slo: Slo = Slo(),
               target: float = 0.99, start: int = 1, limit: int = 100_000) -> SizingResult:
    """Double the fleet until `target` of requests meet `slo`, then bisect between the last two."""
    result = SizingResult(None)

    def meets(n: int) -> bool:
        result.tried[n] = simulate(proportional(w, n)).summary(slo)["slo_attainment"]
        return result.tried[n] >= target

    lo, hi = 0, max(start, len(w.regions))
    while not meets(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return result
    while hi - lo > max(1, hi // 100):  # within 1%
        mid = (lo + hi) // 2
        if mid in result.tried or mid < len(w.regions):
            break
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    result.replicas = hi
    return result
