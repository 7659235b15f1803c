"""The chat page at GET /, in a real browser (Debian chromium driven by Playwright), on a real server.

`chatscale serve` runs on a tiny random checkpoint (its answers are gibberish, which is fine: the
page must show whatever the model says, token by token). The browser reaches it through a TCP proxy
that can play a slow network: it hands the server's bytes over in small pieces with pauses, so "text
is on screen while the answer still streams" and "Stop lands mid-answer" are observed whatever the
model's speed, not left to timing luck. (Chrome's own throttling delivers this short stream whole.)

What an answer says cannot be chosen with a random 13M model, so the tests of how answers are drawn
(Markdown, hostile HTML, tool calls, wide content on a phone) hand the page a chosen answer: the
browser's request to /v1/chat/completions is answered with that text as an OpenAI-shaped SSE stream
(`answer_with`); everything else, the page's own files and /v1/models included, comes from the server.
"""

from __future__ import annotations

import asyncio
import json
import re
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

LAST = "#messages .msg.assistant:last-child"
LAST_ANSWER = f"document.querySelector('{LAST} .content')"
STORED = "JSON.parse(localStorage.getItem('chatscale.conversations'))[0].messages"


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


@pytest.fixture(scope="module")
def network(server):
    proxy = SlowNetwork(int(server.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def browser(network):  # closed before the proxy, so no connection is left open through it
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def watched(page):
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    return page


def open_page(browser, url: str, width: int = 1200, height: int = 800, **context):
    """A fresh browser context (empty localStorage) on the chat page; JavaScript errors fail the test."""
    page = watched(browser.new_context(viewport={"width": width, "height": height}, **context).new_page())
    page.goto(url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    return page


@pytest.fixture
def page(browser, network):
    page = open_page(browser, network.url)
    yield page
    assert not page.errors, f"JavaScript errors on the page: {page.errors}"
    page.context.close()


def settings(page, temperature: str, max_tokens: str) -> None:
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def done(page) -> None:
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)


def stored(page) -> list[dict]:
    """The conversation as the page keeps it: the raw text of every message (what the model said)."""
    return page.evaluate(STORED)


def chat_bodies(page) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def sse(chunks: list[dict]) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    """One chat.completion.chunk as OpenAI documents it."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
            "choices": choices, **({"usage": usage} if usage else {})}


def answer_with(page, pieces: list[str] | None = None, tool_calls: list[dict] | None = None) -> None:
    """Answer the page's next chat requests with `pieces` of text, one chunk each, then `tool_calls`
    (OpenAI's streamed shape: a call's id and name first, then its arguments in two fragments)."""
    chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces or []]
    for i, call in enumerate(tool_calls or []):
        args = json.dumps(call["arguments"])
        chunks.append(chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                             "function": {"name": call["name"], "arguments": ""}}]}))
        for part in (args[:len(args) // 2], args[len(args) // 2:]):
            chunks.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]}))
    chunks.append(chunk({}, "tool_calls" if tool_calls else "stop"))
    chunks.append(chunk(usage={"prompt_tokens": 40, "completion_tokens": len(pieces or []) + 7, "total_tokens": 0,
                               "prompt_tokens_details": {"cached_tokens": 32}}))
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse(chunks)))


def test_chat_streams_stops_and_keeps_the_conversation(server, network, page):
    models = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == models
    bodies = chat_bodies(page)
    aborted: list[str] = []
    page.on("requestfailed", lambda r: aborted.append(r.failure) if r.url.endswith("/v1/chat/completions") else None)

    # Turn 1: the answer is on screen while it still streams, then it is exactly the server's answer.
    settings(page, "0", "12")
    network.slow = True
    send(page, "What is a KV cache?")
    page.wait_for_function(f"() => {LAST_ANSWER} && {LAST_ANSWER}.textContent.length > 0 "
                           "&& !document.querySelector('#stop').hidden", timeout=60_000)
    done(page)
    first = stored(page)[-1]["content"]
    reference = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": models[0], "messages": [{"role": "user", "content": "What is a KV cache?"}],
        "temperature": 0, "max_tokens": 12}).json()
    assert first == reference["choices"][0]["message"]["content"]
    assert page.inner_text(f"{LAST} .meta").startswith("12 tokens")
    assert bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 12 and bodies[0]["temperature"] == 0
    assert bodies[0]["stream_options"] == {"include_usage": True}

    # Turn 2: Stop aborts the request; the partial answer stays and no more text arrives.
    settings(page, "0", "300")
    send(page, "Why does batching matter?")
    page.wait_for_function(f"() => {LAST_ANSWER}.textContent.length > 0", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])", timeout=10_000)
    assert page.is_hidden("#stop")
    partial = stored(page)[-1]["content"]
    shown = page.evaluate(f"{LAST_ANSWER}.textContent")
    page.wait_for_timeout(1500)
    assert stored(page)[-1]["content"] == partial and page.evaluate(f"{LAST_ANSWER}.textContent") == shown
    assert page.inner_text(f"{LAST} .meta") == "stopped"
    assert aborted and "ABORTED" in aborted[-1].upper()

    # Turn 3 in the same conversation: the request carries the whole history, the stopped part included,
    # and the footer says how much of that prompt the server's prefix cache served (whole 16-token pages).
    network.slow = False
    settings(page, "0", "8")
    send(page, "Thanks!")
    done(page)
    assert [(m["role"], m["content"]) for m in bodies[-1]["messages"]] == [
        ("user", "What is a KV cache?"), ("assistant", first), ("user", "Why does batching matter?"),
        ("assistant", partial), ("user", "Thanks!")]
    cached = re.search(r"(\d+) of (\d+) prompt tokens cached", page.inner_text(f"{LAST} .meta"))
    assert cached and 0 < int(cached[1]) < int(cached[2]) and int(cached[1]) % 16 == 0
    assert page.locator("#messages .msg").count() == 6
    assert page.locator("#conversations .conv").count() == 1

    # The conversation survives a reload (localStorage); "New chat" starts an empty one.
    page.reload()
    page.wait_for_selector("#messages .msg")
    assert page.locator("#messages .msg").count() == 6
    assert page.inner_text("#conversations .conv.active .conv-title") == "What is a KV cache?"
    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0


def test_regenerate_edit_and_copy(server, browser, network):
    page = open_page(browser, network.url, permissions=["clipboard-read", "clipboard-write"])
    bodies = chat_bodies(page)
    reference = {n: httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": n}).json()
        ["choices"][0]["message"]["content"] for q, n in (("What is a KV cache?", 4), ("What is a KV cache?", 9))}

    settings(page, "0", "4")
    send(page, "What is a KV cache?")
    done(page)
    assert stored(page)[-1]["content"] == reference[4]

    # Regenerate replaces the last answer: the same question goes again, without the old answer.
    settings(page, "0", "9")
    page.click(f"{LAST} button[data-action=regenerate]")
    page.wait_for_function(f"() => {STORED}.at(-1).content === {json.dumps(reference[9])}", timeout=60_000)
    done(page)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "What is a KV cache?"}]
    assert page.locator("#messages .msg").count() == 2 and reference[9] != reference[4]

    # Copy puts the answer's text on the clipboard.
    page.click(f"{LAST} button[data-action=copy]")
    page.wait_for_function(f"() => document.querySelector('{LAST} button[data-action=copy]').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == reference[9]

    # Edit the first question after a second turn: the conversation is cut there and goes on from the edit.
    send(page, "Thanks!")
    done(page)
    assert page.locator("#messages .msg").count() == 4
    page.click("#messages .msg.user >> nth=0 >> button[data-action=edit]")
    page.fill("#messages .msg.user .edit-box", "Why does batching matter?")
    page.click("#messages .msg.user button[data-action=edit-send]")
    done(page)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Why does batching matter?"}]
    assert [m["role"] for m in stored(page)] == ["user", "assistant"]
    assert stored(page)[0]["content"] == "Why does batching matter?"

    # Where the Clipboard API is missing (plain HTTP on a LAN address), copying still works.
    plain = watched(page.context.new_page())
    plain.add_init_script("Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined})")
    plain.goto(network.url + "/")
    plain.wait_for_selector(f"{LAST} button[data-action=copy]")
    plain.click(f"{LAST} button[data-action=copy]")
    plain.wait_for_function(f"() => document.querySelector('{LAST} button[data-action=copy]').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == stored(page)[-1]["content"]
    assert not page.errors and not plain.errors, page.errors + plain.errors
    page.context.close()


MARKDOWN = ("## Paging the KV cache\n\nThree **reasons**, with `inline code`:\n\n- memory\n- batching\n- reuse\n\n"
            "| size | pages |\n|---|--:|\n| 16 | 1 |\n| 64 | 4 |\n\n"
            "```python\ndef pages(tokens: int, size: int = 16) -> int:\n    return -(-tokens // size)\n```\n\n"
            "See [the docs](https://example.com/docs).")


def test_markdown_is_rendered_once_per_frame_with_highlighting(server, page):
    answer_with(page, [MARKDOWN[i:i + 2] for i in range(0, len(MARKDOWN), 2)])
    page.evaluate("""() => {
        window.renders = 0; window.ticks = 0;
        const sanitize = DOMPurify.sanitize;
        DOMPurify.sanitize = (...args) => { window.renders += 1; return sanitize.apply(DOMPurify, args); };
        const tick = () => { window.ticks += 1; requestAnimationFrame(tick); };
        requestAnimationFrame(tick);
    }""")
    send(page, "Why page the KV cache?")
    done(page)
    answer = page.locator(f"{LAST} .content")
    assert answer.locator("h2").inner_text() == "Paging the KV cache"
    assert answer.locator("strong").inner_text() == "reasons"
    assert answer.locator("li").all_inner_texts() == ["memory", "batching", "reuse"]
    assert answer.locator("table tr").count() == 3 and answer.locator("td.align-right").count() == 2
    code = answer.locator("pre code.language-python.hljs")
    assert code.locator(".hljs-keyword").first.inner_text() == "def"
    assert code.locator(".hljs-title").first.inner_text() == "pages"
    link = answer.locator("a")
    assert link.get_attribute("rel") == "noopener noreferrer" and link.get_attribute("target") == "_blank"
    assert stored(page)[-1]["content"] == MARKDOWN
    assert "32 of 40 prompt tokens cached" in page.inner_text(f"{LAST} .meta")
    # ~300 chunks arrived in a few frames: the answer was drawn at most once a frame, plus the final draw.
    renders, frames = page.evaluate("[window.renders, window.ticks]")
    assert renders <= frames + 2 and renders < 20, (renders, frames)

    # While streaming, a fence being typed is held back and an open one stays a code block.
    prefixes = page.evaluate("""async (text) => {
        const { renderMarkdown } = await import('./static/chat/markdown.js');
        const node = document.createElement('div');
        const out = [];
        for (let i = 1; i <= text.length; i++) {
            renderMarkdown(node, text.slice(0, i), true);
            out.push([node.querySelectorAll('pre').length, node.textContent.includes('`')]);
        }
        return out;
    }""", "Intro.\n```python\nx = 1\n```\nAfter.")
    first_block = next(i for i, (blocks, _) in enumerate(prefixes) if blocks)
    assert all(blocks == 1 for blocks, _ in prefixes[first_block:])
    assert not any(backtick for _, backtick in prefixes)


def test_code_block_copy_and_tool_calls(server, browser, network):
    page = open_page(browser, network.url, permissions=["clipboard-read", "clipboard-write"])
    bodies = chat_bodies(page)
    page.click("#settings-toggle")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    page.fill("#tools", json.dumps(tools))
    answer_with(page, ["Checking ", "both."], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"zone": "Europe/Paris"}}])
    send(page, "Weather and time in Paris?")
    done(page)
    assert bodies[-1]["tools"] == tools
    calls = page.locator(f"{LAST} details.tool-call")
    assert calls.count() == 2
    summary = 'called tool get_weather with {"city": "Paris", "unit": "celsius"}'
    assert calls.nth(0).locator("summary").inner_text() == summary
    assert calls.nth(1).locator("summary").inner_text() == 'called tool get_time with {"zone": "Europe/Paris"}'
    assert not calls.nth(0).locator("pre").is_visible()
    calls.nth(0).locator("summary").click()
    assert json.loads(calls.nth(0).locator("pre code").inner_text()) == {"city": "Paris", "unit": "celsius"}
    assert stored(page)[-1]["tool_calls"][1] == {"id": "call_1", "type": "function", "function": {
        "name": "get_time", "arguments": json.dumps({"zone": "Europe/Paris"})}}

    # A structured-output answer is shown as indented, highlighted JSON.
    page.fill("#tools", "")
    page.fill("#response-format", '{"type": "json_object"}')
    answer_with(page, ['{"city": "Pa', 'ris", "temp": 21}'])
    send(page, "As JSON")
    done(page)
    assert bodies[-1]["response_format"] == {"type": "json_object"} and "tools" not in bodies[-1]
    block = page.locator(f"{LAST} .content pre code.language-json")
    assert block.inner_text().rstrip() == '{\n  "city": "Paris",\n  "temp": 21\n}'
    assert block.locator(".hljs-attr").count() == 2

    # Each code block has its own copy button.
    page.click(f"{LAST} .code-block button[data-action=copy-code]")
    page.wait_for_function(f"() => document.querySelector('{LAST} .copy-code').textContent === 'Copied'")
    assert json.loads(page.evaluate("navigator.clipboard.readText()")) == {"city": "Paris", "temp": 21}

    # Settings that are not JSON are refused before anything is sent.
    page.fill("#response-format", "{json")
    count = len(bodies)
    send(page, "again")
    assert page.inner_text("#status").startswith("Response format (Settings) is not valid JSON")
    assert len(bodies) == count and page.input_value("#prompt") == "again"
    assert not page.errors, page.errors
    page.context.close()


HOSTILE = ("<img src=x onerror=\"window.pwned = 'img'\">\n\n<script>window.pwned = 'script'</script>\n\n"
           "[click me](javascript:window.pwned='link') and <a href=\"javascript:window.pwned='a'\">this</a>\n\n"
           "<javascript:window.pwned='autolink'> [data](data:text/html,<script>window.pwned='data'</script>)")


def test_answers_cannot_run_script(server, page):
    answer_with(page, [HOSTILE])
    send(page, "hi")
    done(page)
    answer = page.locator(f"{LAST} .content")
    assert "<script>" in answer.inner_text()  # shown as text, never parsed as HTML
    assert page.locator("#messages script, #messages img, #messages [onerror]").count() == 0
    hrefs = answer.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    assert not [h for h in hrefs if re.match(r"\s*(javascript|data):", h or "", re.I)], hrefs
    for link in answer.locator("a").all():
        link.click(modifiers=["Shift"])  # a new window: leaves this page where it is
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None

    # The Content-Security-Policy is a second wall: an inline handler that got into the page anyway
    # does not run.
    page.evaluate("""() => new Promise((resolve) => {
        const img = document.createElement('img');
        img.setAttribute('onerror', "window.pwned = 'inline handler'");
        img.addEventListener('error', resolve);
        img.src = 'missing.png';
        document.body.append(img);
    })""")
    assert page.evaluate("window.pwned") is None
    for path in ("/", "/dashboard"):
        csp = httpx.get(server + path).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp


WIDE = ("A long link: https://example.com/" + "a" * 120 + "\n\n| " + " | ".join(f"column {i}" for i in range(12))
        + " |\n|" + "---|" * 12 + "\n| " + " | ".join("x" * 12 for _ in range(12)) + " |\n\n```\n"
        + "y = " + "1 + " * 80 + "1\n```")


def test_phone_width_menu_and_no_overflow(server, browser, network):
    page = open_page(browser, network.url, width=390, height=844)
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.is_visible("#menu-toggle") and not page.is_visible("#sidebar")
    # The placeholder is shown whole in the composer.
    assert page.evaluate("""() => {
        const box = document.querySelector('#prompt'), style = getComputedStyle(box);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${style.fontSize} ${style.fontFamily}`;
        return ctx.measureText(box.placeholder).width <= box.clientWidth;
    }""")
    answer_with(page, [WIDE])
    send(page, "Show me something wide")
    done(page)
    send(page, "And again")
    done(page)
    assert page.evaluate(fits)
    page.click("#settings-toggle")
    assert page.evaluate(fits)
    page.click("#settings-toggle")

    page.click("#menu-toggle")
    page.wait_for_selector("#sidebar", state="visible")
    assert page.inner_text("#conversations .conv-title") == "Show me something wide"
    page.click("#new-chat")  # closes the menu, empties the page
    page.wait_for_selector("#sidebar", state="hidden")
    assert page.locator("#messages .msg").count() == 0
    page.click("#menu-toggle")
    page.click("#conversations .conv-title")
    page.wait_for_selector("#sidebar", state="hidden")
    assert page.locator("#messages .msg").count() == 4 and page.evaluate(fits)
    assert not page.errors, page.errors
    page.context.close()


def test_server_errors_are_shown_not_swallowed(server, page):
    settings(page, "0", "100000000")  # far beyond the model's context: the server refuses it
    send(page, "hello")
    page.wait_for_selector("#messages .msg.assistant.error", timeout=30_000)
    assert page.inner_text("#status").startswith("Error 4")
    assert page.is_visible("#send")
