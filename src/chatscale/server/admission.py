"""Admission by sequences, not HTTP requests: `{"prompt": [...3 prompts], "n": 4}` is twelve
sequences in the engine, and counts as twelve against `--max-concurrent-sequences`.

A request asking for more than `--max-sequences-per-request` (or more than the whole server takes)
is a 400 at once: it could monopolise the engine, or never be admitted. One that fits the cap but
not the free slots is a 429 with Retry-After. The middleware gives a request's slots back when its
response has ended (the last streamed byte, or a disconnect), however the handler ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatscale.server.errors import APIError


@dataclass
class SequenceSlots:
    """The server's sequences in flight (queued or running), against its limit."""

    limit: int
    per_request: int
    held: int = 0

    def check(self, prompts: int, n: int) -> None:
        """400 for a request that asks for more sequences than one request may."""
        count, cap = prompts * n, min(self.per_request, self.limit)
        if count > cap:
            shape = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
            raise APIError(400, f"This request asks for {count} sequences ({shape}); this server takes at most "
                                f"{cap} per request.", param="n" if n > 1 else "prompt")

    def take(self, count: int) -> None:
        if self.held + count > self.limit:
            raise APIError(429, f"This server is at capacity ({self.limit} concurrent sequences); retry shortly.",
                           "requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.held += count


@dataclass
class Hold:
    """What one HTTP request holds of the slots: taken by its handler, given back by the middleware."""

    slots: SequenceSlots
    count: int = 0

    def take(self, prompts: int, n: int) -> None:
        self.slots.check(prompts, n)
        self.slots.take(prompts * n)
        self.count += prompts * n

    def release(self) -> None:
        self.slots.held -= self.count
        self.count = 0
