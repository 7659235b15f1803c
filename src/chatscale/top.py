"""`chatscale top URL...`: a terminal view of one or several servers' load, refreshed every second.

Each server's /metrics is read once a second and turned into the same rows the /dashboard draws
(scrape.py), in three tables that fit 100 columns: load (KV usage live and cached, the batch,
tokens/s), pain (TTFT and ITL percentiles, the prefix-cache hit rate, preemptions) and efficiency
(arithmetic intensity against the ridge point, MFU, MBU). Any server with vLLM's
metric names (vllm:...) shows the columns it has.
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from chatscale.scrape import LoadRow, LoadWindow, Scrape

# Three tables, the three things worth watching (docs/architecture.md, lesson 3), so that each fits a
# 100-column terminal: how loaded a server is, how its users feel, how well it uses the chip.
LOAD = ("server", "load", "KV live", "KV cached", "run", "wait", "seq/step", "tok/step", "gen tok/s")
PAIN = ("server", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "hit rate", "preempt/s")
EFFICIENCY = ("server", "FLOP/B", "ridge", "MFU", "MBU", "busy")
TABLES = (("load", LOAD), ("pain", PAIN), ("efficiency", EFFICIENCY))
SERVER_WIDTH = 28  # longer host names are cut, so that the widest table stays within 100 columns


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


def cells(r: LoadRow) -> dict[str, str]:
    return {"load": _num(r.load), "KV live": _pct(r.kv_live), "KV cached": _pct(r.kv_cached),
            "run": _num(r.running), "wait": _num(r.waiting), "seq/step": _num(r.batch_sequences),
            "tok/step": _num(r.batch_tokens), "gen tok/s": _num(r.tokens_per_s), "TTFT p50": _secs(r.ttft_p50),
            "TTFT p99": _secs(r.ttft_p99), "ITL p50": _secs(r.itl_p50), "ITL p99": _secs(r.itl_p99),
            "hit rate": _pct(r.hit_rate), "preempt/s": _num(r.preemptions_per_s), "FLOP/B": _num(r.intensity),
            "ridge": _num(r.ridge), "MFU": _pct(r.mfu), "MBU": _pct(r.mbu), "busy": _pct(r.busy)}


def server_name(url: str) -> str:
    """host:port, without the scheme that every row would repeat."""
    return url.split("://", 1)[-1].rstrip("/")


def screen(rows: dict[str, LoadRow | str]) -> Group:
    """The load, pain and efficiency tables, a row per readable server; then why others are not."""
    parts: list = [Text(f"chatscale top  {time.strftime('%H:%M:%S')}", style="bold")]
    readable = {url: cells(row) for url, row in rows.items() if isinstance(row, LoadRow)}
    for title, columns in TABLES:
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
        t.add_column(columns[0], max_width=SERVER_WIDTH, no_wrap=True, overflow="ellipsis")
        for name in columns[1:]:
            t.add_column(name, justify="right", no_wrap=True)
        for url, values in readable.items():
            t.add_row(server_name(url), *(values[c] for c in columns[1:]))
        parts.append(t)
    parts += [Text(f"{server_name(url)}: {row}", style="red") for url, row in rows.items() if isinstance(row, str)]
    return Group(*parts)


def watch(urls: list[str], interval: float = 1.0, iterations: int = 0, api_key: str | None = None,
          console: Console | None = None) -> None:
    """Refresh every `interval` seconds, `iterations` times (0: until Ctrl-C)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    windows = {url: LoadWindow() for url in urls}
    rows: dict[str, LoadRow | str] = dict.fromkeys(urls, "connecting")
    with httpx.Client(timeout=min(interval, 2.0), headers=headers) as client, \
            Live(screen(rows), console=console, auto_refresh=False) as live:
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
            live.update(screen(rows), refresh=True)
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
