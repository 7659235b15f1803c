"""fleet.yaml: regions and their replicas, the routing policy, admission, keys and their limits and policies.

Read whole on start and again whenever the file changes (fleet.py watches it); a reload that fails
to parse keeps the previous config. deploy/fleet.yaml is a commented example.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chatscale.gateway.admission import SaturationLimits
from chatscale.gateway.routing import AffinityWeights


def hash_key(secret: str) -> str:
    """What fleet.yaml stores for an API key: its SHA-256, so the file leaks no usable key."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class ReplicaSpec:
    name: str
    url: str
    region: str
    weight: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)
    # The replica's own key (`chatscale serve --api-key`), sent as `Authorization: Bearer` with every
    # request and probe; `api_key_env` names an environment variable holding it, to keep it out of the file.
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None


@dataclass
class DNSSpec:
    """Replicas behind one DNS name (a Kubernetes headless service): one per address it resolves to."""

    host: str
    port: int
    region: str
    scheme: str = "http"
    weight: float = 1.0
    api_key: str | None = field(default=None, repr=False)  # as ReplicaSpec's, for every address
    api_key_env: str | None = None


def _resolve_key(spec: ReplicaSpec | DNSSpec) -> None:
    """Read `api_key_env` into `api_key` now, so a missing variable fails the (re)load, not a request."""
    if spec.api_key is not None and spec.api_key_env is not None:
        raise ValueError("give a replica one of api_key and api_key_env, not both")
    if spec.api_key_env is not None:
        spec.api_key = os.environ.get(spec.api_key_env)
        if spec.api_key is None:
            raise ValueError(f"the environment variable {spec.api_key_env} (a replica's api_key_env) is not set")


@dataclass
class KeyPolicy:
    """block | throttle (scale the key's limits by `factor`) | lower-priority (by `by` bands) | rewrite."""

    action: str
    factor: float = 0.1
    by: int = 1
    system: str = "You are a cat. Respond to the following query in the voice of a cat."


@dataclass
class KeySpec:
    name: str
    sha256: str
    rpm: int | None = None  # None: unlimited
    tpm: int | None = None
    concurrency: int | None = None
    priority: int = 1  # admission band: 0 first
    priority_header: bool = False  # may the client pick its band with `x-priority`?
    weight: float = 1.0  # fair-share weight within its band
    policies: list[KeyPolicy] = field(default_factory=list)


@dataclass
class AdmissionSpec:
    bands: int = 3
    max_queue: int = 256  # per band
    max_wait: float = 30.0  # seconds in the gateway's queue before a 429
    saturation: SaturationLimits = field(default_factory=SaturationLimits)


@dataclass
class FleetConfig:
    replicas: list[ReplicaSpec] = field(default_factory=list)
    dns: list[DNSSpec] = field(default_factory=list)
    policy: str = "cache-affinity"
    weights: AffinityWeights = field(default_factory=AffinityWeights)
    tokenizer: str | None = None  # a tokenizer.json: prefix hashes over token ids instead of text
    block_size: int = 16  # tokens per prefix block (the replicas' KV page size), or ...
    block_chars: int = 64  # ... characters per block when hashing text
    prefix_memory: int = 200_000  # prefix blocks remembered
    scrape_interval: float = 1.0
    probe_timeout: float = 2.0
    max_backoff: float = 30.0  # an ejected replica is probed again after 1, 2, 4, ... up to this many s
    max_retries: int = 2  # re-routes of an attempt that failed before its first byte
    connect_timeout: float = 2.0
    default_max_tokens: int = 256  # reserved against TPM when a request names no max_tokens
    max_body_bytes: int = 8 * 2**20  # a larger request body is a 413 (as the server's --max-body-bytes)
    body_timeout: float = 30.0  # seconds a client gets to send its whole request body; slower: 408
    admission: AdmissionSpec = field(default_factory=AdmissionSpec)
    keys: list[KeySpec] = field(default_factory=list)
    redis_url: str | None = None
    concurrency_lease: float = 10.0  # with Redis: seconds a dead gateway's concurrency slots outlive it


def _build(cls, raw: dict | None, **nested):
    raw = dict(raw or {})
    known = set(cls.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    for name, build in nested.items():
        if name in raw:
            raw[name] = build(raw[name])
    return cls(**raw)


POLICY_ACTIONS = ("block", "throttle", "lower-priority", "rewrite")


def _policy(raw: str | dict) -> KeyPolicy:
    p = KeyPolicy(raw) if isinstance(raw, str) else _build(KeyPolicy, raw)
    if p.action not in POLICY_ACTIONS:
        raise ValueError(f"unknown key policy {p.action!r}; known: {', '.join(POLICY_ACTIONS)}")
    return p


def parse(raw: dict) -> FleetConfig:
    raw = dict(raw or {})
    replicas, dns = [], []
    for region, body in (raw.pop("regions", None) or {}).items():
        for i, r in enumerate((body or {}).get("replicas", [])):
            r = {"url": r} if isinstance(r, str) else dict(r)
            r.setdefault("name", f"{region}-{i}")
            replicas.append(_build(ReplicaSpec, {**r, "region": region}))
        for d in (body or {}).get("dns", []):
            dns.append(_build(DNSSpec, {**d, "region": region}))
    for spec in [*replicas, *dns]:
        _resolve_key(spec)
    cfg = _build(FleetConfig, raw, weights=lambda w: _build(AffinityWeights, w),
                 admission=lambda a: _build(AdmissionSpec, a, saturation=lambda s: _build(SaturationLimits, s)),
                 keys=lambda ks: [_build(KeySpec, k, policies=lambda ps: [_policy(p) for p in ps]) for k in ks])
    cfg.replicas, cfg.dns = replicas, dns
    names = [r.name for r in replicas]
    if len(set(names)) != len(names):
        raise ValueError("replica names must be unique")
    return cfg


def load(path: str | Path) -> FleetConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    return parse(raw or {})
