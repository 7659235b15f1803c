"""Limits and prefix affinity in Redis, so several gateway instances behind one load balancer agree.

The limit check-and-increment is one Lua script: Redis runs it atomically, so two gateways cannot
both take a key's last request of the minute. Affinity is a hash -> replica entry per prefix block
with a TTL: a gateway pulls the entries of a request's chain into its own PrefixIndex before
routing and pushes the chain after, so turn 2 finds turn 1's replica whichever gateway it reaches.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from chatscale.gateway.limits import WINDOW_S, Limits, Verdict, verdict, window_of
from chatscale.gateway.routing import PrefixIndex

# KEYS: requests, tokens, concurrent; ARGV: rpm, tpm, concurrency (-1: none), cost, window ttl
ACQUIRE = """
local req = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(redis.call('GET', KEYS[2]) or '0')
local conc = tonumber(redis.call('GET', KEYS[3]) or '0')
local rpm, tpm, cl, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if cl >= 0 and conc >= cl then return {'concurrency', req, tok} end
if rpm >= 0 and req + 1 > rpm then return {'rpm', req, tok} end
if tpm >= 0 and tok + cost > tpm then return {'tpm', req, tok} end
req = redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], ARGV[5])
tok = redis.call('INCRBY', KEYS[2], cost); redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('INCR', KEYS[3]); redis.call('EXPIRE', KEYS[3], 3600)
return {'', req, tok}
"""
# A concurrency slot never goes below zero, even if a release arrives after the key expired.
RELEASE = "if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then return redis.call('DECR', KEYS[1]) end return 0"


def _none(x: int | None) -> int:
    return -1 if x is None else x


class RedisLimiter:
    def __init__(self, url: str, prefix: str = "chatscale:gw:"):
        self.redis = aioredis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self._acquire = self.redis.register_script(ACQUIRE)
        self._release = self.redis.register_script(RELEASE)

    def _keys(self, key: str, window: int) -> list[str]:
        p = self.prefix
        return [f"{p}req:{key}:{window}", f"{p}tok:{key}:{window}", f"{p}conc:{key}"]

    async def acquire(self, key: str, limits: Limits, cost: int, now: float) -> Verdict:
        args = [_none(limits.rpm), _none(limits.tpm), _none(limits.concurrency), cost, 2 * WINDOW_S]
        reason, req, tok = await self._acquire(keys=self._keys(key, window_of(now)), args=args)
        return verdict(limits, reason, int(req), int(tok), now)

    async def settle(self, key: str, window: int, delta_tokens: int) -> None:
        await self.redis.incrby(self._keys(key, window)[1], delta_tokens)

    async def release(self, key: str) -> None:
        await self._release(keys=[self._keys(key, 0)[2]])

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
