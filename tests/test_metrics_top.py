"""`chatscale top` against a real server under load and a dead address, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import httpx
from server_utils import MODEL, api, free_port, make_engine, running
from test_dashboard import keep_busy

from chatscale.top import TABLES, server_name

WIDTH = 100  # the terminal the tables must fit


def cells(line: str) -> list[str]:
    """The cells of one line of a table: columns are two or more spaces apart."""
    return re.split(r"\s{2,}", line.strip())


def read_tables(lines: list[str], server: str) -> dict[str, str]:
    """Every cell of `server`'s rows in the load, pain and efficiency tables, by column name."""
    row: dict[str, str] = {}
    for _, columns in TABLES:
        header = next(i for i, line in enumerate(lines) if cells(line) == list(columns))
        values = next(line for line in lines[header:] if line.strip().startswith(server))
        row.update(zip(columns, cells(values)))
    return row


def test_top_reads_each_server_and_says_which_cannot_be_read(checkpoint):
    engine = make_engine(checkpoint("llama"), num_blocks=256)
    stop = threading.Event()
    try:
        with running(api(engine)) as url:
            body = {"model": MODEL, "prompt": list(range(5, 53)), "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            httpx.post(url + "/v1/completions", json=body, timeout=60).raise_for_status()
            cached = engine.snapshot.num_cached_free_blocks  # the 48-token prompt's 3 full pages
            load = threading.Thread(target=keep_busy, args=(url, stop), daemon=True)
            load.start()
            dead = f"http://127.0.0.1:{free_port()}"
            try:
                out = subprocess.run([sys.executable, "-m", "chatscale.cli", "top", url, dead, "--iterations", "3",
                                      "--interval", "0.5"], capture_output=True, text=True, timeout=120,
                                     env={**os.environ, "COLUMNS": str(WIDTH)})
            finally:
                stop.set()
                load.join(60)
    finally:
        engine.shutdown()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= WIDTH and "…" not in out.stdout, out.stdout
    row = read_tables(lines, server_name(url))
    # The first prompt's pages stay cached (nothing else shares them, 256 pages leave no need to evict).
    assert cached == 3 and float(row["KV cached"].rstrip("%")) >= round(100 * cached / 256, 1)
    assert float(row["gen tok/s"]) > 0 and float(row["seq/step"]) >= 1 and float(row["ridge"]) > 0
    assert row["TTFT p50"].endswith(("ms", "s")) and 0 < float(row["FLOP/B"])
    assert "unreachable" in next(line for line in lines if server_name(dead) in line)
