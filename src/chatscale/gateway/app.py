"""The gateway's HTTP face: one OpenAI-compatible endpoint that streams from the fleet's replicas.

A generation request goes: key (401 unless known) -> key policies (403 if blocked; throttle,
lower priority, rewrite) -> limits (429 + x-ratelimit-*) -> admission (forward, or wait in the
priority/fair-share queue, or 429 "We are at capacity" + Retry-After) -> routing -> the replica.
An attempt that fails before the replica's first token (refused, reset, 5xx, 429/503, a stream
that breaks after only its role chunk, which is held back) is re-routed up to max_retries times, so
a replica dying under load loses no request that had not started streaming; one that breaks after
it ends with an OpenAI error event and [DONE], never with repeated tokens. Only whole SSE events
are forwarded, so that error event can never land in the middle of a half-sent one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from chatscale.gateway import policy as key_policy
from chatscale.gateway import request as request_body
from chatscale.gateway.admission import Admission, Ticket, saturated
from chatscale.gateway.config import FleetConfig, KeySpec
from chatscale.gateway.fleet import Fleet
from chatscale.gateway.limits import KeyStore, MemoryLimiter
from chatscale.gateway.metrics import GatewayMetrics
from chatscale.gateway.routing import (CacheAffinity, Policy, PrefixIndex, ReplicaState, Route, RouteRequest,
                                       block_hashes, make_policy, text_block_hashes)
from chatscale.request_body import BodyRefused, read_body

log = logging.getLogger("chatscale.gateway")
QUEUE_TICK_S = 0.05  # how often queued requests are checked for timeouts and free room
DONE = b"data: [DONE]\n\n"


class Refused(Exception):
    """A request the gateway answers itself, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str, code: str | None, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.headers, self.param = status, type, code, headers or {}, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


def at_capacity(reason: str, retry_after: float) -> Refused:
    return Refused(429, "We are at capacity. Please retry after a short wait.", "server_overloaded", reason,
                   {"retry-after": f"{retry_after:.0f}", "x-chatscale-reject-reason": reason})


def no_replica() -> Refused:
    return Refused(503, "No replica is available.", "server_error", "no_replica", {"retry-after": "1"})


def error_event(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()


def first_token_in(data: bytes) -> bool:
    """Has the stream said anything a retry would repeat: a token, a finish, an error, or its end?"""
    for event in data.split(b"\n\n")[:-1]:  # whole events only
        if not event.startswith(b"data: {"):
            if event.startswith(b"data: "):
                return True
            continue
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return True
        if "error" in obj or obj.get("usage") or any(
                (c.get("delta") or {}).get("content") or c.get("text") or c.get("finish_reason")
                for c in obj.get("choices") or []):
            return True
    return False


@dataclass
class Exchange:
    """One generation request's state across its attempts."""

    rid: str
    key: KeySpec
    path: str
    body: dict
    route_req: RouteRequest
    prompt_tokens: int
    cost: int
    window: int
    started: float
    lease: str | None  # the key's concurrency slot, given back in _finish
    region: str = ""
    replica: str = ""
    output_tokens: int = 0
    status: int = 0
    hide_usage: bool = False  # the usage chunk was the gateway's idea: not forwarded


class Gateway:
    def __init__(self, cfg: FleetConfig, path: Path | None = None, redis_url: str | None = None,
                 request_log: Path | None = None):
        self.metrics = GatewayMetrics()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=cfg.connect_timeout),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=512))
        self.fleet = Fleet(cfg, self.client, path, on_config=self.configure, on_eject=self._ejected)
        self.admission = Admission()
        redis_url = redis_url or cfg.redis_url
        if redis_url:
            from chatscale.gateway.redis_state import RedisAffinity, RedisLimiter

            self.limiter, self.affinity = RedisLimiter(redis_url, cfg.concurrency_lease), RedisAffinity(redis_url)
        else:
            self.limiter, self.affinity = MemoryLimiter(), None
        self.log_file = request_log.open("a", buffering=1) if request_log else None
        self.policy: Policy = make_policy("round-robin")
        self.configure(cfg)

    @property
    def cfg(self) -> FleetConfig:
        return self.fleet.config

    def configure(self, cfg: FleetConfig) -> None:
        """Apply a (re)loaded config; the prefix memory survives a reload that keeps the policy."""
        self.keys = KeyStore(cfg.keys)
        a = cfg.admission
        if len(self.admission.bands) != a.bands and self.admission.queued == 0:
            self.admission = Admission(a.bands, a.max_queue, a.max_wait)
        self.admission.max_queue, self.admission.max_wait = a.max_queue, a.max_wait
        if cfg.policy == CacheAffinity.name:
            index = self.policy.index if isinstance(self.policy, CacheAffinity) else PrefixIndex(cfg.prefix_memory)
            index.max_blocks = cfg.prefix_memory
            self.policy = CacheAffinity(index, cfg.weights)
        elif cfg.policy != self.policy.name:
            self.policy = make_policy(cfg.policy)
        self.tokenizer = None
        if cfg.tokenizer:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(cfg.tokenizer)

    def _ejected(self, r: ReplicaState, why: str) -> None:
        self.metrics.ejected.labels(r.region, r.name, why).inc()
        if isinstance(self.policy, CacheAffinity):
            self.policy.index.forget(r.name)  # it may come back restarted, with an empty cache

    # ---- routing and admission ---------------------------------------------------------------------

    def _route(self, req: RouteRequest, exclude: set[str] = frozenset()) -> Route | None:
        """Choose a replica and reserve it (in-flight) at once, so the next choice already sees it."""
        candidates = [r for r in self.fleet.replicas.values() if r.name not in exclude]
        route = self.policy.choose(req, candidates, self.fleet.clock())
        if route is not None:
            self.policy.sent(req, route.replica)
            route.replica.inflight += 1
            for term, value in route.terms.items():
                self.metrics.score.labels(term).observe(value)
        return route

    def _saturated(self) -> bool:
        return saturated(list(self.fleet.replicas.values()), self.fleet.clock(), self.cfg.admission.saturation)

    async def _admit(self, x: Exchange, band: int) -> Route:
        if not self.fleet.available():
            raise no_replica()
        now = self.fleet.clock()
        ticket = Ticket(x.key.name, band, x.cost, now, weight=x.key.weight)
        decision = self.admission.arrive(ticket, self._saturated(), now)
        if decision.action == "reject":
            raise at_capacity(decision.reason, decision.retry_after)
        if decision.action == "admit":
            route = self._route(x.route_req)
            if route is None:
                raise no_replica()
            return route
        if decision.displaced is not None:
            decision.displaced.payload[0].set_exception(at_capacity("queue_full", self.admission.retry_after()))
        self.metrics.queued.labels(str(ticket.band)).inc()
        future: asyncio.Future[Route] = asyncio.get_running_loop().create_future()
        ticket.payload = (future, x.route_req)
        try:
            route = await future
        except asyncio.CancelledError:  # the client left while waiting
            if not self.admission.cancel(ticket) and future.done() and not future.cancelled() \
                    and future.exception() is None:
                future.result().replica.inflight -= 1
            raise
        finally:
            self.metrics.queue_time.labels(str(ticket.band)).observe(self.fleet.clock() - now)
        return route

    def pump(self) -> None:
        """Time out the queue's overdue requests, then forward queued ones while the fleet has room."""
        now = self.fleet.clock()
        for t in self.admission.expired(now):
            t.payload[0].set_exception(at_capacity("queue_timeout", self.admission.retry_after()))
        while self.admission.queued and not self._saturated():
            t = self.admission.next(now)
            future, req = t.payload
            route = self._route(req)
            if route is None:
                future.set_exception(no_replica())
            else:
                future.set_result(route)

    # ---- a generation request ---------------------------------------------------------------------

    def _prefix(self, text: str | list[int]) -> tuple[list[int], int]:
        """The prompt's prefix hash chain and its token count (estimated at 4 characters a token
        when no tokenizer is configured)."""
        if isinstance(text, list):
            return block_hashes(text, self.cfg.block_size), len(text)
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            return block_hashes(ids, self.cfg.block_size), len(ids)
        return text_block_hashes(text, self.cfg.block_chars), len(text) // 4 + 1

    async def generate(self, request: Request) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            return await self._generate(request, rid)
        except Refused as refused:
            self.metrics.rejected.labels(refused.code).inc()
            refused.headers["x-request-id"] = rid
            return refused.response()

    async def _generate(self, request: Request, rid: str) -> Response:
        key = self.keys.lookup(request.headers.get("authorization"))
        if key is None:
            raise Refused(401, "Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
        gen = await self._read(request)
        band = key.priority
        if key.priority_header and request.headers.get("x-priority", "").isdigit():
            band = int(request.headers["x-priority"])
        applied = key_policy.apply(key, gen.body, band)
        if applied.blocked:
            raise Refused(403, "This API key is blocked.", "permission_error", "key_blocked")
        if applied.body is not gen.body:  # rewritten: route and count what the replica will see
            gen = request_body.read(applied.body)
        chain, counted = self._prefix(gen.prompt)
        prompt_tokens = counted if gen.prompt_tokens is None else gen.prompt_tokens
        max_tokens = gen.max_tokens or self.cfg.default_max_tokens
        cost = prompt_tokens + max_tokens * gen.n * gen.num_prompts
        verdict = await self.limiter.acquire(key.name, applied.limits, cost, time.time())
        if not verdict.ok:
            raise Refused(429, f"Rate limit reached for this key ({verdict.reason}).", "rate_limit_error",
                          "rate_limit_exceeded", {**verdict.headers, "retry-after": f"{verdict.retry_after:.0f}",
                                                  "x-chatscale-reject-reason": verdict.reason})
        x = Exchange(rid, key, request.url.path, applied.body, RouteRequest(chain, cost, key.name), prompt_tokens,
                     cost, verdict.window, time.time(), verdict.lease)
        try:
            if self.affinity is not None and isinstance(self.policy, CacheAffinity):
                await self.affinity.pull(chain, self.policy.index)
            route = await self._admit(x, applied.band)
            if self.affinity is not None:
                await self.affinity.push(chain, route.replica.name)
            response = await self._forward(x, route)
        except BaseException:
            await self._finish(x, None)
            raise
        response.headers.update({**verdict.headers, "x-request-id": rid})
        return response

    async def _read(self, request: Request) -> request_body.Generation:
        """The body, bounded in size and time, and the fields the gateway reads from it, checked."""
        try:
            messages = await read_body(request.scope, request.receive, self.cfg.max_body_bytes, self.cfg.body_timeout)
            return request_body.parse(b"".join(m.get("body", b"") for m in messages))
        except BodyRefused as refused:
            raise Refused(refused.status, str(refused), "invalid_request_error", refused.code) from None
        except request_body.Malformed as bad:
            raise Refused(400, str(bad), "invalid_request_error", None, param=bad.param) from None

    async def _forward(self, x: Exchange, route: Route | None) -> Response:
        """Attempts until one yields a first body byte; then the response, whole or streamed."""
        headers = {"content-type": "application/json", "x-request-id": x.rid}  # and each replica's key
        body, x.hide_usage = x.body, False
        if body.get("stream") and not (body.get("stream_options") or {}).get("include_usage"):
            # Ask for the usage chunk (TPM settles on it) and keep it from a client that did not ask.
            body, x.hide_usage = {**body, "stream_options": {**(body.get("stream_options") or {}),
                                                             "include_usage": True}}, True
        content = json.dumps(body).encode()
        tried: set[str] = set()
        for attempt in range(self.cfg.max_retries + 1):
            if route is None:
                route = self._route(x.route_req, exclude=tried)
                if route is None:
                    break
            r = route.replica
            self.metrics.routed.labels(r.region, r.name).inc()
            upstream = None
            try:
                upstream = await self.client.send(
                    self.client.build_request("POST", f"{r.url}{x.path}", content=content,
                                              headers={**headers, **self.fleet.auth(r)}),
                    stream=True)
                if upstream.status_code >= 500 or upstream.status_code == 429:
                    raise _Busy(upstream)
                chunks = upstream.aiter_raw()
                first = await anext(chunks, b"")
                streamed = upstream.headers.get("content-type", "").startswith("text/event-stream")
                while streamed and not first_token_in(first):  # a bare role chunk can still be withheld
                    more = await anext(chunks, None)
                    if more is None:
                        break
                    first += more
            except (httpx.HTTPError, _Busy) as exc:
                if upstream is not None:
                    await upstream.aclose()
                r.inflight -= 1
                self._attempt_failed(r, exc)
                self.metrics.retried.labels(r.region, r.name).inc()
                tried.add(r.name)
                route = None
                continue
            x.region, x.replica, x.status = r.region, r.name, upstream.status_code
            passthrough = {k: v for k, v in upstream.headers.items()
                           if k.lower() in ("content-type", "cache-control")}
            passthrough["x-chatscale-replica"] = r.name
            if streamed:
                return StreamingResponse(self._relay(x, r, upstream, first, chunks), upstream.status_code,
                                         headers=passthrough)
            try:
                data = first + b"".join([c async for c in chunks])
            finally:
                await upstream.aclose()
                r.inflight -= 1
            data = self._count_usage(x, data)
            await self._finish(x, r)
            return Response(data, upstream.status_code, headers=passthrough)
        raise Refused(503, "No replica could take the request.", "server_error", "replicas_failed",
                      {"retry-after": "1"})

    def _attempt_failed(self, r: ReplicaState, exc: Exception) -> None:
        if isinstance(exc, _Busy) and exc.retry_after is not None:
            self.fleet.cool(r, exc.retry_after)  # busy, not broken
        else:
            self.fleet.eject(r, f"http {exc.status}" if isinstance(exc, _Busy) else type(exc).__name__)

    async def _relay(self, x: Exchange, r: ReplicaState, upstream: httpx.Response, first: bytes, chunks):
        """Forward whole SSE events; a break mid-way becomes an error event and [DONE]."""
        buffer = first
        done = False
        try:
            while True:
                cut = buffer.rfind(b"\n\n")
                if cut >= 0:
                    events, buffer = buffer[:cut + 2], buffer[cut + 2:]
                    events = self._count_usage(x, events)
                    done = events.endswith(DONE)
                    if events:
                        yield events
                chunk = await anext(chunks, None)
                if chunk is None:
                    break
                buffer += chunk
            if not done:  # the replica closed the stream without finishing it
                raise httpx.RemoteProtocolError("stream ended before [DONE]")
        except httpx.HTTPError as exc:
            self.metrics.broken.labels(r.region, r.name).inc()
            self.fleet.eject(r, type(exc).__name__)
            x.status = 599
            yield error_event(f"The replica's stream broke: {exc}", "stream_broken") + DONE
        finally:
            await upstream.aclose()
            r.inflight -= 1
            await self._finish(x, r)

    def _count_usage(self, x: Exchange, data: bytes) -> bytes:
        """Read completion tokens from the replica's usage (a whole body, or a stream's usage chunk,
        which is dropped when only the gateway asked for it); returns what to forward."""
        if b'"completion_tokens"' not in data:
            return data
        kept = []
        for event in data.split(b"\n\n"):
            payload = event[6:] if event.startswith(b"data: {") else event if event.startswith(b"{") else None
            try:
                usage = json.loads(payload).get("usage") if payload else None
            except (ValueError, AttributeError):
                usage = None
            if usage and "completion_tokens" in usage:
                x.output_tokens = usage["completion_tokens"]
                if x.hide_usage and event.startswith(b"data: "):
                    continue
            kept.append(event)
        return b"\n\n".join(kept)

    async def _finish(self, x: Exchange, r: ReplicaState | None) -> None:
        """Once per request: settle TPM to what was used, free the concurrency slot, log, let the queue move."""
        used = x.prompt_tokens + x.output_tokens if r is not None else 0
        await self.limiter.settle(x.key.name, x.window, used - x.cost)
        await self.limiter.release(x.key.name, x.lease)
        if r is not None:
            log.info("request %s key=%s replica=%s status=%s tokens=%d+%d %.3fs", x.rid, x.key.name, r.name,
                     x.status, x.prompt_tokens, x.output_tokens, time.time() - x.started)
            if self.log_file is not None:
                self.log_file.write(json.dumps({
                    "timestamp": x.started, "request_id": x.rid, "key": x.key.name, "region": x.region,
                    "replica": x.replica, "status": x.status, "prompt_tokens": x.prompt_tokens,
                    "output_tokens": x.output_tokens, "conversation": x.route_req.chain[0] if x.route_req.chain
                    else None, "seconds": round(time.time() - x.started, 4)}) + "\n")
        self.pump()

    # ---- the rest of the API ----------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        if self.keys.lookup(request.headers.get("authorization")) is None:
            return Refused(401, "Invalid or missing API key.", "invalid_request_error", "invalid_api_key").response()
        for r in self.fleet.available():
            try:
                upstream = await self.client.get(f"{r.url}/v1/models", timeout=self.cfg.probe_timeout,
                                                 headers=self.fleet.auth(r))
            except httpx.HTTPError:
                continue
            if upstream.status_code == 200:
                return Response(upstream.content, 200, media_type="application/json")
        return no_replica().response()

    def health(self) -> JSONResponse:
        up = len(self.fleet.available())
        return JSONResponse({"status": "ok" if up else "unavailable", "replicas_up": up,
                             "replicas": len(self.fleet.replicas), "queued": self.admission.queued},
                            200 if up else 503)

    def metrics_text(self) -> Response:
        self.metrics.replicas(list(self.fleet.replicas.values()), self.fleet.clock(), self.admission.queued)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def run_background(self) -> None:
        async def tick() -> None:
            while True:
                await asyncio.sleep(QUEUE_TICK_S)
                self.pump()

        await asyncio.gather(self.fleet.run(after_probe=self.pump), tick(), self.limiter.run())

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.limiter.aclose()
        if self.affinity is not None:
            await self.affinity.aclose()
        if self.log_file is not None:
            self.log_file.close()


class _Busy(Exception):
    """A replica answered 5xx or 429 before any body: the attempt goes elsewhere."""

    def __init__(self, upstream: httpx.Response):
        super().__init__(f"http {upstream.status_code}")
        self.status = upstream.status_code
        ra = upstream.headers.get("retry-after", "")
        self.retry_after = float(ra) if upstream.status_code in (429, 503) and ra.replace(".", "", 1).isdigit() \
            else None


def create_app(cfg: FleetConfig, path: Path | None = None, redis_url: str | None = None,
               request_log: Path | None = None) -> FastAPI:
    gw = Gateway(cfg, path, redis_url, request_log)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.fleet.resolve_dns()
        await gw.fleet.probe_all()
        background = asyncio.create_task(gw.run_background())
        try:
            yield
        finally:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
            await gw.aclose()

    app = FastAPI(title="chatscale gateway", lifespan=lifespan)
    app.state.gateway = gw
    app.add_api_route("/v1/chat/completions", gw.generate, methods=["POST"])
    app.add_api_route("/v1/completions", gw.generate, methods=["POST"])
    app.add_api_route("/v1/models", gw.models, methods=["GET"])
    app.add_api_route("/health", gw.health, methods=["GET"])
    app.add_api_route("/metrics", gw.metrics_text, methods=["GET"])
    return app
