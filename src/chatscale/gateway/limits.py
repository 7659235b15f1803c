"""API keys (deny by default, stored hashed) and per-key RPM, TPM and concurrency limits.

Requests and tokens count in fixed one-minute windows. TPM reserves prompt + max_tokens when a
request is admitted and is corrected by the tokens it really used when it ends (`settle`), so a
key that asks for 4,000 tokens and gets 40 is not charged 4,000. Concurrency is a slot held for
the request's life. This module keeps the counters in memory; redis_state.py keeps the same
counters in Redis, updated atomically, so several gateways share them (a slot there is a lease that
its gateway renews, so a dead gateway's slots come back).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from chatscale.gateway.config import KeySpec, hash_key

WINDOW_S = 60


class KeyStore:
    def __init__(self, keys: list[KeySpec]):
        self._by_hash = {k.sha256.lower(): k for k in keys}

    def lookup(self, authorization: str | None) -> KeySpec | None:
        """The key behind an `Authorization: Bearer ...` header, or None: unknown keys are denied."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self._by_hash.get(hash_key(authorization[7:].strip()))


@dataclass
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


@dataclass
class Verdict:
    ok: bool
    reason: str = ""  # rpm | tpm | concurrency
    retry_after: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    window: int = 0  # the window the tokens were reserved in, for settle()
    lease: str | None = None  # the concurrency slot taken, for release() (Redis: a lease id)


def window_of(now: float) -> int:
    return int(now // WINDOW_S)


def refusal(limits: Limits, requests: int, tokens: int, concurrent: int, cost: int) -> str:
    """Which limit a request of `cost` tokens would break, given what the key used so far ('' = none)."""
    if limits.concurrency is not None and concurrent >= limits.concurrency:
        return "concurrency"
    if limits.rpm is not None and requests + 1 > limits.rpm:
        return "rpm"
    if limits.tpm is not None and tokens + cost > limits.tpm:
        return "tpm"
    return ""


def verdict(limits: Limits, reason: str, requests: int, tokens: int, now: float) -> Verdict:
    """OpenAI's x-ratelimit-* headers for the usage after this request (before it, when refused)."""
    reset = WINDOW_S - now % WINDOW_S
    headers = {}
    if limits.rpm is not None:
        headers |= {"x-ratelimit-limit-requests": str(limits.rpm),
                    "x-ratelimit-remaining-requests": str(max(limits.rpm - requests, 0)),
                    "x-ratelimit-reset-requests": f"{reset:.0f}s"}
    if limits.tpm is not None:
        headers |= {"x-ratelimit-limit-tokens": str(limits.tpm),
                    "x-ratelimit-remaining-tokens": str(max(limits.tpm - tokens, 0)),
                    "x-ratelimit-reset-tokens": f"{reset:.0f}s"}
    retry = 1.0 if reason == "concurrency" else float(math.ceil(reset)) if reason else 0.0
    return Verdict(not reason, reason, retry, headers, window_of(now))


class MemoryLimiter:
    """One gateway's counters (the default)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens: dict[tuple[str, int], int] = defaultdict(int)
        self.concurrent: dict[str, int] = defaultdict(int)

    async def acquire(self, key: str, limits: Limits, cost: int, now: float) -> Verdict:
        w = window_of(now)
        for old in [k for k in self.requests if k[1] < w]:  # drop past windows
            self.requests.pop(old, None)
            self.tokens.pop(old, None)
        req, tok = self.requests[key, w], self.tokens[key, w]
        reason = refusal(limits, req, tok, self.concurrent[key], cost)
        if not reason:
            req, tok = req + 1, tok + cost
            self.requests[key, w], self.tokens[key, w] = req, tok
            self.concurrent[key] += 1
        return verdict(limits, reason, req, tok, now)

    async def settle(self, key: str, window: int, delta_tokens: int) -> None:
        if (key, window) in self.tokens:
            self.tokens[key, window] = max(0, self.tokens[key, window] + delta_tokens)

    async def release(self, key: str, lease: str | None) -> None:
        self.concurrent[key] = max(0, self.concurrent[key] - 1)

    async def run(self) -> None:
        """Nothing to keep alive in memory (RedisLimiter renews its leases here)."""

    async def aclose(self) -> None:
        pass
