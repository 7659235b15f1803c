"""The gateway's /metrics: what it did per region and replica, and what routing saw when it chose."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chatscale.gateway.routing import ReplicaState

P = "chatscale_gateway:"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        by_replica = ["region", "replica"]
        self.routed = Counter(f"{P}routed", "Attempts sent to a replica.", by_replica, registry=r)
        self.retried = Counter(f"{P}retried", "Attempts that failed before their first byte and were re-routed.",
                               by_replica, registry=r)
        self.ejected = Counter(f"{P}ejected", "Times a replica was ejected (health, timeout, 5xx).",
                               [*by_replica, "why"], registry=r)
        self.broken = Counter(f"{P}broken_streams", "Streams that broke after their first byte.", by_replica,
                              registry=r)
        self.queued = Counter(f"{P}queued", "Requests that waited in the admission queue.", ["band"], registry=r)
        self.rejected = Counter(f"{P}rejected", "Requests refused, by reason.", ["reason"], registry=r)
        self.queue_time = Histogram(f"{P}queue_time_seconds", "Time spent in the admission queue.", ["band"],
                                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.score = Histogram(f"{P}score_term", "The chosen replica's score terms (cache-affinity policy).",
                               ["term"], buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1, 2, 4, 7), registry=r)
        self.kv = Gauge(f"{P}replica_kv_usage", "Last scraped KV usage.", by_replica, registry=r)
        self.outstanding = Gauge(f"{P}replica_outstanding", "Running + waiting, corrected by in-flight.",
                                 by_replica, registry=r)
        self.inflight = Gauge(f"{P}replica_inflight", "Requests this gateway has open at the replica.",
                              by_replica, registry=r)
        self.up = Gauge(f"{P}replica_up", "1 if the replica takes requests now.", by_replica, registry=r)
        self.waiting = Gauge(f"{P}queue_depth", "Requests waiting in the admission queue now.", registry=r)

    def replicas(self, replicas: list[ReplicaState], now: float, queued: int) -> None:
        for r in replicas:
            labels = (r.region, r.name)
            self.kv.labels(*labels).set(r.kv_usage)
            self.outstanding.labels(*labels).set(r.outstanding)
            self.inflight.labels(*labels).set(r.inflight)
            self.up.labels(*labels).set(1.0 if r.available(now) else 0.0)
        self.waiting.set(queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)
