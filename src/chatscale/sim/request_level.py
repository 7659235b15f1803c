"""The request-level fleet: thousands of replicas, millions of requests, one heap.

Each replica is its service curves (curves.py) plus the state the gateway sees: running requests,
queue, KV tokens held by running requests (prompt plus half the answer: what a request holds on
average while the real scheduler grows its pages), and an LRU of idle conversations whose prefix
pages are still cached. A request's life is decided when it starts, from the replica's state then:

    first token = start + half a decode step (the step in flight) + its prefill (queued behind the
                  replica's other prefills) + one decode step, + the network round trip
    TPOT        = decode step at the batch it joins / (1 - share of recent time spent in prefill)
    finish      = first token + (output - 1) x TPOT

and one completion event frees its slot, its KV tokens, and caches its conversation (prompt +
answer) for the next turn. That freezes each request's pace at its start; the step-level fleet,
which runs the real scheduler, shows how far that is off (docs/simulations.md). Routing and
admission are the gateway's own classes (gateway_sim.py).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from chatscale.sim.curves import ReplicaCurves
from chatscale.sim.gateway_sim import SimGateway, prefix_chain
from chatscale.sim.progress import progress
from chatscale.sim.results import ReplicaStats, RequestLog, Timeline, replica_stats
from chatscale.sim.topology import Topology
from chatscale.sim.workloads import Workload

PREFILL_WINDOW_S = 5.0  # how far back "recent prefill time" looks


@dataclass
class FleetResult:
    log: RequestLog
    timeline: Timeline
    retried: int = 0  # requests re-routed because their replica failed
    spilled: int = 0  # requests served outside their users' nearest region
    steps: int = 0  # scheduler steps (step level only)
    per_replica: list[ReplicaStats] = field(default_factory=list)


@dataclass
class RequestLevelFleet:
    topology: Topology
    curves: ReplicaCurves
    gateway: SimGateway
    sample_s: float = 10.0

    def run(self, w: Workload, show_progress: bool = False) -> FleetResult:
        topo, cv, gw = self.topology, self.curves, self.gateway
        size = topo.size
        region_of = topo.region_of()
        rtt = [[topo.round_trip(u, f) for f in topo.regions] for u in w.regions]
        n = len(w)
        log = RequestLog.empty(n)
        log.arrival[:] = w.arrival
        log.prompt[:] = w.prompt
        # array.array columns: list-speed indexing at 8 bytes a value (ten million requests fit)
        arrival, prompt, output = _column("d", w.arrival), _column("q", w.prompt), _column("q", w.output)
        conv, prefix, uregion = _column("q", w.conv), _column("q", w.prefix), _column("q", w.region)
        hashes = w.hash_ids
        first_token, finish = array("d", [math.nan]) * n, array("d", [math.nan]) * n
        cached_col, replica_col, rejected = array("q", [0]) * n, array("q", [-1]) * n, array("b", [0]) * n

        queue = [deque() for _ in range(size)]
        running = [set() for _ in range(size)]
        kv_tokens = [0] * size
        cache = [OrderedDict() for _ in range(size)]
        cache_tokens = [0] * size
        prefill_free = [0.0] * size
        prefill_load, prefill_t = [0.0] * size, [0.0] * size
        heap: list = []
        decode, pre_rate, cap, max_seqs, block = (cv.decode, cv.prefill_per_token, cv.capacity_tokens,
                                                  cv.max_seqs, cv.block_size)
        exp = math.exp
        update = gw.update
        result = FleetResult(log, Timeline())
        self._kv, self._queue, self._running = kv_tokens, queue, running

        def publish(r: int) -> None:
            update(r, len(running[r]), len(queue[r]), kv_tokens[r] / cap)

        def start(r: int, i: int, t: float) -> None:
            c, p, o = conv[i], prompt[i], output[i]
            hit = 0
            held = cache[r].pop(c, None)
            if held is not None:
                cache_tokens[r] -= held
                hit = min(held, prefix[i]) // block * block
            b = len(running[r])
            kv_tokens[r] += p + o // 2
            evict(r)
            kb = (kv_tokens[r] // (b + 1)).bit_length()
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
            lag = rtt[uregion[i]][region_of[r]]
            first_token[i], finish[i], cached_col[i], replica_col[i] = first + lag, done + lag, hit, r
            running[r].add(i)
            heapq.heappush(heap, (done, i, r))

        def evict(r: int) -> None:
            lru = cache[r]
            over = kv_tokens[r] + cache_tokens[r] - cap
            while over > 0 and lru:
                _, tokens = lru.popitem(last=False)
                cache_tokens[r] -= tokens
                over -= tokens

        def complete(t: float, i: int, r: int) -> None:
            if i not in running[r]:
                return  # the replica failed while it ran: the request was retried elsewhere
            running[r].discard(i)
            p, o = prompt[i], output[i]
            kv_tokens[r] -= p + o // 2
            lru = cache[r]
            c = conv[i]
            cache_tokens[r] += p + o - lru.pop(c, 0)
            lru[c] = p + o
            evict(r)
            q = queue[r]
            while q and len(running[r]) < max_seqs and kv_tokens[r] + prompt[q[0]] + output[q[0]] // 2 <= cap:
                start(r, q.popleft(), t)
            publish(r)
            if gw.admission is not None:
                while (j := gw.release(t)) is not None:
                    place(j, t)

        def place(i: int, t: float) -> None:
            """Route request i (on arrival, from a gateway queue, or retried) and start or queue it."""
            p, o = prompt[i], output[i]
            chain = prefix_chain(conv[i], p, hashes[i] if hashes is not None else None)
            r = gw.route(chain, p + o, uregion[i], t)
            if r is None or p + o > cap:  # nothing up, or it can never fit (LLMEngine.check_request)
                rejected[i] = 1
                return
            if len(running[r]) < max_seqs and not queue[r] and kv_tokens[r] + p + o // 2 <= cap:
                start(r, i, t)
            else:
                queue[r].append(i)
            publish(r)

        def arrive(i: int, t: float) -> None:
            action = gw.arrive(i, str(conv[i]), prompt[i] + output[i], uregion[i], t)
            if action == "admit":
                place(i, t)
            elif action == "reject":
                rejected[i] = 1

        fail_events = [(f.at, 0, f.replica, f.down_for) for f in topo.failures]
        heapq.heapify(fail_events)

        def fail_or_recover(t: float, kind: int, r: int, down_for: float) -> None:
            if kind == 1:
                gw.set_healthy(r, True)
                return
            gw.set_healthy(r, False)
            heapq.heappush(fail_events, (t + down_for, 1, r, 0.0))
            lost = list(running[r]) + list(queue[r])
            running[r].clear()
            queue[r].clear()
            kv_tokens[r] = 0
            cache[r].clear()
            cache_tokens[r] = 0
            publish(r)
            result.retried += len(lost)
            for i in lost:
                place(i, t)

        next_sample = next_expiry = 0.0
        bar = progress(n, "fleet", show_progress)
        tick = max(1, n // 200)
        for i in range(n):
            t = arrival[i]
            while heap and heap[0][0] <= t:
                done, j, r = heapq.heappop(heap)
                complete(done, j, r)
            while fail_events and fail_events[0][0] <= t:
                fail_or_recover(*heapq.heappop(fail_events))
            if t >= next_expiry:
                for j in gw.expired(t):
                    rejected[j] = 1
                next_expiry = t + 1.0
            if t >= next_sample:
                self._sample(result.timeline, t)
                next_sample = t + self.sample_s
            arrive(i, t)
            if (i + 1) % tick == 0:
                bar.update(tick)
        while heap:
            done, j, r = heapq.heappop(heap)
            complete(done, j, r)
        for j in gw.expired(math.inf):
            rejected[j] = 1
        bar.update(n - bar.n)  # the last partial tick: the bar ends at its total, not past it
        bar.close()
        log.first_token[:] = np.frombuffer(first_token, np.float64)
        log.finish[:] = np.frombuffer(finish, np.float64)
        log.cached[:] = np.frombuffer(cached_col, np.int64)
        log.replica[:] = np.frombuffer(replica_col, np.int64)
        log.rejected[:] = np.frombuffer(rejected, np.int8).astype(bool)
        log.output[:] = w.output
        result.spilled = gw.spilled
        result.per_replica = replica_stats(log, gw.peak_waiting, [topo.regions[g] for g in region_of])
        return result

    def _sample(self, timeline: Timeline, t: float) -> None:
        cap = self.curves.capacity_tokens
        timeline.add(t, [k / cap for k in self._kv], [len(r) for r in self._running], [len(q) for q in self._queue])


def _column(typecode: str, values: np.ndarray) -> array:
    out = array(typecode)
    out.frombytes(values.astype(np.float64 if typecode == "d" else np.int64).tobytes())
    return out
