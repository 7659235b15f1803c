"""`chatscale top URL...`: a terminal view of one or several servers' load, refreshed every second.

Each server's /metrics is read once a second and turned into the same rows the /dashboard draws
(scrape.py): load, KV usage (live and cached), the batch, tokens/s, TTFT and ITL percentiles, the
prefix-cache hit rate, and arithmetic intensity against the ridge point. Any server with vLLM's
metric names (vllm:...) shows the columns it has.
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from chatscale.scrape import LoadRow, LoadWindow, Scrape

COLUMNS = ("server", "load", "KV live", "KV cached", "run", "wait", "seq/step", "tok/step", "gen tok/s",
           "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "hit rate", "FLOP/B", "ridge", "MFU", "MBU")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.1f}ms" if v < 1 else f"{v:.2f}s"


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def cells(r: LoadRow) -> list[str]:
    return [_num(r.load), _pct(r.kv_live), _pct(r.kv_cached), _num(r.running), _num(r.waiting),
            _num(r.batch_sequences), _num(r.batch_tokens), _num(r.tokens_per_s), _secs(r.ttft_p50),
            _secs(r.ttft_p99), _secs(r.itl_p50), _secs(r.itl_p99), _pct(r.hit_rate), _num(r.intensity),
            _num(r.ridge), _pct(r.mfu), _pct(r.mbu)]


def table(rows: dict[str, LoadRow | str]) -> Table:
    """One line per server: its latest row, or why it could not be read."""
    t = Table(title=f"chatscale top  {time.strftime('%H:%M:%S')}", title_justify="left")
    for i, name in enumerate(COLUMNS):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for url, row in rows.items():
        t.add_row(url, *(cells(row) if isinstance(row, LoadRow) else [f"[red]{row}[/red]"] + [""] * (len(COLUMNS) - 2)))
    return t


def watch(urls: list[str], interval: float = 1.0, iterations: int = 0, api_key: str | None = None,
          console: Console | None = None) -> None:
    """Refresh every `interval` seconds, `iterations` times (0: until Ctrl-C)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    windows = {url: LoadWindow() for url in urls}
    rows: dict[str, LoadRow | str] = dict.fromkeys(urls, "connecting")
    with httpx.Client(timeout=min(interval, 2.0), headers=headers) as client, \
            Live(table(rows), console=console, auto_refresh=False) as live:
        done = 0
        while not iterations or done < iterations:
            started = time.monotonic()
            for url in urls:
                try:
                    resp = client.get(url.rstrip("/") + "/metrics")
                    resp.raise_for_status()
                    rows[url] = windows[url].push(Scrape.from_text(resp.text))
                except (httpx.HTTPError, ValueError) as exc:
                    rows[url] = f"unreachable: {exc}"
            live.update(table(rows), refresh=True)
            done += 1
            if not iterations or done < iterations:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="live terminal view of servers' load (KV cache, batch, tokens/s, TTFT/ITL)")
    p.add_argument("urls", nargs="+", metavar="URL", help="server base URLs, e.g. http://127.0.0.1:8000")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--iterations", type=int, default=0, help="stop after this many refreshes (0: never)")
    p.add_argument("--api-key", default=os.environ.get("CHATSCALE_API_KEY"),
                   help="the servers' --api-key, if they have one (default: $CHATSCALE_API_KEY)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        watch(args.urls, args.interval, args.iterations, args.api_key)
    except KeyboardInterrupt:
        pass
    return 0
