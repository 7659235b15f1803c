"""/dashboard in a real browser (Debian chromium driven by Playwright) on a real server: every chart
is drawn with labelled axes, an idle stretch is marked as idle, and under load the lines move and the
numbers leave zero.

The charts are uPlot canvases; each chart's axis tick labels, as uPlot draws them (the page's own
formatters return them to uPlot), are also written into the chart's text description, which is what
screen readers and this test read.
"""

from __future__ import annotations

import re
import shutil
import threading

import httpx
import pytest
from server_utils import MODEL, api, make_engine, running
from test_chat_page import CHROMIUM, CHROMIUM_ARGS, playwright_api

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="needs Debian chromium (apt-get install chromium; see .ci/run)")
CLOCK = r"\d\d:\d\d(:\d\d)?"


def value(page, series: str) -> str:
    return page.inner_text(f'.value[data-series="{series}"]')


def points(page, chart: str) -> int:
    """Measured points (not null) of a chart's first series, as uPlot holds them."""
    return page.evaluate(f"CHARTS.find(c => c.id === '{chart}').plot.data[1].filter(v => v != null).length")


def axes(page, chart: str) -> tuple[list[str], str, list[str], str]:
    """(time ticks, value-axis label, value ticks, idle note) from the chart's description."""
    text = page.inner_text(f"#axes-{chart}")
    m = re.match(r"Time axis \(local time\): (.*?)\. Value axis \((.*?)\): (.*?)\.( Idle.*)?$", text)
    assert m, text
    return m[1].split(", "), m[2], m[3].split(", "), m[4] or ""


def keep_busy(url: str, stop: threading.Event) -> None:
    body = {"model": MODEL, "prompt": "The KV cache holds keys and values. " * 3, "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            client.post("/v1/completions", json=body)


def test_charts_render_and_move_under_load(checkpoint):
    engine = make_engine(checkpoint("llama"))
    stop = threading.Event()
    try:
        with running(api(engine)) as url, playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/dashboard")
            page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('updated')")
            assert page.locator("#charts .chart canvas").count() == 11
            assert value(page, "tokens_per_s") in ("0.00", "–") and value(page, "kv_live") == "0.0%"
            # No request yet: once three seconds pass without an engine step, the charts say so.
            page.wait_for_function("() => document.querySelector('#axes-tokens').textContent.includes('Idle')",
                                   timeout=15_000)

            load = threading.Thread(target=keep_busy, args=(url, stop), daemon=True)
            load.start()
            try:
                watch_charts_move(page)
            finally:
                stop.set()
                load.join(60)
            check_axes(page)
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(300)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            browser.close()
            assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        engine.shutdown()


def watch_charts_move(page) -> None:
    page.wait_for_function("() => parseFloat(document.querySelector('.value[data-series=\"tokens_per_s\"]')"
                           ".textContent) > 0", timeout=30_000)
    before = {c: points(page, c) for c in ("tokens", "batch", "intensity")}
    page.wait_for_timeout(2500)
    after = {c: points(page, c) for c in before}
    assert all(after[c] > before[c] > 0 for c in before), (before, after)
    assert float(value(page, "batch_sequences")) >= 1
    assert value(page, "ttft_p50").endswith(("ms", " s")) and value(page, "itl_p99").endswith(("ms", " s"))


def check_axes(page) -> None:
    """Every chart: wall-clock ticks on the time axis, ticks with units on a labelled value axis."""
    for chart in page.eval_on_selector_all(".chart", "cs => cs.map(c => c.id.slice(6))"):
        times, label, ticks, _ = axes(page, chart)
        assert len(times) >= 2 and all(re.fullmatch(CLOCK, t) for t in times), (chart, times)
        assert label and len(ticks) >= 2, (chart, label, ticks)
    _, label, ticks, idle = axes(page, "util")
    assert ticks[0] == "0%" and ticks[-1] == "100%" and label.startswith("% of peak"), ticks  # MFU/MBU: 0-100%
    assert re.fullmatch(f"Idle, no engine step: {CLOCK}–{CLOCK}.*", idle.strip()), idle  # the wait before the load
    _, label, ticks, _ = axes(page, "intensity")
    assert label == "FLOPs per byte (log)" and all(re.fullmatch(r"1(0+|k|00k)?|0\.0*1", t) for t in ticks), ticks
    _, label, ticks, _ = axes(page, "ttft")
    assert label in ("latency, ms", "latency, s") and all(t.endswith(" " + label[9:]) for t in ticks), ticks
    _, label, ticks, _ = axes(page, "kv")
    assert label == "% of KV pages" and ticks[-1] == "100%"
