"""Which replica gets a request: pure Python, no I/O, no asyncio, time passed in as `now`.

The gateway (app.py) and the fleet simulator (chatscale.sim) run these very classes, one against
scraped replicas and the other in simulated time. The contract, kept small on purpose:

    replicas: list[ReplicaState]        what the gateway knows of each replica (scraped + its own in-flight)
    req = RouteRequest(chain, tokens)   chain: the prompt's prefix block-hash chain (block_hashes /
                                        text_block_hashes, or a trace's hash_ids as they are)
    route = policy.choose(req, replicas, now)   -> Route(replica, terms) or None (nothing available)
    policy.sent(req, route.replica)     remember what was sent where (prefix memory, round-robin turn)
    replica.inflight += 1 ... -= 1      the caller's own reservations, until the next scrape sees them

Policies: CacheAffinity (the default), RoundRobin, LeastOutstanding, RandomChoice; `make_policy(name)`.

CacheAffinity first keeps the regions whose readiest replica has about the most headroom (a replica
that is ready beats one that is near: streaming time dwarfs round trips; a region's best replica, not
its sum, so that an idle replica in a small region is not passed over for busy ones in a large
region), then scores each replica
    w_prefix x cached-prefix fraction + w_kv x (1 - KV usage) + w_queue x (1 - outstanding / queue_norm)
(the queue term goes negative past queue_norm, so deeper queues keep losing) with outstanding
corrected by the gateway's own in-flight requests since the last scrape (a scrape is up to a
second old; without the correction a burst lands on the replica that looked idle). The
prefix term is dropped for a replica loaded beyond the fleet mean by `hotspot_margin`, so affinity
cannot build a hot spot.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class ReplicaState:
    """One replica as routing sees it: config, the last scrape, and the gateway's own reservations."""

    name: str
    region: str = "default"
    url: str = ""
    weight: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)
    kv_usage: float = 0.0  # 0..1, scraped
    num_running: int = 0  # scraped
    num_waiting: int = 0  # scraped
    inflight: int = 0  # requests this gateway has open at the replica now
    inflight_at_scrape: int = 0  # `inflight` when the last scrape was taken
    healthy: bool = True
    cooldown_until: float = 0.0  # a 429/503 Retry-After, or an ejection's backoff

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.cooldown_until

    @property
    def outstanding(self) -> float:
        """Running + waiting, corrected by what this gateway sent or finished since the scrape."""
        scraped = self.num_running + self.num_waiting + self.inflight - self.inflight_at_scrape
        return float(max(scraped, self.inflight))

    def load(self) -> float:
        """Outstanding requests per unit of weight: what 'busier than the mean' compares."""
        return self.outstanding / max(self.weight, 1e-9)

    def scraped(self, kv_usage: float, running: int, waiting: int) -> None:
        self.kv_usage, self.num_running, self.num_waiting = kv_usage, running, waiting
        self.inflight_at_scrape = self.inflight


@dataclass
class RouteRequest:
    chain: Sequence[int] = ()  # prefix block hashes, each one covering all blocks before it
    tokens: int = 0  # estimated prompt + max output tokens
    key: str = ""  # the API key's name (for logs; routing ignores it)


@dataclass
class Route:
    replica: ReplicaState
    terms: dict[str, float] = field(default_factory=dict)  # score terms of the chosen replica


# ---- prefix hashing and memory -----------------------------------------------------------------


def _chain(blocks: Iterable[bytes]) -> list[int]:
    """A stable hash chain (same across processes, unlike hash()), so gateways can share it."""
    out, prev = [], b""
    for block in blocks:
        prev = hashlib.blake2b(prev + block, digest_size=8).digest()
        out.append(int.from_bytes(prev, "big") >> 1)  # fits a signed 64-bit (Redis, numpy)
    return out


def block_hashes(token_ids: Sequence[int], block_size: int = 16) -> list[int]:
    """Hash chain over full blocks of token ids, as the replicas' paged prefix cache sees them."""
    n = len(token_ids) // block_size * block_size
    return _chain(b",".join(b"%d" % t for t in token_ids[i:i + block_size]) for i in range(0, n, block_size))


def text_block_hashes(text: str, block_chars: int = 64) -> list[int]:
    """Hash chain over full blocks of characters: the fallback when no tokenizer is configured."""
    data = text.encode()
    n = len(data) // block_chars * block_chars
    return _chain(data[i:i + block_chars] for i in range(0, n, block_chars))


class PrefixIndex:
    """Bounded LRU memory of which prefix blocks were sent to which replicas.

    A replica that was sent block k of a chain holds (or held) blocks 0..k too, so a request's
    cached-prefix length at a replica is its deepest block recorded there.
    """

    def __init__(self, max_blocks: int = 200_000, replicas_per_block: int = 4):
        self.max_blocks, self.replicas_per_block = max_blocks, replicas_per_block
        self._where: OrderedDict[int, list[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def matched(self, chain: Sequence[int]) -> dict[str, int]:
        """Replica name -> number of leading blocks of `chain` sent there."""
        out: dict[str, int] = {}
        for i, h in enumerate(chain):
            names = self._where.get(h)
            if names is None:
                break  # a chain's later blocks cannot be anywhere its earlier ones are not recorded
            self._where.move_to_end(h)
            for name in names:
                out[name] = i + 1
        return out

    def record(self, chain: Iterable[int], name: str) -> None:
        for h in chain:
            names = self._where.setdefault(h, [])
            if name in names:
                names.remove(name)
            names.append(name)  # most recent last; the oldest holder is dropped first
            del names[:-self.replicas_per_block]
            self._where.move_to_end(h)
        while len(self._where) > self.max_blocks:
            self._where.popitem(last=False)

    def forget(self, name: str) -> None:
        """A replica restarted or left: its cache is gone."""
        for h in [h for h, names in self._where.items() if name in names]:
            names = self._where[h]
            names.remove(name)
            if not names:
                del self._where[h]


# ---- policies ----------------------------------------------------------------------------------


class Policy:
    """choose() picks among the available replicas; sent() is told what the caller did with it."""

    name = "policy"

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaState], now: float) -> Route | None:
        raise NotImplementedError

    def sent(self, req: RouteRequest, replica: ReplicaState) -> None:
        pass


def available(replicas: Sequence[ReplicaState], now: float) -> list[ReplicaState]:
    return [r for r in replicas if r.available(now)]


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, req, replicas, now):
        up = available(replicas, now)
        return Route(up[next(self._turn) % len(up)]) if up else None


class LeastOutstanding(Policy):
    name = "least-outstanding"

    def choose(self, req, replicas, now):
        up = available(replicas, now)
        return Route(min(up, key=ReplicaState.load)) if up else None


class RandomChoice(Policy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, req, replicas, now):
        up = available(replicas, now)
        return Route(self._rng.choice(up)) if up else None


@dataclass
class AffinityWeights:
    prefix: float = 3.0  # llm-d's default scorer weights: prefix 3, queue 2, KV 2
    kv: float = 2.0
    queue: float = 2.0
    queue_norm: float = 16.0  # outstanding requests per unit weight counted as a full queue
    hotspot_margin: float = 0.5  # no affinity for a replica loaded above mean x (1 + margin) ...
    hotspot_slack: float = 2.0  # ... and above the mean by this many requests (small fleets stay calm)
    region_tolerance: float = 0.8  # regions whose best headroom >= this x the best one compete on score


class CacheAffinity(Policy):
    name = "cache-affinity"

    def __init__(self, index: PrefixIndex | None = None, weights: AffinityWeights | None = None) -> None:
        self.index = index if index is not None else PrefixIndex()
        self.w = weights or AffinityWeights()
        self._turn = itertools.count()  # ties (an idle fleet, a new conversation) go round the replicas

    def headroom(self, r: ReplicaState) -> float:
        busy = max(r.kv_usage, min(1.0, r.load() / self.w.queue_norm))
        return r.weight * (1.0 - busy)

    def choose(self, req, replicas, now):
        up = available(replicas, now)
        if not up:
            return None
        room: dict[str, float] = {}
        for r in up:
            room[r.region] = max(room.get(r.region, 0.0), self.headroom(r))
        best_room = max(room.values())
        up = [r for r in up if room[r.region] >= best_room * self.w.region_tolerance]
        mean = sum(r.load() for r in up) / len(up)
        matched = self.index.matched(req.chain) if req.chain else {}
        best: Route | None = None
        start = next(self._turn) % len(up)
        for r in up[start:] + up[:start]:
            hot = r.load() > mean * (1 + self.w.hotspot_margin) and r.load() - mean >= self.w.hotspot_slack
            terms = {
                "prefix": 0.0 if hot else matched.get(r.name, 0) / len(req.chain) if req.chain else 0.0,
                "kv": 1.0 - min(max(r.kv_usage, 0.0), 1.0),
                # Not floored at 0: past queue_norm a longer queue still scores lower, so an overloaded
                # fleet keeps sending to its shortest queues (at 0 they all looked alike).
                "queue": 1.0 - r.load() / self.w.queue_norm,
            }
            terms["score"] = self.w.prefix * terms["prefix"] + self.w.kv * terms["kv"] + self.w.queue * terms["queue"]
            if best is None or terms["score"] > best.terms["score"]:
                best = Route(r, terms)
        return best

    def sent(self, req, replica):
        if req.chain:
            self.index.record(req.chain, replica.name)


POLICIES = {p.name: p for p in (CacheAffinity, RoundRobin, LeastOutstanding, RandomChoice)}


def make_policy(name: str, **kwargs) -> Policy:
    """A policy by its config name: cache-affinity (default), round-robin, least-outstanding, random."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
