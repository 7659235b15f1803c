"""What one benchmark run measured: per-request timings in, the serving report out.

The metrics are the ones users feel and operators plan with (vLLM's `benchmark_serving` names):
TTFT (time to first token), TPOT (time per output token after the first), ITL (gaps between
streamed chunks), end-to-end latency, throughput, and goodput: the rate of requests that met both
the TTFT and the TPOT objective, which is what a fleet actually sells.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds since the benchmark began."""

    session: int
    turn: int
    start: float
    prompt_tokens: int  # the server's count when it reports usage, else the client's estimate
    ttft: float | None = None  # until the first chunk with text
    latency: float | None = None  # until the last byte
    output_tokens: int = 0
    chunk_gaps: list[float] = field(default_factory=list)  # inter-chunk latencies after the first
    status: int | None = None
    error: str | None = None  # None: succeeded

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Decode time per token after the first; None for one-token answers."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds; None when nothing was measured."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=float) * 1000.0
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def summarize(records: list[RequestRecord], duration: float, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict:
    """The run's report: throughputs over `duration` seconds, latency distributions of the
    successful requests, goodput under the two SLOs, and failures counted by status."""
    ok = [r for r in records if r.ok]
    good = [r for r in ok if r.ttft is not None and r.ttft * 1000 <= slo_ttft_ms
            and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.error for r in records if not r.ok)),
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.chunk_gaps]),
        "e2e_ms": distribution_ms([r.latency for r in ok if r.latency is not None]),
        "goodput": {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
                    "requests_per_s": per_s(len(good)),
                    "fraction": len(good) / len(records) if records else 0.0},
    }


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_report(report: dict) -> str:
    """The report as a plain-text table for the terminal."""
    r = report
    lines = [
        f"requests            {r['completed']} ok, {r['failed']} failed in {r['duration_s']:.2f} s",
        f"errors              {', '.join(f'{k}: {v}' for k, v in r['errors'].items()) or 'none'}",
        f"request throughput  {_num(r['request_throughput'], 2)} req/s",
        f"output throughput   {_num(r['output_throughput'])} tok/s",
        f"total throughput    {_num(r['total_token_throughput'])} tok/s "
        f"({r['input_tokens']} in, {r['output_tokens']} out)",
        f"goodput             {_num(r['goodput']['requests_per_s'], 2)} req/s "
        f"({r['goodput']['fraction']:.0%} within TTFT <= {r['goodput']['slo_ttft_ms']:g} ms, "
        f"TPOT <= {r['goodput']['slo_tpot_ms']:g} ms)",
        "",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "end-to-end")):
        d = r[key]
        lines.append(f"{name:<14}" + "".join(f"{_num(d[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)
