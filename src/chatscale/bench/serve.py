"""The benchmark client: replays sessions against an OpenAI-compatible server over real HTTP.

Every request streams (SSE), so the client sees each chunk when the server sends it: that is what
TTFT and inter-token latency mean to a user. It speaks only the public API (plus `/tokenize`, which
vLLM, llama.cpp and chatscale all offer, to size prompts in the server's own tokens), so any
OpenAI-compatible server can be measured, and two servers compare on one workload.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator

import httpx

from chatscale.bench.stats import RequestRecord
from chatscale.bench.workloads import Session, calibration_text

# Typical English BPE ratio, used only when the server cannot tokenize for us.
ESTIMATED_TOKENS_PER_WORD = 1.3


class OpenAIClient:
    """Streams chat or text completions from one server and times every chunk."""

    def __init__(self, base_url: str, model: str | None = None, endpoint: str = "chat",
                 ignore_eos: bool = True, temperature: float = 0.0, timeout: float = 600.0,
                 api_key: str | None = None) -> None:
        if endpoint not in ("chat", "completions"):
            raise ValueError("endpoint is 'chat' or 'completions'")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.ignore_eos = ignore_eos
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No connection limit: the workload, not the HTTP pool, decides how many requests are in flight.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def first_model(self) -> str:
        """The first model the server lists: what a request without --model would be served by."""
        resp = await self.http.get(f"{self.base_url}/v1/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
        if not models:
            raise RuntimeError(f"{self.base_url}/v1/models lists no model")
        return models[0]["id"]

    async def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` by the server's tokenizer, or None where it offers no /tokenize.

        Tries vLLM's and chatscale's body (`prompt`), then llama.cpp's (`content`): each server
        rejects or ignores the other's field."""
        for body in ({"model": self.model, "prompt": text, "add_special_tokens": False}, {"content": text}):
            try:
                resp = await self.http.post(f"{self.base_url}/tokenize", json=body)
            except httpx.HTTPError:
                return None
            if resp.status_code == 200:
                data = resp.json()
                if isinstance(data.get("count"), int):
                    return data["count"]
                if isinstance(data.get("tokens"), list):
                    return len(data["tokens"])
        return None

    async def tokens_per_word(self) -> tuple[float, str]:
        """How many of the server's tokens one prompt word costs, and where the figure came from."""
        sample, words = calibration_text()
        n = await self.count_tokens(sample)
        if not n:
            return ESTIMATED_TOKENS_PER_WORD, "estimate"
        return n / words, "server"

    def _payload(self, messages: list[dict], max_tokens: int) -> dict:
        body: dict = {"model": self.model, "max_tokens": max_tokens, "temperature": self.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:  # vLLM, llama.cpp and chatscale accept it: answers get exactly max_tokens
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = "\n".join(m["content"] for m in messages)
        return body

    async def send(self, messages: list[dict], max_tokens: int, record: RequestRecord, t0: float) -> str:
        """Send one streamed request and fill `record` (times relative to `t0`); returns the answer.

        A failure never raises: it lands in `record.error` (by HTTP status, or the exception's name),
        so a benchmark under overload still reports what it saw."""
        url = f"{self.base_url}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"
        start = time.perf_counter()
        record.start = start - t0
        last = None
        pieces: list[str] = []
        try:
            async with self.http.stream("POST", url, json=self._payload(messages, max_tokens)) as resp:
                record.status = resp.status_code
                if resp.status_code != 200:
                    await resp.aread()
                    record.error = f"HTTP {resp.status_code}"
                    return ""
                async for line in resp.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else None
                    if not data:
                        continue
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = "stream error"
                        return "".join(pieces)
                    text = self._chunk_text(chunk)
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            record.ttft = now - start
                        else:
                            record.chunk_gaps.append(now - last)
                        last = now
                        pieces.append(text)
                    usage = chunk.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
                        record.output_tokens = usage.get("completion_tokens", 0)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            record.error = type(exc).__name__
            return "".join(pieces)
        record.latency = time.perf_counter() - start
        if not record.output_tokens:  # no usage reported: one token per chunk, as servers send them
            record.output_tokens = len(pieces)
        if not record.output_tokens:
            record.error = "no output"
        elif record.ttft is None:  # tokens without visible text (e.g. half a UTF-8 character): the
            record.ttft = record.latency  # user saw nothing before the end
        return "".join(pieces)

    def _chunk_text(self, chunk: dict) -> str | None:
        choices = chunk.get("choices") or []
        if not choices:
            return None
        if self.endpoint == "chat":
            return (choices[0].get("delta") or {}).get("content")
        return choices[0].get("text")


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            rate = self.done / max(1e-9, time.perf_counter() - self.t0)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"{rate:.2f} req/s, {self.failed} failed")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _estimate(messages: list[dict], tokens_per_word: float) -> int:
    return sum(round(len(m["content"].split()) * tokens_per_word) for m in messages)


async def _run_session(client: OpenAIClient, index: int, session: Session, records: list[RequestRecord],
                       t0: float, tokens_per_word: float, gate: asyncio.Semaphore | None,
                       progress: Progress) -> None:
    """One user: each turn after its think time, with the conversation so far as context."""
    history: list[dict] = []
    for i, turn in enumerate(session.turns):
        if i and turn.think_time > 0:
            await asyncio.sleep(turn.think_time)
        history.append({"role": "user", "content": turn.text})
        record = RequestRecord(index, i, 0.0, _estimate(history, tokens_per_word))
        records.append(record)
        if gate is None:
            answer = await client.send(history, turn.output_tokens, record, t0)
        else:
            async with gate:
                answer = await client.send(history, turn.output_tokens, record, t0)
        progress.update(record)
        if not record.ok:  # the user gives up on a conversation the server failed
            return
        history.append({"role": "assistant", "content": answer})


async def run_sessions(client: OpenAIClient, sessions: list[Session], tokens_per_word: float, *,
                       starts: list[float] | None = None, concurrency: int | None = None,
                       max_concurrency: int | None = None,
                       progress: bool | None = None) -> tuple[list[RequestRecord], float]:
    """Run the workload; returns the request records and the run's duration in seconds.

    Closed loop (`concurrency` users, `starts` None): each user starts its next session as soon as
    its last one ends, so the load is exactly `concurrency`. Open loop (`starts`): session i begins
    at starts[i] seconds whatever the server's state, as real users arrive; `max_concurrency` caps
    the requests in flight (the rest wait in the client)."""
    if (starts is None) == (concurrency is None):
        raise ValueError("give either start times (open loop) or a concurrency (closed loop)")
    records: list[RequestRecord] = []
    bar = Progress(sum(s.num_requests for s in sessions), progress)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()
    if starts is not None:
        async def delayed(i: int, s: Session, at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            await _run_session(client, i, s, records, t0, tokens_per_word, gate, bar)

        await asyncio.gather(*(delayed(i, s, at) for i, (s, at) in enumerate(zip(sessions, starts))))
    else:
        queue: Iterator[tuple[int, Session]] = iter(enumerate(sessions))

        async def user() -> None:
            for i, s in queue:  # the shared iterator hands each session to exactly one user
                await _run_session(client, i, s, records, t0, tokens_per_word, None, bar)

        await asyncio.gather(*(user() for _ in range(max(1, concurrency))))
    duration = time.perf_counter() - t0
    return sorted(records, key=lambda r: (r.start, r.session)), duration

