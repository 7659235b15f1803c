"""The gateway's own routing and admission classes (chatscale.gateway.routing / admission), run in
simulated time for both fleets.

Routing is the gateway's: the policy is offered replicas of every region and chooses as it does
behind `chatscale gateway` (cache affinity keeps the regions whose readiest replica has about the
most headroom, then scores prefix x KV x queue; a replica that is ready beats one that is near).
With admission control, one gateway per user region forwards below saturation (some replica has
room), queues above it (priority bands, fair share by key) and rejects with Retry-After when its
queue is full or a ticket waited too long. Replica state is exact (the simulator has no scrape
lag), kept in the gateway's ReplicaState objects.

At fleet scale a policy is offered `candidates` replicas per request: a uniform sample of the whole
fleet (the power of d choices: each region in proportion to its size) plus the replicas the policy's
prefix index says hold the request's prefix; 0 offers every replica.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from chatscale.gateway.admission import Admission, SaturationLimits, Ticket, has_room
from chatscale.gateway.routing import (AffinityWeights, CacheAffinity, Policy, PrefixIndex, ReplicaState,
                                      RouteRequest, make_policy)
from chatscale.sim.topology import Topology

CHAIN_BLOCK = 128  # tokens per prefix-chain link (the gateway hashes 16; coarser keeps chains short)


@dataclass
class AdmissionSettings:
    bands: int = 3
    max_queue: int = 256  # tickets per band and region gateway
    max_wait: float = 30.0
    limits: SaturationLimits = field(default_factory=SaturationLimits)

    @classmethod
    def for_replicas(cls, max_num_seqs: int, **kw) -> AdmissionSettings:
        """Saturation where a replica's batch is full: beyond that a request only waits in its queue."""
        return cls(limits=SaturationLimits(outstanding=float(max_num_seqs)), **kw)


class SimGateway:
    def __init__(self, topology: Topology, policy: Policy, user_regions: list[str],
                 admission: AdmissionSettings | None = None, candidates: int = 8, seed: int = 0) -> None:
        self.policy = policy
        self.states = [ReplicaState(f"r{r}", topology.regions[g]) for r, g in enumerate(topology.region_of())]
        self.index = {s.name: r for r, s in enumerate(self.states)}
        self.home = [order[0] for order in topology.nearest(user_regions)]  # each user region's nearest
        self.candidates = candidates
        self.peak_waiting = [0] * len(self.states)  # per replica, for the per-replica report
        self._draw = random.Random(seed).random
        self.settings = admission
        self.admission = [Admission(admission.bands, admission.max_queue, admission.max_wait)
                          for _ in user_regions] if admission else None
        self._with_room = len(self.states)  # replicas with room (admission control)
        self._region_of = topology.region_of()
        self.spilled = 0

    # ---- replica state ------------------------------------------------------------------------
    def update(self, r: int, running: int, waiting: int, kv_usage: float) -> None:
        s = self.states[r]
        if waiting > self.peak_waiting[r]:
            self.peak_waiting[r] = waiting
        if self.settings is None:
            s.num_running, s.num_waiting, s.kv_usage = running, waiting, kv_usage
            return
        before = s.healthy and has_room(s, self.settings.limits)
        s.num_running, s.num_waiting, s.kv_usage = running, waiting, kv_usage
        self._with_room += (s.healthy and has_room(s, self.settings.limits)) - before

    def set_healthy(self, r: int, healthy: bool) -> None:
        s = self.states[r]
        if self.settings is not None:
            self._with_room -= s.healthy and has_room(s, self.settings.limits)
        s.healthy = healthy
        if self.settings is not None:
            self._with_room += s.healthy and has_room(s, self.settings.limits)

    # ---- routing ------------------------------------------------------------------------------
    def route(self, chain: list[int], tokens: int, user_region: int, now: float) -> int | None:
        """The replica the policy picks for this request, or None if none is available."""
        req = RouteRequest(chain, tokens)
        route = self.policy.choose(req, self._offer(chain), now)
        if route is None:
            return None
        r = self.index[route.replica.name]
        if self._region_of[r] != self.home[user_region]:
            self.spilled += 1
        self.policy.sent(req, route.replica)
        return r

    def _offer(self, chain: list[int]) -> list[ReplicaState]:
        """What the policy is offered: every replica, or a sample of them plus the prefix holders."""
        pool, k = self.states, self.candidates
        if not k or len(pool) <= k:
            return pool
        n = len(pool)
        offered = {id(s): s for s in (pool[int(self._draw() * n)] for _ in range(k))}
        if chain and isinstance(self.policy, CacheAffinity):
            holders = (self.states[self.index[h]] for h in self.policy.index.matched(chain))
            offered.update((id(s), s) for s in holders)
        return list(offered.values())

    # ---- admission ----------------------------------------------------------------------------
    def saturated(self, user_region: int) -> bool:
        """No replica the gateway routes to has room (admission.saturated over its replicas)."""
        return not self._with_room

    def arrive(self, i: int, key: str, tokens: int, user_region: int, now: float) -> str:
        """"admit", "queue" or "reject" (always "admit" without admission control)."""
        if self.admission is None:
            return "admit"
        ticket = Ticket(key, 1, tokens, now, i)
        return self.admission[user_region].arrive(ticket, self.saturated(user_region), now).action

    def release(self, now: float) -> int | None:
        """A queued request some region's gateway forwards now that its region has room, if any."""
        for u, adm in enumerate(self.admission or []):
            if adm.queued and not self.saturated(u):
                return adm.next(now).payload
        return None

    def expired(self, now: float) -> list[int]:
        """Requests that waited at a gateway longer than max_wait: answered 429 queue_timeout."""
        return [t.payload for adm in self.admission or [] for t in adm.expired(now)]


def sim_policy(name: str, topology: Topology, kv_tokens_per_replica: int, max_num_seqs: int) -> Policy:
    """The gateway policy `name`, configured for these replicas: cache affinity gets a prefix index
    as large as the fleet's KV cache in chain links (it forgets a prefix about when the replicas
    do) and counts a replica's queue as full at its batch size."""
    if name != CacheAffinity.name:
        return make_policy(name)
    index = PrefixIndex(max_blocks=max(200_000, topology.size * kv_tokens_per_replica // CHAIN_BLOCK))
    return CacheAffinity(index, AffinityWeights(queue_norm=float(max_num_seqs)))


def prefix_chain(conv: int, prompt: int, hash_ids: list[int] | None = None) -> list[int]:
    """The request's prefix chain as the gateway would hash it: Mooncake's hash ids as they are, or
    one link per full CHAIN_BLOCK tokens of the conversation so far."""
    if hash_ids is not None:
        return hash_ids
    return [(conv << 16) + j for j in range(prompt // CHAIN_BLOCK)]
