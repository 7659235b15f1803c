"""The chat page at GET /, in a real browser (Debian chromium driven by Playwright), on a real server.

`chatscale serve` runs on a tiny random checkpoint (its answers are gibberish, which is fine: the
page must show whatever the model says, token by token). The browser reaches it through a TCP proxy
that can play a slow network: it hands the server's bytes over in small pieces with pauses, so "text
is on screen while the answer still streams" and "Stop lands mid-answer" are observed whatever the
model's speed, not left to timing luck. (Chrome's own throttling delivers this short stream whole.)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading

import httpx
import pytest

from chatscale.bench.launch import free_port, running

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                reason="needs Debian chromium (apt-get install chromium; see .ci/run)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

LAST_ANSWER = "document.querySelector('#messages .msg.assistant:last-child .content')"


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`chatscale serve` on a free port of 127.0.0.1, as a user starts it."""
    port = free_port()
    cmd = [sys.executable, "-m", "chatscale.cli", "serve", "--model", str(checkpoint("llama")), "--port", str(port),
           "--threads", "1"]
    with running(cmd, port, tmp_path_factory.mktemp("serve") / "serve.log", timeout=120) as url:
        yield url


class SlowNetwork:
    """A TCP proxy on 127.0.0.1 to `port`. While `slow` is set it forwards the server's bytes
    `piece` at a time with `pause` seconds between pieces (about 3 KB/s: a dozen SSE chunks a
    second); the browser's bytes always pass at once. A closed side closes the other, so a
    browser that aborts is seen by the server as a disconnect."""

    def __init__(self, port: int, piece: int = 64, pause: float = 0.02) -> None:
        self.target, self.piece, self.pause, self.slow = port, piece, pause, False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pump(self, reader, writer, paced: bool) -> None:
        try:
            while data := await reader.read(self.piece if paced else 65536):
                writer.write(data)
                await writer.drain()
                if paced and self.slow:
                    await asyncio.sleep(self.pause)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pump(client_r, server_w, False), self._pump(server_r, client_w, True))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def network(server):
    proxy = SlowNetwork(int(server.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


@pytest.fixture
def page(network):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(network.url + "/")
            yield page
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def settings(page, temperature: str, max_tokens: str) -> None:
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answer_text(page) -> str:
    return page.evaluate(f"{LAST_ANSWER}.textContent")


def test_chat_streams_stops_and_keeps_the_conversation(server, network, page):
    models = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == models

    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    aborted: list[str] = []
    page.on("requestfailed", lambda r: aborted.append(r.failure) if r.url.endswith("/v1/chat/completions") else None)

    # Turn 1: the answer is on screen while it still streams, then it is exactly the server's answer.
    settings(page, "0", "12")
    network.slow = True
    send(page, "What is a KV cache?")
    page.wait_for_function(f"{LAST_ANSWER} && {LAST_ANSWER}.textContent.length > 0 "
                           "&& !document.querySelector('#stop').hidden", timeout=60_000)
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    first = answer_text(page)
    reference = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": models[0], "messages": [{"role": "user", "content": "What is a KV cache?"}],
        "temperature": 0, "max_tokens": 12}).json()
    assert first == reference["choices"][0]["message"]["content"]
    assert page.inner_text("#messages .msg.assistant:last-child .meta").startswith("12 tokens")
    assert bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 12 and bodies[0]["temperature"] == 0

    # Turn 2: Stop aborts the request; the partial answer stays and no more text arrives.
    settings(page, "0", "300")
    send(page, "Why does batching matter?")
    page.wait_for_function(f"{LAST_ANSWER}.textContent.length > 0", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])", timeout=10_000)
    assert page.is_hidden("#stop")
    partial = answer_text(page)
    page.wait_for_timeout(1500)
    assert answer_text(page) == partial
    assert page.inner_text("#messages .msg.assistant:last-child .meta") == "stopped"
    assert aborted and "ABORTED" in aborted[-1].upper()

    # Turn 3 in the same conversation: the request carries the whole history, the stopped part included.
    network.slow = False
    settings(page, "0", "8")
    send(page, "Thanks!")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert [(m["role"], m["content"]) for m in bodies[-1]["messages"]] == [
        ("user", "What is a KV cache?"), ("assistant", first), ("user", "Why does batching matter?"),
        ("assistant", partial), ("user", "Thanks!")]
    assert page.locator("#messages .msg").count() == 6
    assert page.locator("#conversations .conv").count() == 1

    # The conversation survives a reload (localStorage); "New chat" starts an empty one.
    page.reload()
    page.wait_for_selector("#messages .msg")
    assert page.locator("#messages .msg").count() == 6
    assert page.inner_text("#conversations .conv.active .conv-title") == "What is a KV cache?"
    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0


def test_server_errors_are_shown_not_swallowed(server, page):
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    settings(page, "0", "100000000")  # far beyond the model's context: the server refuses it
    send(page, "hello")
    page.wait_for_selector("#messages .msg.assistant.error", timeout=30_000)
    assert page.inner_text("#status").startswith("Error 4")
    assert page.is_visible("#send")
