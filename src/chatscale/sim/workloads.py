"""Request streams for the simulator: production traces, synthetic multi-region days with users in
conversations, and logs recorded by chatscale's gateway.

A workload is a few numpy columns, one row per request, sorted by arrival, so that ten million
requests fit in memory and load in seconds. Prefix reuse is explicit: `conv` names the
conversation (or shared-prefix family) a request belongs to and `prefix` how many of its prompt
tokens repeat an earlier request of it (turn N+1 repeats turn N's prompt and answer). Mooncake's
`hash_ids` are kept as they are, per request, so the step-level twin sees the trace's real pages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from chatscale.bench.workloads import MOONCAKE_BLOCK_TOKENS as MOONCAKE_BLOCK
from chatscale.bench.workloads import load_trace

# Regions with the UTC offset their users live in; the weights are each region's share of peak load.
DEFAULT_REGIONS: dict[str, tuple[float, float]] = {
    "us-east": (-5, 1.0), "us-west": (-8, 0.6), "eu-west": (1, 0.9), "ap-japan": (9, 0.7), "ap-india": (5.5, 0.5),
}


@dataclass
class Workload:
    """Columns of equal length, sorted by `arrival` (seconds from the start)."""

    arrival: np.ndarray  # float64 s
    prompt: np.ndarray  # int64 prompt tokens
    output: np.ndarray  # int64 tokens to generate
    conv: np.ndarray  # int64 conversation / prefix family; unique per request when nothing is shared
    prefix: np.ndarray  # int64 leading prompt tokens shared with an earlier request of the same conv
    region: np.ndarray  # int16 index into `regions`
    regions: list[str] = field(default_factory=lambda: ["local"])
    hash_ids: list[list[int]] | None = None  # Mooncake: one list of prefix-block ids per request
    hash_block: int = MOONCAKE_BLOCK  # tokens per hash id (after scaling)
    name: str = "workload"

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def duration(self) -> float:
        return float(self.arrival[-1] - self.arrival[0]) if len(self) else 0.0

    def take(self, index: np.ndarray | slice) -> Workload:
        hashes = None if self.hash_ids is None else [self.hash_ids[i] for i in np.arange(len(self))[index]]
        return replace(self, arrival=self.arrival[index], prompt=self.prompt[index], output=self.output[index],
                       conv=self.conv[index], prefix=self.prefix[index], region=self.region[index],
                       hash_ids=hashes)

    def first(self, n: int) -> Workload:
        return self.take(slice(0, n))

    def window(self, start: float, seconds: float) -> Workload:
        """Requests arriving in [start, start + seconds), re-timed to start at zero."""
        w = self.take((self.arrival >= start) & (self.arrival < start + seconds))
        w.arrival = w.arrival - start
        return w

    def scaled(self, *, rate: float = 1.0, length: float = 1.0, max_prompt: int | None = None,
               max_output: int | None = None) -> Workload:
        """The same arrival pattern `rate` times faster and token counts times `length` (ratios
        kept), so a production trace fits a small model on a small machine."""
        prompt = np.maximum(1, np.round(self.prompt * length)).astype(np.int64)
        output = np.maximum(1, np.round(self.output * length)).astype(np.int64)
        if max_prompt is not None:
            prompt = np.minimum(prompt, max_prompt)
        if max_output is not None:
            output = np.minimum(output, max_output)
        prefix = np.minimum(np.round(self.prefix * length).astype(np.int64), prompt - 1)
        block = max(1, round(self.hash_block * length))
        return replace(self, arrival=self.arrival / rate, prompt=prompt, output=output,
                       prefix=np.maximum(prefix, 0), hash_block=block)


def _columns(arrival, prompt, output, conv=None, prefix=None, region=None, **kw) -> Workload:
    arrival = np.asarray(arrival, dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    n = len(arrival)
    conv = np.arange(n) if conv is None else np.asarray(conv)
    prefix = np.zeros(n, np.int64) if prefix is None else np.asarray(prefix)
    region = np.zeros(n, np.int16) if region is None else np.asarray(region)
    hashes = kw.pop("hash_ids", None)
    w = Workload(arrival=arrival[order], prompt=np.asarray(prompt, np.int64)[order],
                 output=np.maximum(1, np.asarray(output, np.int64))[order], conv=conv.astype(np.int64)[order],
                 prefix=prefix.astype(np.int64)[order], region=region.astype(np.int16)[order],
                 hash_ids=None if hashes is None else [hashes[i] for i in order], **kw)
    w.arrival -= w.arrival[0] if n else 0.0
    return w


# ---- traces -------------------------------------------------------------------------------------

def azure(kind: str = "conv", path: Path | None = None) -> Workload:
    """Azure LLM inference trace 2023 (`code` or `conv`): arrivals and token counts, no prefixes."""
    rows = load_trace(path or f"azure_llm_2023_{kind}.csv")
    return _columns([r.timestamp for r in rows], [r.input_tokens for r in rows], [r.output_tokens for r in rows],
                    name=f"azure-{kind}")


def mooncake(path: Path | None = None) -> Workload:
    """Mooncake FAST'25 conversation trace: requests whose `hash_ids` name 512-token prefix blocks.

    Requests sharing a first block form one prefix family (`conv`); `prefix` counts the blocks a
    request shares with the longest earlier request of the trace (what an unbounded cache would hit).
    """
    rows = load_trace(path or "mooncake_conversation.jsonl")
    seen: set[int] = set()
    prefix = []
    for r in rows:
        shared = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            shared += 1
        seen.update(r.hash_ids)
        prefix.append(min(shared * MOONCAKE_BLOCK, r.input_tokens - 1))
    return _columns([r.timestamp for r in rows], [r.input_tokens for r in rows], [r.output_tokens for r in rows],
                    conv=[r.hash_ids[0] for r in rows], prefix=prefix, hash_ids=[list(r.hash_ids) for r in rows],
                    name="mooncake")


def gateway_log(path: Path) -> Workload:
    """A request log written by chatscale's gateway: JSON lines of
    `{"timestamp": unix s, "prompt_tokens", "output_tokens", "key", "region", "conversation"?,
    "cached_tokens"?}` (the gateway's --request-log writes these, the first prefix hash as the
    conversation, null when none). A conversation's later turns share the prompt of its earlier ones."""
    rows = sorted((json.loads(line) for line in Path(path).open() if line.strip()), key=lambda r: r["timestamp"])
    regions = sorted({r.get("region", "local") for r in rows})
    convs: dict[str, int] = {}
    last: dict[int, int] = {}
    conv, prefix = [], []
    for i, r in enumerate(rows):
        thread = r.get("conversation")
        c = convs.setdefault(f'{r.get("key", "")}/{thread if thread is not None else f"#{i}"}', len(convs))
        conv.append(c)
        prefix.append(min(last.get(c, 0), r["prompt_tokens"] - 1))
        last[c] = r["prompt_tokens"] + r["output_tokens"]
    return _columns([r["timestamp"] for r in rows], [r["prompt_tokens"] for r in rows],
                    [r["output_tokens"] for r in rows], conv=conv, prefix=prefix,
                    region=[regions.index(r.get("region", "local")) for r in rows], regions=regions,
                    name=Path(path).stem)


# ---- synthetic ----------------------------------------------------------------------------------

def poisson(rate: float, seconds: float, prompt: tuple[int, int], output: tuple[int, int],
            seed: int = 0) -> Workload:
    """Independent requests at `rate`/s with uniform prompt and output lengths in [lo, hi]."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * seconds)
    t = np.sort(rng.uniform(0, seconds, n))
    return _columns(t, rng.integers(prompt[0], prompt[1] + 1, n), rng.integers(output[0], output[1] + 1, n),
                    name=f"poisson-{rate:g}")


def diurnal_rate(local_hour: np.ndarray, spike: float = 0.0) -> np.ndarray:
    """Relative load at a local hour: a night trough at 4h, a broad day, an evening peak near 21h;
    `spike` adds a sharp morning rush at 8-9h (Japan waking up)."""
    day = 0.15 + 0.85 * np.clip(np.sin(np.pi * (local_hour - 6) / 17), 0, None) ** 1.5
    rush = spike * np.exp(-0.5 * ((local_hour - 8.5) / 0.35) ** 2)
    return np.where((local_hour >= 6) & (local_hour <= 23), day, 0.15) + rush


@dataclass
class Users:
    """How people chat: turns per conversation, think time between turns, message lengths."""

    mean_turns: float = 4.0
    think_s: float = 30.0
    system_tokens: int = 200
    message_tokens: tuple[float, float] = (4.0, 0.8)  # lognormal mu, sigma of a user message
    answer_tokens: tuple[float, float] = (5.0, 0.7)  # lognormal of an answer
    max_context: int = 8192


def conversations(rate: float, seconds: float, *, start_hour_utc: float = 0.0,
                  regions: dict[str, tuple[float, float]] | None = None, spike: dict[str, float] | None = None,
                  users: Users = Users(), seed: int = 0) -> Workload:
    """A multi-region stretch of a day: per region a diurnal load by its time zone; each new
    conversation has a geometric number of turns, each after a think time, each prompt repeating
    the conversation so far. `rate` is the mean request rate over the whole fleet at full load.

    Later turns are timed from the previous turn's arrival plus think time (open loop): the answer's
    own duration is part of the think time, which keeps generation vectorised.
    """
    rng = np.random.default_rng(seed)
    regions = regions or DEFAULT_REGIONS
    spike = spike or {}
    names = list(regions)
    weights = np.array([w for _, w in regions.values()])
    starts_per_s = rate / users.mean_turns * weights / weights.sum()
    seconds_grid = np.arange(int(np.ceil(seconds)))
    t0, region, turns = [], [], []
    for r, (name, (tz, _)) in enumerate(regions.items()):
        local = (start_hour_utc + tz + seconds_grid / 3600) % 24
        lam = starts_per_s[r] * diurnal_rate(local, spike.get(name, 0.0))
        counts = rng.poisson(lam)
        ts = np.repeat(seconds_grid, counts) + rng.random(counts.sum())
        t0.append(ts)
        region.append(np.full(len(ts), r, np.int16))
        turns.append(rng.geometric(1 / users.mean_turns, len(ts)))
    t0, region, turns = np.concatenate(t0), np.concatenate(region), np.concatenate(turns)
    n = int(turns.sum())
    conv = np.repeat(np.arange(len(t0)), turns)
    first = np.r_[0, np.cumsum(turns)[:-1]]
    turn = np.arange(n) - np.repeat(first, turns)
    gaps = np.where(turn == 0, 0.0, rng.exponential(users.think_s, n))
    arrival = np.repeat(t0, turns) + _segment_cumsum(gaps, first)
    msg = np.maximum(1, rng.lognormal(*users.message_tokens, n)).astype(np.int64)
    msg[turn == 0] += users.system_tokens
    answer = np.maximum(1, rng.lognormal(*users.answer_tokens, n)).astype(np.int64)
    grown = _segment_cumsum((msg + answer).astype(np.float64), first).astype(np.int64)
    prompt = grown - answer  # everything so far plus this turn's message
    prefix = np.where(turn == 0, 0, prompt - msg)
    keep = (arrival < seconds) & (grown <= users.max_context)
    return _columns(arrival[keep], prompt[keep], answer[keep], conv=conv[keep], prefix=prefix[keep],
                    region=np.repeat(region, turns)[keep], regions=names, name="conversations")


def _segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each index in `starts`."""
    total = np.cumsum(values)
    offset = np.repeat(total[starts] - values[starts], np.diff(np.r_[starts, len(values)]))
    return total - offset
