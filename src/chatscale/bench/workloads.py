"""What a serving benchmark sends, and when: arrival processes, datasets and request traces.

A workload is a list of sessions (one user's requests, turn after turn) and one start time per
session. Single-turn datasets are sessions of one turn, so one client loop serves every dataset.
Everything is drawn from a seeded generator and built before the run, so two servers measured with
the same arguments receive exactly the same prompts at exactly the same offsets.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from chatscale.traces import trace_path

# Common English words: prompts made of them tokenize at a steady, measurable tokens-per-word ratio.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what up out "
    "about into than them can only other new some could time these two may first then do any like my "
    "now over such our man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take three"
).split()


@dataclass(frozen=True)
class Turn:
    """One request of a session: `input_tokens` new user tokens, `output_tokens` to generate."""

    input_tokens: int
    output_tokens: int
    think_time: float = 0.0  # seconds the user reads and types after the previous answer
    text: str = ""  # the user message, filled by `with_text`


@dataclass(frozen=True)
class Session:
    """A user's conversation; each turn is sent with the whole history before it."""

    turns: tuple[Turn, ...]
    # Mooncake prefix-block ids: equal ids at the start of two sessions mean a shared prompt prefix.
    prefix_blocks: tuple[int, ...] = ()

    @property
    def num_requests(self) -> int:
        return len(self.turns)


@dataclass(frozen=True)
class TraceRecord:
    timestamp: float  # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces


# ---- arrivals ----------------------------------------------------------------------------------

def gamma_arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Start times of `n` requests at mean `rate` per second with gamma-distributed gaps.

    burstiness is the gamma shape: 1 is a Poisson process; below 1 requests come in bursts, above 1
    more evenly. The mean gap is 1/rate whatever the shape, so only the variability changes."""
    if rate <= 0 or math.isinf(rate):
        return [0.0] * n
    if burstiness <= 0:
        raise ValueError("burstiness (the gamma shape) must be positive")
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def trace_arrivals(records: list[TraceRecord], speedup: float = 1.0) -> list[float]:
    """The trace's own start times, compressed by `speedup` (2 = twice the request rate)."""
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    return [r.timestamp / speedup for r in records]


def trace_rate(records: list[TraceRecord]) -> float:
    """Mean request rate of a trace (requests per second over its span)."""
    span = records[-1].timestamp - records[0].timestamp if records else 0.0
    return (len(records) - 1) / span if span > 0 else math.inf


# ---- traces ------------------------------------------------------------------------------------

def _azure_time(text: str) -> float:
    """Azure's wall-clock stamps carry 7 fractional digits, one more than strptime's %f takes."""
    whole, _, frac = text.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + float(f"0.{frac or 0}")


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """Records of an Azure LLM (csv) or Mooncake (jsonl) trace, sorted, timestamps from zero.

    `path` is a file, or the name of a trace shipped with chatscale (chatscale.traces)."""
    path = trace_path(path)
    rows: list[TraceRecord] = []
    with path.open() as f:
        if path.suffix == ".csv":
            for row in csv.DictReader(f):
                rows.append(TraceRecord(_azure_time(row["TIMESTAMP"]), int(row["ContextTokens"]),
                                        int(row["GeneratedTokens"])))
                if limit is not None and len(rows) >= limit:
                    break
        elif path.suffix == ".jsonl":
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    rows.append(TraceRecord(d["timestamp"] / 1000.0, int(d["input_length"]),
                                            int(d["output_length"]), tuple(d.get("hash_ids", ()))))
                    if limit is not None and len(rows) >= limit:
                        break
        else:
            raise ValueError(f"{path}: unknown trace format (expected .csv from Azure or .jsonl from Mooncake)")
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r.timestamp)
    t0 = rows[0].timestamp
    return [replace(r, timestamp=r.timestamp - t0) for r in rows]


def scale_lengths(records: list[TraceRecord], scale: float, max_input: int | None = None,
                  max_output: int | None = None) -> list[TraceRecord]:
    """Shrink a trace's lengths by `scale`, keeping their ratios, then clip to what the model takes.

    A production trace asks thousands of tokens of a GPU model; a small CPU model serves the same
    shape of workload at a fraction of the length."""
    if scale <= 0:
        raise ValueError("length scale must be positive")

    def fit(n: int, cap: int | None) -> int:
        n = max(1, round(n * scale))
        return min(n, cap) if cap else n

    return [replace(r, input_tokens=fit(r.input_tokens, max_input), output_tokens=fit(r.output_tokens, max_output))
            for r in records]


# ---- datasets ----------------------------------------------------------------------------------

def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """Uniform in [mean(1-r), mean(1+r)], at least one token."""
    lo, hi = mean * (1 - range_ratio), mean * (1 + range_ratio)
    return max(1, round(rng.uniform(lo, hi)))


def random_sessions(n: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[Session]:
    """`n` independent single-turn requests with lengths around `input_len` and `output_len`."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range ratio must be in [0, 1)")
    rng = random.Random(seed)
    return [Session((Turn(_length(rng, input_len, range_ratio), _length(rng, output_len, range_ratio)),))
            for _ in range(n)]


def conversation_sessions(n_requests: int, turns: int, input_len: int, output_len: int,
                          range_ratio: float = 0.0, think_time: float = 0.0, seed: int = 0) -> list[Session]:
    """Multi-turn chats totalling `n_requests` requests; each later turn waits an exponential think
    time (mean `think_time` seconds) after the previous answer, as a person reading would."""
    if turns < 1:
        raise ValueError("a conversation has at least one turn")
    rng = random.Random(seed)
    sessions, left = [], n_requests
    while left > 0:
        k = min(turns, left)
        sessions.append(Session(tuple(
            Turn(_length(rng, input_len, range_ratio), _length(rng, output_len, range_ratio),
                 rng.expovariate(1.0 / think_time) if i and think_time > 0 else 0.0)
            for i in range(k))))
        left -= k
    return sessions


def trace_sessions(records: list[TraceRecord]) -> list[Session]:
    """One single-turn session per trace record, keeping its (scaled) lengths and prefix blocks."""
    return [Session((Turn(r.input_tokens, r.output_tokens),), r.hash_ids) for r in records]


# ---- prompt text -------------------------------------------------------------------------------

def calibration_text() -> tuple[str, int]:
    """A sample of prompt words and its word count: a tokenizer's count of it over the word count is
    the tokens-per-word ratio that sizes every prompt."""
    words = WORDS * 2
    return " ".join(words), len(words)


def words_for(n_tokens: int, tokens_per_word: float) -> int:
    return max(1, round(n_tokens / tokens_per_word))


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def with_text(sessions: list[Session], tokens_per_word: float, seed: int = 0,
              block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> list[Session]:
    """Fill every turn's user message with words, sized by the tokenizer's `tokens_per_word`.

    A session with prefix blocks starts its first message with one fixed text per block id, so
    sessions that share blocks in the trace share that prompt prefix here too (`block_tokens` is the
    trace's block size after length scaling)."""
    rng = random.Random(seed)
    block_words = words_for(block_tokens, tokens_per_word)
    out = []
    for s in sessions:
        turns = []
        for i, t in enumerate(s.turns):
            n = words_for(t.input_tokens, tokens_per_word)
            words: list[str] = []
            if i == 0:
                for block in s.prefix_blocks:
                    if len(words) >= n:
                        break
                    words += _words(random.Random(f"block-{block}"), block_words)
            words = words[:n]
            words += _words(rng, n - len(words))
            turns.append(replace(t, text=" ".join(words)))
        out.append(replace(s, turns=tuple(turns)))
    return out
