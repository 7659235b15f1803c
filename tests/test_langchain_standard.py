"""LangChain's standard chat-model integration suite (`langchain-tests`) against a real
`chatscale serve` of the demo target, through `ChatOpenAI`, with tool calling, structured output and
JSON mode switched on. Tests that need more knowledge than the 13M-parameter demo model has are
xfail with their reason (XFAIL below, also in docs/demo_models.md); every protocol-level test must pass.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys

import httpx
import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests
from server_utils import free_port, wait_until

pytestmark = pytest.mark.slow

# Why the shipped 13M demo model fails these (docs/demo_models.md, "Tool calls and JSON"): the
# grammar makes calls and JSON well-formed, but it cannot make the model end a string or pick
# sensible values, and the tool fine-tuning did not reach the quality to ship.
NO_TOOL_TRAINING = ("the demo model was never trained on tool calls or JSON: inside a string the grammar forces "
                    "it never writes the closing quote, so the answer stops at max_tokens")
XFAIL = {
    "test_tool_calling": NO_TOOL_TRAINING,
    "test_tool_calling_async": NO_TOOL_TRAINING,
    "test_bind_runnables_as_tools": NO_TOOL_TRAINING,
    "test_tool_choice": NO_TOOL_TRAINING,
    "test_tool_calling_with_no_arguments": "with parallel calls allowed the demo model keeps writing calls after "
                                           "the first; the test expects exactly one",
    "test_structured_output": NO_TOOL_TRAINING,
    "test_structured_output_async": NO_TOOL_TRAINING,
    "test_structured_output_pydantic_2_v1": NO_TOOL_TRAINING,
    "test_structured_output_optional_param": NO_TOOL_TRAINING,
    "test_json_mode": "JSON mode has no schema: the keys setup and punchline must come from the model's "
                      "understanding of 'tell me a joke', which the demo model lacks",
    "test_agent_loop": "with tool_choice auto the demo model, never trained on tools, answers in prose and calls "
                       "nothing",
    "test_unicode_tool_call_integration": "needs the model to copy Chinese characters from the question into "
                                          "the call's arguments",
}


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


def _xfail(name: str, reason: str):
    """The suite's own test, marked xfail with our reason (its parametrization kept)."""
    base = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(base):
        async def test(self, *args, **kwargs):
            await base(self, *args, **kwargs)
    else:
        def test(self, *args, **kwargs):
            base(self, *args, **kwargs)
    return pytest.mark.xfail(reason=reason, strict=False)(functools.wraps(base)(test))


for _name, _reason in XFAIL.items():
    setattr(TestChatscaleStandard, _name, _xfail(_name, _reason))
