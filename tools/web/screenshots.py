"""Screenshots of the chat page and the dashboard for the README (docs/img/chat-*.png, dashboard-*.png).

    .venv/bin/python tools/web/screenshots.py        # about three minutes; needs Debian chromium

Starts `chatscale serve` with the demo model on a free port of 127.0.0.1, asks it a few questions in
Chromium at desktop and phone widths, then loads it in bursts with an idle pause between them and
photographs the dashboard. The Markdown picture is the one exception to "what the model said": the
13M demo model writes plain prose, so that page is handed the test suite's sample answer instead
(as tests/test_chat_page.py does) and its caption in the README says so. PNGs are reduced to 256
colours (Pillow), which keeps text sharp at a fraction of the size.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import sync_playwright

from chatscale.bench.launch import free_port, running

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_chat_page import CHROMIUM_ARGS, MARKDOWN, answer_with  # noqa: E402

QUESTIONS = ["What is a KV cache?", "Why does continuous batching matter?", "How do I run the server?"]


def save(page, path: Path, full_page: bool = False) -> None:
    page.screenshot(path=str(path), full_page=full_page)
    shrink(path)


def shrink(path: Path) -> None:
    Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def ask(page, questions: list[str]) -> None:
    for q in questions:
        page.fill("#prompt", q)
        page.press("#prompt", "Enter")
        page.wait_for_selector("#send:not([hidden])", timeout=120_000)


def chat(browser, url: str, out: Path) -> None:
    desktop = browser.new_page(viewport={"width": 1280, "height": 760})
    desktop.goto(url + "/")
    desktop.wait_for_function("() => document.querySelector('#model').options.length > 0")
    ask(desktop, QUESTIONS)
    save(desktop, out / "chat-desktop.png")
    desktop.close()

    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    phone.goto(url + "/")
    phone.wait_for_function("() => document.querySelector('#model').options.length > 0")
    ask(phone, QUESTIONS[:2])
    save(phone, out / "chat-phone.png")
    phone.click("#menu-toggle")
    phone.wait_for_timeout(400)
    save(phone, out / "chat-phone-menu.png")
    phone.close()

    sample = browser.new_page(viewport={"width": 1100, "height": 760})
    sample.goto(url + "/")
    sample.wait_for_function("() => document.querySelector('#model').options.length > 0")
    answer_with(sample, [MARKDOWN])
    ask(sample, ["Why page the KV cache?"])
    # Only the rendered answer: its footer's figures describe the hand-fed stream, not a model.
    sample.locator("#messages .msg.assistant .content").screenshot(path=str(out / "chat-markdown.png"))
    shrink(out / "chat-markdown.png")
    sample.close()


def load(url: str, seconds: float, users: int = 6) -> None:
    """`users` conversations asking questions back to back for `seconds`."""
    stop = time.monotonic() + seconds

    def user(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": 64})

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def dashboard(browser, url: str, out: Path, busy_s: float, idle_s: float) -> None:
    load(url, busy_s)
    time.sleep(idle_s)
    load(url, busy_s, users=12)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url + "/dashboard")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('updated')")
    page.wait_for_timeout(1500)
    save(page, out / "dashboard-desktop.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(800)
    save(page, out / "dashboard-phone.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--busy", type=float, default=60.0, help="seconds of each burst of load")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of the pause between the bursts")
    args = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "chatscale.cli", "serve", "--port", str(port), "--threads", "2"]
    with tempfile.TemporaryDirectory() as tmp, running(cmd, port, Path(tmp) / "serve.log") as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                     args=CHROMIUM_ARGS)
        chat(browser, url, args.out)
        dashboard(browser, url, args.out, args.busy, args.idle)
        browser.close()


if __name__ == "__main__":
    main()
