"""Every example in README.md runs as shown and prints something sensible.

The examples are read out of the README, not copied here, so an edited example is tested as edited
and a new one fails `test_every_example_is_tested` until it is. The server examples run against
servers this test starts; the one change made to them is the port: free ports stand in for 8000,
8001, 8002 and 8080, which other programs may hold on a shared machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from server_utils import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
README_PORTS = (8000, 8001, 8002, 8080)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
CLI = [sys.executable, "-m", "chatscale.cli"]


def fenced(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def commands() -> list[str]:
    """The shell commands of the indented blocks (`chatscale ...`, `curl ...`, `make ...`), one per
    example, continuation lines joined and trailing comments dropped."""
    found, pending = [], ""
    for line in README.splitlines():
        if not line.startswith("    ") or line.startswith("     ") and not pending:
            pending = ""
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        if re.match(r"(chatscale|curl|make) ", text):
            found.append(re.sub(r"\s+#[^'\"]*$", "", text).strip())
    return found


def example(prefix: str) -> str:
    """The one README command that starts with `prefix`."""
    matches = [c for c in commands() if c.startswith(prefix)]
    assert len(matches) == 1, f"{prefix!r}: {matches}"
    return matches[0]


def localize(text: str, ports: dict[int, int]) -> str:
    return re.sub(r"\b(8000|8001|8002|8080)\b", lambda m: str(ports[int(m.group(1))]), text)


def shell(command: str, timeout: float = 300) -> str:
    """Run a README command as a user's shell would (chatscale is this checkout's CLI)."""
    argv = command.replace("chatscale ", f"{sys.executable} -m chatscale.cli ", 1) if command.startswith(
        "chatscale ") else command
    done = subprocess.run(["bash", "-c", argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def sentences(text: str) -> list[str]:
    """Lines of at least four words: what a sensible answer looks like."""
    return [line for line in text.splitlines() if len(line.split()) >= 4]


@contextmanager
def serving(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A `chatscale serve` or `chatscale gateway` process, stopped with SIGTERM at the end."""
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, *args], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(ready, timeout), log.read_text()


@pytest.fixture(scope="module")
def ports() -> dict[int, int]:
    return {p: free_port() for p in README_PORTS}


@pytest.fixture(scope="module")
def server(ports, tmp_path_factory) -> Iterator[Path]:
    """`chatscale serve --port 8000`, the README's server, on its stand-in port; yields its log."""
    command = localize(example("chatscale serve --port 8000"), ports)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(command.split()[1:], log) as proc:
        wait_ready(proc, f"http://127.0.0.1:{ports[8000]}", log)
        yield log


# ---- the list of examples -------------------------------------------------------------------------

TESTED = ("make serve", "make test", "chatscale chat ", "chatscale serve --port 8000", "chatscale plan ",
          "chatscale bench serve ", "chatscale tokens count ", "chatscale tokens split ", "chatscale top ",
          "chatscale simulate fleet ", "chatscale simulate size ", "chatscale serve --port 8001 ", "chatscale serve --model smollm2 ",
          "chatscale gateway ", "curl http://127.0.0.1:8080")


def test_every_example_is_tested():
    untested = [c for c in commands() if not c.startswith(TESTED)]
    assert not untested, f"README examples no test runs: {untested}"
    assert len(fenced("python")) == 3 and len(fenced("bash")) == 1


def test_make_targets_are_the_makefiles():
    assert {c for c in commands() if c.startswith("make ")} == {"make serve", "make test"}
    for target in ("serve", "test"):
        subprocess.run(["make", "-n", "-B", target], cwd=ROOT, check=True, capture_output=True)


# ---- the examples ---------------------------------------------------------------------------------

def test_engine_example_prints_answers():
    engine = next(b for b in fenced("python") if "from chatscale import" in b)
    done = subprocess.run([sys.executable, "-c", engine], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = sentences(done.stdout)
    assert len(answers) == 4, done.stdout  # one chat, two greedy answers, one streamed
    assert "cache" in answers[0].lower() and "batch" in answers[1].lower()


def test_the_real_model_example_answers(tmp_path):
    """`chatscale serve --model smollm2 --quantization int8`: the packaged SmolLM2 (make test installs
    the wheel) on int8 kernels knows the capital of France."""
    port = free_port()
    with serving([*example("chatscale serve --model smollm2 ").split()[1:], "--port", str(port)],
                 tmp_path / "serve.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, tmp_path / "serve.log")
        body = {"model": "smollm2", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert "choices" in answer, answer
    assert "Paris" in answer["choices"][0]["message"]["content"], answer
    assert "int8" in (tmp_path / "serve.log").read_text()


def test_curl_and_openai_examples_against_the_readme_server(server, ports):
    curl = localize(fenced("bash")[0], ports)
    events = [line[6:] for line in shell(curl).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert "cache" in text.lower() and len(text.split()) >= 8, text
    client = localize(next(b for b in fenced("python") if "from openai import" in b), ports)
    done = subprocess.run([sys.executable, "-c", client], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) >= 4 and "completion_tokens=" in done.stdout, done.stdout


def test_tool_call_and_structured_output_example(server, ports):
    example_code = localize(next(b for b in fenced("python") if "tool_choice" in b), ports)
    done = subprocess.run([sys.executable, "-c", example_code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    call, forecast = done.stdout.strip().splitlines()
    assert call.startswith("Function(arguments='{\"city\": ") and "name='get_weather'" in call, call
    assert forecast.startswith("city=") and "sunny=" in forecast, forecast


def test_command_line_examples(server, ports):
    chat = shell(example("chatscale chat "))
    assert "cache" in chat.lower() and len(chat.split()) >= 8, chat
    plan = shell(example("chatscale plan "))
    assert "GPT-4" in plan and "cost per 1k tokens" in plan, plan
    bench = shell(localize(example("chatscale bench serve "), ports))
    assert "TTFT" in bench and "8 ok, 0 failed" in bench, bench
    assert int(shell(example("chatscale tokens count ")).strip()) > 1000
    chunks = [json.loads(line) for line in shell(example("chatscale tokens split ")).splitlines()]
    assert len(chunks) > 2 and all(c["n_tokens"] <= 512 for c in chunks)


def test_top_example_shows_the_server(server, ports, tmp_path):
    """`chatscale top` runs until Ctrl-C. Off a terminal it prints its last screen when stopped: stop
    it as a user would once it has read the server's /metrics twice (a rate needs two)."""
    def scrapes() -> int:
        return server.read_text().count("GET /metrics")

    before = scrapes()
    command = localize(example("chatscale top "), ports).split()
    with (tmp_path / "top.txt").open("w") as out:
        proc = subprocess.Popen([*CLI, *command[1:]], cwd=ROOT, env={**ENV, "COLUMNS": "100"}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: scrapes() >= before + 2, 60), server.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    screen = (tmp_path / "top.txt").read_text()
    assert f"127.0.0.1:{ports[8000]}" in screen and "unreachable" not in screen and "KV live" in screen, screen


@pytest.mark.slow  # ~15 s of CPU, a minute on a busy machine
def test_simulator_examples_print_summaries():
    fleet = shell(example("chatscale simulate fleet "))
    assert "replicas" in fleet and "TTFT" in fleet, fleet
    size = shell(example("chatscale simulate size "))
    assert re.search(r"\d+ replicas", size), size


@pytest.mark.slow  # three servers: ~40 s on a busy machine
def test_gateway_example_serves_through_two_replicas(ports, tmp_path):
    replicas = localize(example("chatscale serve --port 8001 "), ports)
    gateway = localize(example("chatscale gateway "), ports)
    config = tmp_path / "local.yaml"  # deploy/local.yaml names the replicas' ports too
    config.write_text(localize((ROOT / "deploy" / "local.yaml").read_text(), ports))
    gateway = gateway.replace("deploy/local.yaml", str(config))
    servers = [c.strip().split()[1:] for c in replicas.split("&") if c.strip()]
    assert len(servers) == 2
    with serving(servers[0], tmp_path / "a.log") as a, serving(servers[1], tmp_path / "b.log") as b, \
            serving(gateway.split()[1:], tmp_path / "gateway.log") as gw:
        for proc, port, log in ((a, 8001, "a.log"), (b, 8002, "b.log"), (gw, 8080, "gateway.log")):
            wait_ready(proc, f"http://127.0.0.1:{ports[port]}", tmp_path / log)
        answer = json.loads(shell(localize(example("curl http://127.0.0.1:8080"), ports)))
    assert len(answer["choices"][0]["message"]["content"].split()) >= 4, answer
