"""Request-level routing rules over ReplicaViews: the gateway's policies (round-robin, random,
least-outstanding, cache affinity x load) in the form the request-level fleet calls per request.

Cache affinity remembers which replica served a conversation last (its pages are cached there)
and keeps it there unless that replica is busier than the least-loaded offered one by more than
`slack` requests: a hit saves a prefill, a queue costs more than a prefill.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from chatscale.sim.request_level import Picker, ReplicaView


def round_robin() -> Picker:
    turns = itertools.count()
    return lambda i, offered: offered[next(turns) % len(offered)]


def uniform_random(seed: int = 0) -> Picker:
    rng = random.Random(seed)
    return lambda i, offered: offered[int(rng.random() * len(offered))]


def least_outstanding() -> Picker:
    return lambda i, offered: min(offered, key=_outstanding)


def _outstanding(v: ReplicaView) -> int:
    return v.running + v.queued


def cache_affinity(conv: Sequence[int], slack: int = 4) -> Picker:
    home: dict[int, ReplicaView] = {}

    def pick(i: int, offered: list[ReplicaView]) -> ReplicaView:
        best = min(offered, key=_outstanding)
        last = home.get(conv[i])
        if (last is not None and last.up and last.region == best.region
                and last.running + last.queued <= best.running + best.queued + slack):
            best = last
        home[conv[i]] = best
        return best

    return pick


PICKERS = ("affinity", "round-robin", "least-outstanding", "random")


def make_picker(name: str, conv: Sequence[int], seed: int = 0) -> Picker:
    if name == "affinity":
        return cache_affinity(conv)
    if name == "round-robin":
        return round_robin()
    if name == "least-outstanding":
        return least_outstanding()
    if name == "random":
        return uniform_random(seed)
    raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(PICKERS)}")
