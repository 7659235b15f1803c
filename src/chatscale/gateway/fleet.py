"""The replicas the gateway knows: from fleet.yaml (reloaded on change) and DNS names, probed every
second for health and load.

A replica that fails its health check, times out or answers 5xx is ejected: routing skips it and
it is probed again after 1 s, then 2, 4, ... up to max_backoff. A replica's 429/503 with
Retry-After cools it down for that long without counting as a failure. Load comes from the
replica's Prometheus text: chatscale's, vLLM's or SGLang's metric names.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from chatscale.gateway import config as fleet_config
from chatscale.gateway.config import FleetConfig, ReplicaSpec
from chatscale.gateway.routing import ReplicaState

log = logging.getLogger("chatscale.gateway")

# (KV usage 0..1, running, waiting) under each server's names; SGLang's token_usage is KV usage too.
LOAD_METRICS = {
    "kv": ("chatscale:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
           "sglang:token_usage"),
    "running": ("chatscale:num_requests_running", "vllm:num_requests_running", "sglang:num_running_reqs"),
    "waiting": ("chatscale:num_requests_waiting", "vllm:num_requests_waiting", "sglang:num_queue_reqs"),
}
_WANTED = {name: what for what, names in LOAD_METRICS.items() for name in names}


def parse_load(text: str) -> dict[str, float]:
    """KV usage, running and waiting from Prometheus text, summed over label sets (vLLM labels by model)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        what = _WANTED.get(name)
        if what is not None:
            try:
                value = float(rest.rsplit("}", 1)[-1].split()[0])
            except (ValueError, IndexError):
                continue
            out[what] = out.get(what, 0.0) + value
    return out


class Fleet:
    def __init__(self, cfg: FleetConfig, client: httpx.AsyncClient, path: Path | None = None,
                 on_config: Callable[[FleetConfig], None] = lambda cfg: None,
                 on_eject: Callable[[ReplicaState, str], None] = lambda r, why: None,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.path, self.clock = client, path, clock
        self.on_config, self.on_eject = on_config, on_eject
        self.replicas: dict[str, ReplicaState] = {}
        self.credentials: dict[str, dict[str, str]] = {}  # replica name -> the headers that carry its key
        self._backoff: dict[str, float] = {}
        self._mtime = path.stat().st_mtime if path else 0.0
        self.config = cfg
        self._resolved: list[ReplicaSpec] = []
        self._sync()

    def auth(self, r: ReplicaState) -> dict[str, str]:
        """The headers that carry the replica's own key (none if it has none, or left the config)."""
        return self.credentials.get(r.name, {})

    def available(self) -> list[ReplicaState]:
        now = self.clock()
        return [r for r in self.replicas.values() if r.available(now)]

    # ---- membership ------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Make `replicas` match the config plus the DNS answers, keeping the state of those that stay."""
        specs = {s.name: s for s in [*self.config.replicas, *self._resolved]}
        for name in set(self.replicas) - set(specs):
            del self.replicas[name]
            self.credentials.pop(name, None)
        for s in specs.values():
            r = self.replicas.get(s.name)
            if r is None or r.url != s.url.rstrip("/"):
                r = self.replicas[s.name] = ReplicaState(s.name, s.region, s.url.rstrip("/"))
            r.region, r.weight, r.labels = s.region, s.weight, s.labels
            self.credentials[s.name] = {"authorization": f"Bearer {s.api_key}"} if s.api_key else {}

    def reload_if_changed(self) -> bool:
        if self.path is None:
            return False
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return False
            self._mtime = mtime
            cfg = fleet_config.load(self.path)
        except (OSError, ValueError, TypeError) as exc:  # a half-written or wrong file: keep the old config
            log.warning("fleet config not reloaded: %s", exc)
            return False
        self.config = cfg
        self._sync()
        self.on_config(cfg)
        log.info("fleet config reloaded: %d replicas", len(self.replicas))
        return True

    async def resolve_dns(self) -> None:
        resolved = []
        loop = asyncio.get_running_loop()
        for d in self.config.dns:
            try:
                infos = await loop.getaddrinfo(d.host, d.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("DNS %s: %s", d.host, exc)
                continue
            for addr in sorted({i[4][0] for i in infos}):
                host = f"[{addr}]" if ":" in addr else addr
                resolved.append(ReplicaSpec(f"{d.host}/{addr}", f"{d.scheme}://{host}:{d.port}", d.region, d.weight,
                                            api_key=d.api_key))
        if resolved != self._resolved:
            self._resolved = resolved
            self._sync()

    # ---- health --------------------------------------------------------------------------------

    def eject(self, r: ReplicaState, why: str) -> None:
        backoff = min(self._backoff.get(r.name, 0.5) * 2, self.config.max_backoff)
        self._backoff[r.name] = backoff
        was_healthy, r.healthy = r.healthy, False
        r.cooldown_until = max(r.cooldown_until, self.clock() + backoff)
        if was_healthy:
            log.warning("replica %s ejected (%s); probing again in %.0f s", r.name, why, backoff)
            self.on_eject(r, why)

    def cool(self, r: ReplicaState, seconds: float) -> None:
        """The replica said Retry-After: leave it alone that long."""
        r.cooldown_until = max(r.cooldown_until, self.clock() + seconds)

    async def probe(self, r: ReplicaState) -> None:
        if not r.healthy and self.clock() < r.cooldown_until:
            return
        timeout = self.config.probe_timeout
        try:
            health = await self.client.get(f"{r.url}/health", timeout=timeout)
            if health.status_code != 200:
                return self.eject(r, f"health {health.status_code}")
            metrics = await self.client.get(f"{r.url}/metrics", timeout=timeout, headers=self.auth(r))
        except httpx.HTTPError as exc:
            return self.eject(r, type(exc).__name__)
        if metrics.status_code == 200:
            load = parse_load(metrics.text)
            r.scraped(load.get("kv", 0.0), int(load.get("running", 0)), int(load.get("waiting", 0)))
        if not r.healthy:
            log.info("replica %s is back", r.name)
        r.healthy = True
        self._backoff.pop(r.name, None)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in list(self.replicas.values())))

    async def run(self, after_probe: Callable[[], None] = lambda: None) -> None:
        """Forever: reload the config if it changed, re-resolve DNS names, probe every replica."""
        while True:
            self.reload_if_changed()
            await self.resolve_dns()
            await self.probe_all()
            after_probe()
            await asyncio.sleep(self.config.scrape_interval)
