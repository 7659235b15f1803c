"""LangChain's standard chat-model integration suite (`langchain-tests`) against a real
`chatscale serve` of the demo target, through `ChatOpenAI`, with tool calling, structured output and
JSON mode switched on. Tests that need more knowledge than a 13M-parameter model has are xfail with
their reason (the list is in README.md, "LangChain"); every protocol-level test must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests
from server_utils import free_port, wait_until

pytestmark = pytest.mark.slow

KNOWLEDGE = "needs more knowledge than the 13M demo model has"


@pytest.fixture(scope="module")
def server_url():
    """`chatscale serve` as a user starts it, in its own process, always sending streamed usage
    (ChatOpenAI asks only OpenAI's own URLs for it)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatscale.cli", "serve", "--port", str(port), "--threads", "1",
                             "--served-model-name", "demo", "--always-include-usage"],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None
    try:
        assert wait_until(ready, 120) and proc.poll() is None, proc.stderr.read().decode()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


class TestChatscaleStandard(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _server(self, server_url, monkeypatch):
        monkeypatch.setenv("CHATSCALE_TEST_URL", server_url)

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict:
        return {"model": "demo", "base_url": os.environ["CHATSCALE_TEST_URL"] + "/v1", "api_key": "sk-none",
                "temperature": 0, "max_tokens": 200, "max_retries": 0, "timeout": 120}

    # Every optional capability on: tool calling, tool_choice, structured output, JSON mode, usage.
    has_tool_calling = has_tool_choice = has_structured_output = supports_json_mode = returns_usage_metadata = True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": [], "stream": []}
