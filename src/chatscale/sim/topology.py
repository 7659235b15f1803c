"""What the fleet looks like: regions, their replicas, the network between them, and failures."""

from __future__ import annotations

from dataclasses import dataclass, field

# One-way-and-back network round trips between regions, seconds (public cloud inter-region pings).
DEFAULT_RTT = {
    ("us-east", "us-west"): 0.065, ("us-east", "eu-west"): 0.075, ("us-east", "ap-japan"): 0.150,
    ("us-east", "ap-india"): 0.190, ("us-west", "eu-west"): 0.140, ("us-west", "ap-japan"): 0.105,
    ("us-west", "ap-india"): 0.220, ("eu-west", "ap-japan"): 0.220, ("eu-west", "ap-india"): 0.120,
    ("ap-japan", "ap-india"): 0.120,
}
LOCAL_RTT = 0.010


@dataclass(frozen=True)
class Failure:
    """Replica `replica` stops at `at` seconds for `down_for` seconds; its requests are retried."""

    at: float
    replica: int
    down_for: float


@dataclass
class Topology:
    """`replicas[region]` replicas per region, numbered region by region in the given order."""

    replicas: dict[str, int]
    rtt: dict[tuple[str, str], float] = field(default_factory=lambda: dict(DEFAULT_RTT))
    failures: list[Failure] = field(default_factory=list)

    @property
    def regions(self) -> list[str]:
        return list(self.replicas)

    @property
    def size(self) -> int:
        return sum(self.replicas.values())

    def region_of(self) -> list[int]:
        """Region index of every replica."""
        return [r for r, n in enumerate(self.replicas.values()) for _ in range(n)]

    def members(self) -> list[list[int]]:
        """Replica ids of every region."""
        out, start = [], 0
        for n in self.replicas.values():
            out.append(list(range(start, start + n)))
            start += n
        return out

    def round_trip(self, a: str, b: str) -> float:
        if a == b:
            return LOCAL_RTT
        return self.rtt.get((a, b)) or self.rtt.get((b, a)) or 0.15

    def nearest(self, user_regions: list[str]) -> list[list[int]]:
        """Per user region: fleet regions by round trip, nearest first (the user's own if it has one)."""
        return [sorted(range(len(self.regions)), key=lambda j: self.round_trip(u, self.regions[j]))
                for u in user_regions]

    @classmethod
    def even(cls, regions: list[str], total: int, **kw) -> Topology:
        per, extra = divmod(total, len(regions))
        return cls({r: per + (i < extra) for i, r in enumerate(regions)}, **kw)
