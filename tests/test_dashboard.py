"""/dashboard in a real browser (Debian chromium driven by Playwright) on a real server: every chart
is drawn, and under load the lines move and the numbers leave zero."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
from server_utils import MODEL, api, make_engine, running
from test_chat_page import CHROMIUM, CHROMIUM_ARGS, playwright_api

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="needs Debian chromium (apt-get install chromium; see .ci/run)")


def value(page, series: str) -> str:
    return page.inner_text(f'.value[data-series="{series}"]')


def points(page, series: str) -> int:
    return page.eval_on_selector(f'path[data-series="{series}"]', "p => (p.getAttribute('d').match(/[ML]/g) || []).length")


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
            assert page.locator("#charts .chart svg").count() == 11
            assert value(page, "tokens_per_s") in ("0.00", "–") and value(page, "kv_live") == "0.0%"

            load = threading.Thread(target=keep_busy, args=(url, stop), daemon=True)
            load.start()
            try:
                watch_charts_move(page)
            finally:
                stop.set()
                load.join(60)
            browser.close()
            assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        engine.shutdown()


def watch_charts_move(page) -> None:
    page.wait_for_function("() => parseFloat(document.querySelector('.value[data-series=\"tokens_per_s\"]')"
                           ".textContent) > 0", timeout=30_000)
    before = {s: points(page, s) for s in ("tokens_per_s", "batch_sequences", "intensity", "ridge")}
    path = page.get_attribute('path[data-series="tokens_per_s"]', "d")
    page.wait_for_timeout(2500)
    assert page.get_attribute('path[data-series="tokens_per_s"]', "d") != path
    after = {s: points(page, s) for s in before}
    assert all(after[s] > before[s] > 0 for s in before), (before, after)
    assert float(value(page, "batch_sequences")) >= 1
    assert value(page, "ttft_p50").endswith(("ms", " s")) and value(page, "itl_p99").endswith(("ms", " s"))
    assert page.inner_text("#chart-intensity .scale").startswith("10^")
