"""The request-level fleet: thousands of replicas, millions of requests, one heap.

Each replica is its service curves (curves.py) plus the state a router and admission control see:
running requests, queue, KV tokens held by running requests (prompt plus half the answer: what a
request holds on average while the real scheduler grows its pages), and an LRU of idle
conversations whose prefix pages are still cached. A request's life is decided when it starts, from the replica's state
at that moment:

    first token = start + half a decode step (the step in flight) + its prefill (queued behind the
                  replica's other prefills) + one decode step, + the network round trip
    TPOT        = decode step at the batch it joins / (1 - share of recent time spent in prefill)
    finish      = first token + (output - 1) x TPOT

and one completion event frees its slot, its KV tokens, and caches its conversation (prompt +
answer) for the next turn. That freezes each request's pace at its start; the step-level fleet,
which runs the real scheduler, shows how far that is off (docs/simulations.md).
"""

from __future__ import annotations

import heapq
import math
import random
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from chatscale.sim.curves import ReplicaCurves
from chatscale.sim.progress import progress
from chatscale.sim.results import RequestLog, Timeline
from chatscale.sim.topology import Topology
from chatscale.sim.workloads import Workload

PREFILL_WINDOW_S = 5.0  # how far back "recent prefill time" looks


@dataclass
class ReplicaView:
    """What routing and admission see of one replica, updated in place as the simulation runs."""

    replica: int
    region: int
    running: int = 0
    queued: int = 0
    kv_tokens: int = 0  # held by running requests
    capacity: int = 1
    up: bool = True

    @property
    def outstanding(self) -> int:
        return self.running + self.queued

    @property
    def kv_usage(self) -> float:
        return self.kv_tokens / self.capacity


# pick(request index, candidate replica views) -> chosen view; admit(request index, view, now) -> bool
Picker = Callable[[int, list[ReplicaView]], ReplicaView]
Admitter = Callable[[int, ReplicaView, float], bool]


@dataclass
class RequestLevelResult:
    log: RequestLog
    timeline: Timeline
    retried: int = 0
    spilled: int = 0  # requests served outside their users' region


@dataclass
class RequestLevelFleet:
    topology: Topology
    curves: ReplicaCurves
    pick: Picker
    admit: Admitter | None = None
    candidates: int = 0  # replicas offered to `pick` per request: 0 = the whole region
    spill_queue: int = 64  # look at the next region when the pick would queue more than this
    sample_s: float = 10.0
    seed: int = 0
    views: list[ReplicaView] = field(init=False)

    def run(self, w: Workload, show_progress: bool = False) -> RequestLevelResult:
        topo, cv = self.topology, self.curves
        region_of = topo.region_of()
        self.views = views = [ReplicaView(r, region_of[r], capacity=cv.capacity_tokens) for r in range(topo.size)]
        members = [[views[r] for r in m] for m in topo.members()]
        user_regions = w.regions
        order = topo.nearest(user_regions)
        rtt = [[topo.round_trip(u, f) for f in topo.regions] for u in user_regions]
        n = len(w)
        log = RequestLog.empty(n)
        log.arrival[:] = w.arrival
        log.prompt[:] = w.prompt
        # array.array columns: list-speed indexing at 8 bytes a value (ten million requests fit)
        arrival, prompt, output = _column("d", w.arrival), _column("q", w.prompt), _column("q", w.output)
        conv, prefix, uregion = _column("q", w.conv), _column("q", w.prefix), _column("q", w.region)
        first_token, finish = array("d", [math.nan]) * n, array("d", [math.nan]) * n
        cached_col, replica_col, rejected = array("q", [0]) * n, array("q", [-1]) * n, array("b", [0]) * n

        queue = [deque() for _ in views]
        running = [set() for _ in views]
        cache = [OrderedDict() for _ in views]
        cache_tokens = [0] * len(views)
        prefill_free = [0.0] * len(views)
        prefill_load, prefill_t = [0.0] * len(views), [0.0] * len(views)
        epoch = [0] * len(views)
        start_of = {}  # request -> (replica, epoch) while running
        heap: list = []
        decode, pre_rate, cap, max_seqs, block = cv.decode, cv.prefill_per_token, cv.capacity_tokens, cv.max_seqs, cv.block_size
        exp = math.exp
        draw = random.Random(self.seed).random
        k = self.candidates
        result = RequestLevelResult(log, Timeline())

        def start(r: int, i: int, t: float) -> None:
            v = views[r]
            c, p, o = conv[i], prompt[i], output[i]
            hit = 0
            held = cache[r].pop(c, None)
            if held is not None:
                cache_tokens[r] -= held
                hit = min(held, prefix[i]) // block * block
            b = v.running
            v.running = b + 1
            v.kv_tokens += p + o // 2
            evict(r)
            ctx = v.kv_tokens // (b + 1)
            kb = ctx.bit_length()
            row = decode[kb if kb < 19 else 18]
            step = row[b + 1]
            todo = p - hit
            pb = todo.bit_length()
            pre = todo * pre_rate[pb if pb < 19 else 18][b.bit_length()]
            begin = prefill_free[r]
            if begin < t:
                begin = t
            prefill_free[r] = begin + pre
            load = prefill_load[r] * exp((prefill_t[r] - t) / PREFILL_WINDOW_S)
            prefill_load[r], prefill_t[r] = load + pre / PREFILL_WINDOW_S, t
            busy = load if load < 0.8 else 0.8
            first = begin + 0.5 * row[b] + pre + step
            done = first + (o - 1) * step / (1 - busy)
            lag = rtt[uregion[i]][v.region]
            first_token[i], finish[i], cached_col[i], replica_col[i] = first + lag, done + lag, hit, r
            running[r].add(i)
            start_of[i] = epoch[r]
            heapq.heappush(heap, (done, i, r))

        def evict(r: int) -> None:
            lru = cache[r]
            over = views[r].kv_tokens + cache_tokens[r] - cap
            while over > 0 and lru:
                _, tokens = lru.popitem(last=False)
                cache_tokens[r] -= tokens
                over -= tokens

        def complete(t: float, i: int, r: int) -> None:
            if start_of.get(i) != epoch[r] or i not in running[r]:
                return  # the replica failed while it ran: the request was retried elsewhere
            del start_of[i]
            running[r].discard(i)
            v = views[r]
            p, o = prompt[i], output[i]
            v.running -= 1
            v.kv_tokens -= p + o // 2
            lru = cache[r]
            c = conv[i]
            old = lru.pop(c, 0)
            lru[c] = p + o
            cache_tokens[r] += p + o - old
            evict(r)
            drain(r, t)

        def drain(r: int, t: float) -> None:
            v, q = views[r], queue[r]
            while q and v.running < max_seqs and v.kv_tokens + prompt[q[0]] + output[q[0]] // 2 <= cap:
                v.queued -= 1
                start(r, q.popleft(), t)

        def place(i: int, t: float) -> None:
            """Route request i (arrival or retry) and start or queue it; False if turned away."""
            u = uregion[i]
            chosen = None
            for region in order[u]:
                pool = [v for v in members[region] if v.up] if failures else members[region]
                if not pool:
                    continue
                if k and len(pool) > k:
                    size = len(pool)
                    offered = [pool[int(draw() * size)] for _ in range(k)]
                else:
                    offered = pool
                chosen = self.pick(i, offered)
                if chosen.queued <= self.spill_queue:
                    break
            if chosen is None:
                rejected[i] = 1
                return
            if region != order[u][0]:
                result.spilled += 1
            if self.admit is not None and not self.admit(i, chosen, t):
                rejected[i] = 1
                return
            r = chosen.replica
            if prompt[i] + output[i] > cap:
                rejected[i] = 1  # can never fit, as LLMEngine.check_request says
            elif (chosen.running < max_seqs and not queue[r]
                    and chosen.kv_tokens + prompt[i] + output[i] // 2 <= cap):
                start(r, i, t)
            else:
                chosen.queued += 1
                queue[r].append(i)

        failures = sorted(self.topology.failures, key=lambda f: f.at)
        fail_events = [(f.at, 0, f.replica, f.down_for) for f in failures]
        heapq.heapify(fail_events)

        def fail_or_recover(t: float, kind: int, r: int, down_for: float) -> None:
            v = views[r]
            if kind == 1:
                v.up = True
                return
            v.up = False
            epoch[r] += 1
            heapq.heappush(fail_events, (t + down_for, 1, r, 0.0))
            lost = list(running[r]) + list(queue[r])
            running[r].clear()
            queue[r].clear()
            v.running = v.queued = v.kv_tokens = 0
            cache[r].clear()
            cache_tokens[r] = 0
            result.retried += len(lost)
            for i in lost:
                place(i, t)

        next_sample = 0.0
        bar = progress(n, "fleet", show_progress)
        tick = max(1, n // 200)
        for i in range(n):
            t = arrival[i]
            while heap and heap[0][0] <= t:
                done, j, r = heapq.heappop(heap)
                complete(done, j, r)
            while fail_events and fail_events[0][0] <= t:
                fail_or_recover(*heapq.heappop(fail_events))
            if t >= next_sample:
                self._sample(result.timeline, t)
                next_sample = t + self.sample_s
            place(i, t)
            if i % tick == 0:
                bar.update(tick)
        while heap:
            done, j, r = heapq.heappop(heap)
            complete(done, j, r)
        bar.close()
        log.first_token[:] = np.frombuffer(first_token, np.float64)
        log.finish[:] = np.frombuffer(finish, np.float64)
        log.cached[:] = np.frombuffer(cached_col, np.int64)
        log.replica[:] = np.frombuffer(replica_col, np.int64)
        log.rejected[:] = np.frombuffer(rejected, np.int8).astype(bool)
        log.output[:] = w.output
        return result

    def _sample(self, timeline: Timeline, t: float) -> None:
        vs = self.views
        timeline.add(t, [v.kv_usage for v in vs], [v.running for v in vs], [v.queued for v in vs])


def _column(typecode: str, values: np.ndarray) -> array:
    out = array(typecode)
    out.frombytes(values.astype(np.float64 if typecode == "d" else np.int64).tobytes())
    return out
