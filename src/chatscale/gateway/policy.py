"""Per-key policies, applied after authentication and before limits and admission.

block: 403. throttle: the key's RPM/TPM/concurrency scaled by `factor`. lower-priority: the key's
admission band moves `by` bands down. rewrite: a system message goes before the conversation
(before the prompt, for /v1/completions) — the famous "You are a cat." for abusive keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from chatscale.gateway.config import KeySpec
from chatscale.gateway.limits import Limits


@dataclass
class Applied:
    blocked: bool
    limits: Limits
    band: int
    body: dict


def _scaled(x: int | None, factor: float) -> int | None:
    return None if x is None else max(1, int(x * factor))


def apply(key: KeySpec, body: dict, band: int) -> Applied:
    """The key's policies over one request: whether it is blocked, its limits, its band and its body."""
    limits = Limits(key.rpm, key.tpm, key.concurrency)
    blocked = False
    for p in key.policies:
        if p.action == "block":
            blocked = True
        elif p.action == "throttle":
            limits = replace(limits, rpm=_scaled(limits.rpm, p.factor), tpm=_scaled(limits.tpm, p.factor),
                             concurrency=_scaled(limits.concurrency, p.factor))
        elif p.action == "lower-priority":
            band += p.by
        elif p.action == "rewrite":
            body = _prepend_system(body, p.system)
    return Applied(blocked, limits, band, body)


def _prepend_system(body: dict, system: str) -> dict:
    if "messages" in body:
        return {**body, "messages": [{"role": "system", "content": system}, *body["messages"]]}
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {**body, "prompt": f"{system}\n\n{prompt}"}
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return {**body, "prompt": [f"{system}\n\n{p}" for p in prompt]}
    return body  # token-id prompts: no text to put a system message in front of
