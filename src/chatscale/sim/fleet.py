"""The step-level fleet: every replica is a ReplicaTwin stepping chatscale's real Scheduler and
KVCacheManager; a router and optional admission control place each request on arrival.

One heap orders the replicas' step ends; arrivals are merged in time order. Routing and admission
see the same ReplicaView the request-level fleet offers them, refreshed from the twin before each
decision (running and waiting sequences, KV pages held), so the two levels run the same policies
and can be compared request for request.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from chatscale.sim.cost import StepCostModel
from chatscale.sim.progress import progress
from chatscale.sim.replay import new_log
from chatscale.sim.request_level import Admitter, Picker, ReplicaView
from chatscale.sim.results import RequestLog, Timeline
from chatscale.sim.tokens import answer_key, prompt_token_ids
from chatscale.sim.topology import Topology
from chatscale.sim.twin import ReplicaTwin, TwinConfig
from chatscale.sim.workloads import Workload


@dataclass
class StepLevelResult:
    log: RequestLog
    timeline: Timeline
    steps: int  # scheduler steps simulated, all replicas together


@dataclass
class StepLevelFleet:
    topology: Topology
    cost: StepCostModel
    config: TwinConfig
    pick: Picker
    admit: Admitter | None = None
    sample_s: float = 10.0

    def run(self, w: Workload, show_progress: bool = False) -> StepLevelResult:
        topo, cfg = self.topology, self.config
        log = new_log(w)
        twins = [ReplicaTwin(self.cost, cfg, log) for _ in range(topo.size)]
        region_of = topo.region_of()
        cap = cfg.num_blocks * cfg.block_size
        views = [ReplicaView(r, region_of[r], capacity=cap) for r in range(topo.size)]
        members = [[views[r] for r in m] for m in topo.members()]
        home_region = [order[0] for order in topo.nearest(w.regions)]
        heap: list[tuple[float, int]] = []
        timeline = Timeline()

        def refresh(v: ReplicaView) -> ReplicaView:
            twin = twins[v.replica]
            v.running, v.queued = twin.batch_size, twin.num_waiting
            v.kv_tokens = twin.kv.num_used_blocks * cfg.block_size
            return v

        def kick(r: int, t: float) -> None:
            end = twins[r].begin_step(t)
            if end is not None:
                heapq.heappush(heap, (end, r))

        next_sample = 0.0
        bar = progress(len(w), "fleet (step level)", show_progress)
        for i in range(len(w) + 1):
            t = float(w.arrival[i]) if i < len(w) else float("inf")
            while heap and heap[0][0] <= t:
                end, r = heapq.heappop(heap)
                twins[r].end_step()
                kick(r, end)
            if i == len(w):
                break
            if t >= next_sample:
                for v in views:
                    refresh(v)
                timeline.add(t, [v.kv_usage for v in views], [v.running for v in views], [v.queued for v in views])
                next_sample = t + self.sample_s
            pool = [refresh(v) for v in members[home_region[w.region[i]]]]
            chosen = self.pick(i, pool)
            twin = twins[chosen.replica]
            if (self.admit is not None and not self.admit(i, chosen, t)) or not twin.fits(
                    int(w.prompt[i]), int(w.output[i])):
                log.rejected[i] = True
            else:
                twin.add(i, prompt_token_ids(w, i, cfg.vocab), int(w.output[i]), t, answer_key(w, i))
                log.replica[i] = chosen.replica
                if twin.busy_until is None:
                    kick(chosen.replica, t)
            bar.update()
        bar.close()
        served = log.replica >= 0
        rtt = np.array([[topo.round_trip(u, f) for f in topo.regions] for u in w.regions])
        lag = np.where(served, rtt[w.region, np.array(region_of)[np.maximum(log.replica, 0)]], 0.0)
        log.first_token += lag
        log.finish += lag
        return StepLevelResult(log, timeline, sum(t.num_steps for t in twins))
