"""What a simulation (or a real engine run) produced, per request, and its summary figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Slo:
    """A request is good when its first token and its pace both meet these (seconds)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1


@dataclass
class RequestLog:
    """Per-request columns; times in seconds of the simulated (or wall) clock, NaN when never
    reached (a rejected request has no first token)."""

    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    output: np.ndarray  # tokens generated
    prompt: np.ndarray
    cached: np.ndarray  # prompt tokens served from the prefix cache
    rejected: np.ndarray  # bool: turned away by admission control (or never fit)
    replica: np.ndarray  # which replica served it; -1 when none

    @classmethod
    def empty(cls, n: int) -> RequestLog:
        nan = lambda: np.full(n, np.nan)  # noqa: E731
        zeros = lambda: np.zeros(n, np.int64)  # noqa: E731
        return cls(np.zeros(n), nan(), nan(), zeros(), zeros(), zeros(), np.zeros(n, bool), np.full(n, -1))

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> np.ndarray:
        """Mean time per output token after the first (NaN for one-token answers)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.output > 1, (self.finish - self.first_token) / (self.output - 1), np.nan)

    @property
    def e2e(self) -> np.ndarray:
        return self.finish - self.arrival

    def summary(self, slo: Slo = Slo()) -> dict:
        done = ~np.isnan(self.finish)
        span = (np.nanmax(self.finish) - self.arrival.min()) if done.any() else 0.0
        tpot = self.tpot
        good = done & (self.ttft <= slo.ttft_s) & ~(tpot > slo.tpot_s)
        out = {"requests": int(len(self.arrival)), "completed": int(done.sum()),
               "rejection_rate": float(self.rejected.mean()) if len(self.rejected) else 0.0,
               "throughput_tok_s": float(self.output[done].sum() / span) if span else 0.0,
               "requests_per_s": float(done.sum() / span) if span else 0.0,
               "goodput_req_s": float(good.sum() / span) if span else 0.0,
               "slo_attainment": float(good.sum() / max(1, len(self.arrival))),
               "cache_hit_rate": float(self.cached[done].sum() / max(1, self.prompt[done].sum())),
               "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}}
        for name, values in (("ttft", self.ttft), ("tpot", tpot), ("e2e", self.e2e)):
            v = values[~np.isnan(values)]
            out[name] = {f"p{q}": float(np.percentile(v, q)) if len(v) else None for q in (50, 90, 99)}
        return out


@dataclass
class Timeline:
    """Per-replica samples over time: KV-cache usage (fraction of pages held) and running batch."""

    time: list[float] = field(default_factory=list)
    kv_usage: list[list[float]] = field(default_factory=list)  # [sample][replica]
    batch: list[list[int]] = field(default_factory=list)
    waiting: list[list[int]] = field(default_factory=list)

    def add(self, t: float, kv: list[float], batch: list[int], waiting: list[int]) -> None:
        self.time.append(t)
        self.kv_usage.append(kv)
        self.batch.append(batch)
        self.waiting.append(waiting)

    def as_dict(self) -> dict:
        return {"time": self.time, "kv_usage": self.kv_usage, "batch": self.batch, "waiting": self.waiting}


@dataclass
class ReplicaStats:
    """One replica's share of a fleet run: an imbalance (idle replicas beside a deep queue) shows here."""

    replica: int
    region: str
    served: int  # requests it served
    peak_queue: int  # the most requests that waited at it at once


def replica_stats(log: RequestLog, peak_waiting: list[int], regions: list[str]) -> list[ReplicaStats]:
    """Per replica (`regions[r]` is replica r's region): requests served and its peak queue."""
    served = np.bincount(log.replica[log.replica >= 0], minlength=len(peak_waiting))
    return [ReplicaStats(r, regions[r], int(served[r]), int(peak_waiting[r])) for r in range(len(peak_waiting))]
