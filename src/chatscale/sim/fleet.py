"""The step-level fleet: every replica is a ReplicaTwin stepping chatscale's real Scheduler and
KVCacheManager; the gateway's own routing and admission classes place each request on arrival.

One heap orders the replicas' step ends; arrivals are merged in time order. The gateway sees each
twin's running and waiting sequences and KV usage, published after every change, exactly as the
request-level fleet publishes its replicas', so the two levels run the same policies and can be
compared request for request.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from chatscale.sim.cost import StepCostModel
from chatscale.sim.gateway_sim import SimGateway, prefix_chain
from chatscale.sim.progress import progress
from chatscale.sim.replay import new_log
from chatscale.sim.request_level import FleetResult
from chatscale.sim.results import Timeline, replica_stats
from chatscale.sim.tokens import answer_key, prompt_token_ids
from chatscale.sim.topology import Topology
from chatscale.sim.twin import ReplicaTwin, TwinConfig
from chatscale.sim.workloads import Workload


@dataclass
class StepLevelFleet:
    topology: Topology
    cost: StepCostModel
    config: TwinConfig
    gateway: SimGateway
    sample_s: float = 10.0

    def run(self, w: Workload, show_progress: bool = False) -> FleetResult:
        topo, cfg, gw = self.topology, self.config, self.gateway
        log = new_log(w)
        twins = [ReplicaTwin(self.cost, cfg, log) for _ in range(topo.size)]
        heap: list[tuple[float, int]] = []
        timeline = Timeline()

        def publish(r: int) -> None:
            twin = twins[r]
            gw.update(r, twin.batch_size, twin.num_waiting, twin.kv.usage)

        def kick(r: int, t: float) -> None:
            end = twins[r].begin_step(t)
            if end is not None:
                heapq.heappush(heap, (end, r))

        def place(i: int, t: float) -> None:
            p, o = int(w.prompt[i]), int(w.output[i])
            chain = prefix_chain(int(w.conv[i]), p, w.hash_ids[i] if w.hash_ids is not None else None)
            r = gw.route(chain, p + o, int(w.region[i]), t)
            if r is None or not twins[r].fits(p, o):
                log.rejected[i] = True
                return
            twins[r].add(i, prompt_token_ids(w, i, cfg.vocab), o, float(w.arrival[i]), answer_key(w, i))
            log.replica[i] = r
            if twins[r].busy_until is None:
                kick(r, t)
            publish(r)

        next_sample = next_expiry = 0.0
        bar = progress(len(w), "fleet (step level)", show_progress)
        for i in range(len(w) + 1):
            t = float(w.arrival[i]) if i < len(w) else math.inf
            while heap and heap[0][0] <= t:
                end, r = heapq.heappop(heap)
                twins[r].end_step()
                kick(r, end)
                publish(r)
                while gw.admission is not None and (j := gw.release(end)) is not None:
                    place(j, end)
            if i == len(w):
                break
            if t >= next_expiry:
                for j in gw.expired(t):
                    log.rejected[j] = True
                next_expiry = t + 1.0
            if t >= next_sample:
                timeline.add(t, [tw.kv.usage for tw in twins], [tw.batch_size for tw in twins],
                             [tw.num_waiting for tw in twins])
                next_sample = t + self.sample_s
            action = gw.arrive(i, str(w.conv[i]), int(w.prompt[i] + w.output[i]), int(w.region[i]), t)
            if action == "admit":
                place(i, t)
            elif action == "reject":
                log.rejected[i] = True
            bar.update()
        for j in gw.expired(math.inf):
            log.rejected[j] = True
        bar.close()
        served = log.replica >= 0
        rtt = np.array([[topo.round_trip(u, f) for f in topo.regions] for u in w.regions])
        lag = np.where(served, rtt[w.region, np.array(topo.region_of())[np.maximum(log.replica, 0)]], 0.0)
        log.first_token += lag
        log.finish += lag
        return FleetResult(log, timeline, spilled=gw.spilled, steps=sum(t.num_steps for t in twins),
                           per_replica=replica_stats(log, gw.peak_waiting, [topo.regions[g] for g in topo.region_of()]))
