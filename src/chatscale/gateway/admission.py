"""Admission control: forward below saturation, queue above it, say "at capacity" when the queue is full.

Pure Python with time passed in (`now`), so the fleet simulator runs it in simulated time; the
gateway's async waiting around it lives in app.py. The contract:

    saturated(replicas, now, limits)       -> bool: no available replica has room (KV or queue)
    adm = Admission(bands=3, max_queue=..., max_wait=...)
    d = adm.arrive(Ticket(key, band, tokens, now, payload), saturated, now)
        d.action == "admit"   forward now
        d.action == "queue"   the ticket waits; later:
            adm.next(now)     -> the ticket to forward next whenever there is room (or None)
            adm.expired(now)  -> tickets that waited longer than max_wait (answer 429 queue_timeout)
        d.action == "reject"  d.reason ("queue_full"), d.retry_after seconds
        d.displaced           a queued ticket pushed out for this one (a full band keeps keys' shares
                              of its slots even): reject it with queue_full

Bands are strict priorities (0 first). Within a band, keys share by a virtual token counter (Sheng
et al., "Fairness in Serving Large Language Models"): each key's counter grows by the tokens it is
served divided by its weight, the waiting key with the smallest counter goes next, and a key that
becomes active starts at the smallest active counter, so idling banks no credit. A key back within
IDLE_AFTER of its queue emptying was not idle, only between requests (its clients' round trip, their
back-off after a 429): lifting it then would take its deficit away again and again (measured: a
closed-loop key that is behind empties its queue precisely because it is served first, and lost 4-7%
of its share that way).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chatscale.gateway.routing import ReplicaState


IDLE_AFTER = 1.0  # seconds without a waiting ticket before a key counts as idle


@dataclass
class SaturationLimits:
    kv_usage: float = 0.9  # a replica at or above this KV usage has no room
    outstanding: float = 8.0  # ... nor one with this many outstanding requests per unit weight


def has_room(r: ReplicaState, limits: SaturationLimits) -> bool:
    return r.kv_usage < limits.kv_usage and r.load() < limits.outstanding


def saturated(replicas: Sequence[ReplicaState], now: float, limits: SaturationLimits) -> bool:
    """The fleet is saturated when no available replica has room."""
    return not any(r.available(now) and has_room(r, limits) for r in replicas)


@dataclass
class Ticket:
    key: str
    band: int = 1
    tokens: int = 1  # the request's cost: prompt + max output tokens
    arrived: float = 0.0
    payload: Any = None  # the caller's handle (an asyncio future in the gateway, a request in the simulator)
    weight: float = 1.0  # the key's fair-share weight


@dataclass
class Decision:
    action: str  # admit | queue | reject
    reason: str = ""
    retry_after: float = 0.0
    displaced: Ticket | None = None  # a queued ticket pushed out to make room (reject it: queue_full)


@dataclass
class _Band:
    queues: dict[str, deque[Ticket]] = field(default_factory=dict)  # key -> waiting tickets, FIFO
    size: int = 0


class Admission:
    def __init__(self, bands: int = 3, max_queue: int = 256, max_wait: float = 30.0):
        self.bands = [_Band() for _ in range(bands)]
        self.max_queue, self.max_wait = max_queue, max_wait
        self.counters: dict[str, float] = {}  # virtual token counter per key
        self._emptied: dict[str, float] = {}  # when each key's last waiting ticket left
        self._drain_rate = 1.0  # tickets forwarded per second, smoothed: sizes Retry-After
        self._last_forward: float | None = None

    @property
    def queued(self) -> int:
        return sum(b.size for b in self.bands)

    def band_of(self, band: int) -> int:
        return min(max(band, 0), len(self.bands) - 1)

    def arrive(self, t: Ticket, is_saturated: bool, now: float) -> Decision:
        t.band = self.band_of(t.band)
        if not is_saturated and not any(b.size for b in self.bands[:t.band + 1]):
            self._serve(t, now)
            return Decision("admit")
        band = self.bands[t.band]
        displaced = None
        if band.size >= self.max_queue:
            # A full band makes room for a key with fewer waiting by pushing out the newest ticket of
            # the key with the most: otherwise a key that floods the queue holds every slot.
            hog = max(band.queues, key=lambda k: len(band.queues[k]))
            if len(band.queues[hog]) <= len(band.queues.get(t.key, ())) + 1:
                return Decision("reject", "queue_full", self.retry_after())
            displaced = band.queues[hog].pop()
            band.size -= 1
        if t.key not in band.queues:
            if now - self._emptied.get(t.key, -math.inf) > IDLE_AFTER:  # no credit for time spent idle
                active = [self.counters.get(k, 0.0) for k in band.queues]
                self.counters[t.key] = max(self.counters.get(t.key, 0.0), min(active, default=0.0))
            band.queues[t.key] = deque()
        band.queues[t.key].append(t)
        band.size += 1
        return Decision("queue", displaced=displaced)

    def next(self, now: float) -> Ticket | None:
        """The ticket to forward now: the highest band, the key with the least service in it."""
        for band in self.bands:
            if band.size:
                key = min(band.queues, key=lambda k: self.counters.get(k, 0.0))
                t = self._pop(band, key, now)
                self._serve(t, now)
                return t
        return None

    def expired(self, now: float) -> list[Ticket]:
        """Remove and return the tickets that waited longer than max_wait."""
        out = []
        for band in self.bands:
            for key in list(band.queues):
                q = band.queues[key]
                while q and now - q[0].arrived > self.max_wait:
                    out.append(self._pop(band, key, now))
        return out

    def cancel(self, t: Ticket) -> bool:
        """Drop a waiting ticket (its client went away)."""
        band = self.bands[t.band]
        q = band.queues.get(t.key)
        if not q or t not in q:
            return False
        q.remove(t)
        band.size -= 1
        if not q:
            del band.queues[t.key]
        return True

    def retry_after(self) -> float:
        """Seconds until the present queue has likely drained, at least 1."""
        return float(max(1, math.ceil(self.queued / max(self._drain_rate, 1e-3))))

    def _pop(self, band: _Band, key: str, now: float) -> Ticket:
        q = band.queues[key]
        t = q.popleft()
        band.size -= 1
        if not q:
            del band.queues[key]
            self._emptied[key] = now
        return t

    def _serve(self, t: Ticket, now: float) -> None:
        self.counters[t.key] = self.counters.get(t.key, 0.0) + t.tokens / max(t.weight, 1e-9)
        if self._last_forward is not None and now > self._last_forward:
            rate = 1.0 / (now - self._last_forward)
            self._drain_rate = 0.9 * self._drain_rate + 0.1 * rate
        self._last_forward = now
