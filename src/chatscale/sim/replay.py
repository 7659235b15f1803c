"""Step-level replay of a workload on one replica twin: the loop an engine server runs, on a
simulated clock (arrivals join between steps; an idle replica waits for the next arrival)."""

from __future__ import annotations

from chatscale.sim.cost import StepCostModel
from chatscale.sim.progress import progress
from chatscale.sim.results import RequestLog
from chatscale.sim.tokens import answer_key, prompt_token_ids
from chatscale.sim.twin import ReplicaTwin, TwinConfig
from chatscale.sim.workloads import Workload


def new_log(w: Workload) -> RequestLog:
    log = RequestLog.empty(len(w))
    log.arrival[:] = w.arrival
    log.prompt[:] = w.prompt
    return log


def simulate_replica(w: Workload, cost: StepCostModel, config: TwinConfig = TwinConfig(),
                     record_steps: bool = True, show_progress: bool = False) -> tuple[RequestLog, ReplicaTwin]:
    log = new_log(w)
    twin = ReplicaTwin(cost, config, log, record_steps=record_steps)
    now, i, n = 0.0, 0, len(w)
    bar = progress(n, "replica", show_progress)
    while i < n or twin.has_work():
        while i < n and w.arrival[i] <= now:
            if twin.fits(int(w.prompt[i]), int(w.output[i])):
                twin.add(i, prompt_token_ids(w, i, config.vocab), int(w.output[i]), float(w.arrival[i]),
                         answer_key(w, i))
                log.replica[i] = 0
            else:
                log.rejected[i] = True
            i += 1
            bar.update()
        end = twin.begin_step(now)
        if end is None:
            now = float(w.arrival[i])
            continue
        twin.end_step()
        now = end
    bar.close()
    return log, twin

