"""Limits and prefix affinity in Redis, so several gateway instances behind one load balancer agree.

The limit check-and-increment is one Lua script: Redis runs it atomically, so two gateways cannot
both take a key's last request of the minute. A concurrency slot is a lease: a member of the key's
sorted set scored by its expiry (Redis's own clock), pruned and counted by that same script, and
renewed every third of `lease_s` by the gateway holding it. A gateway that dies (kill -9, a lost
host) stops renewing, and its slots come back within `lease_s` rather than never.

Affinity is a hash -> replica entry per prefix block with a TTL: a gateway pulls the entries of a
request's chain into its own PrefixIndex before routing and pushes the chain after, so turn 2 finds
turn 1's replica whichever gateway it reaches.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatscale.gateway.limits import WINDOW_S, Limits, Verdict, verdict, window_of
from chatscale.gateway.routing import PrefixIndex

log = logging.getLogger("chatscale.gateway")
_NOW_MS = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
# KEYS: requests, tokens, leases; ARGV: rpm, tpm, concurrency (-1: none), cost, window ttl, lease id, lease ms
ACQUIRE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local req = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(redis.call('GET', KEYS[2]) or '0')
local conc = redis.call('ZCARD', KEYS[3])
local rpm, tpm, cl, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if cl >= 0 and conc >= cl then return {'concurrency', req, tok} end
if rpm >= 0 and req + 1 > rpm then return {'rpm', req, tok} end
if tpm >= 0 and tok + cost > tpm then return {'tpm', req, tok} end
req = redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], ARGV[5])
tok = redis.call('INCRBY', KEYS[2], cost); redis.call('EXPIRE', KEYS[2], ARGV[5])
if cl >= 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), ARGV[6]); redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
return {'', req, tok}
"""
# KEYS: lease sets; ARGV[1]: lease ms, ARGV[i + 1]: the lease held in KEYS[i]. XX: a lease that has
# expired already (this gateway stalled past it) stays gone; its slot may have been taken since.
RENEW = _NOW_MS + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1]); redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""


def _none(x: int | None) -> int:
    return -1 if x is None else x


class RedisLimiter:
    def __init__(self, url: str, lease_s: float = 10.0, prefix: str = "chatscale:gw:"):
        self.redis = aioredis.from_url(url, decode_responses=True)
        self.prefix, self.lease_ms = prefix, max(1, int(lease_s * 1000))
        self.leases: dict[str, str] = {}  # lease id -> the lease set it is in, for every slot held here
        self._acquire = self.redis.register_script(ACQUIRE)
        self._renew = self.redis.register_script(RENEW)

    def _keys(self, key: str, window: int) -> list[str]:
        p = self.prefix
        return [f"{p}req:{key}:{window}", f"{p}tok:{key}:{window}", f"{p}lease:{key}"]

    async def acquire(self, key: str, limits: Limits, cost: int, now: float) -> Verdict:
        keys, lease = self._keys(key, window_of(now)), uuid.uuid4().hex
        args = [_none(limits.rpm), _none(limits.tpm), _none(limits.concurrency), cost, 2 * WINDOW_S, lease,
                self.lease_ms]
        reason, req, tok = await self._acquire(keys=keys, args=args)
        v = verdict(limits, reason, int(req), int(tok), now)
        if v.ok and limits.concurrency is not None:
            v.lease = lease
            self.leases[lease] = keys[2]
        return v

    async def settle(self, key: str, window: int, delta_tokens: int) -> None:
        await self.redis.incrby(self._keys(key, window)[1], delta_tokens)

    async def release(self, key: str, lease: str | None) -> None:
        if lease is not None:
            await self.redis.zrem(self.leases.pop(lease, self._keys(key, 0)[2]), lease)

    async def run(self) -> None:
        """Forever: renew every lease this gateway holds, three times per lease period."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            held = list(self.leases.items())
            if not held:
                continue
            try:
                await self._renew(keys=[k for _, k in held], args=[self.lease_ms, *(lease for lease, _ in held)])
            except RedisError as exc:  # Redis away for a moment: try again next round
                log.warning("concurrency leases not renewed: %s", exc)

    async def aclose(self) -> None:
        await self.redis.aclose()


class RedisAffinity:
    def __init__(self, url: str, ttl_s: int = 3600, prefix: str = "chatscale:gw:aff:"):
        self.redis = aioredis.from_url(url, decode_responses=True)
        self.ttl_s, self.prefix = ttl_s, prefix

    async def pull(self, chain: Sequence[int], index: PrefixIndex) -> None:
        """Copy what other gateways sent of this chain into the local index."""
        if not chain:
            return
        names = await self.redis.mget([f"{self.prefix}{h}" for h in chain])
        for depth, name in enumerate(names):
            if name is None:
                break
            if depth + 1 == len(names) or names[depth + 1] != name:  # record each replica's deepest block once
                index.record(chain[:depth + 1], name)

    async def push(self, chain: Sequence[int], name: str) -> None:
        if chain:
            async with self.redis.pipeline(transaction=False) as pipe:
                for h in chain:
                    pipe.set(f"{self.prefix}{h}", name, ex=self.ttl_s)
                await pipe.execute()

    async def aclose(self) -> None:
        await self.redis.aclose()
