"""`make serve` / `chatscale serve` as a newcomer meets them: runtime dependencies only, a KV pool
sized to what the model can use (said at start-up), and one line saying when requests are served."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_utils import free_port, wait_until

from chatscale.engine.config import available_memory_bytes
from chatscale.engine.llm import LLM
from chatscale.engine.runner import kv_bytes_per_block

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("transformers", "openai", "playwright", "schemathesis", "hypothesis", "pytest")
# `chatscale serve` in a process where the test extras cannot be imported, as after `make serve`.
SERVE_WITHOUT_TEST_EXTRAS = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TEST_ONLY!r}:
            raise ImportError(f"{{name}} is a test extra; chatscale serve must not need it")
sys.meta_path.insert(0, Refuse())
for name in list(sys.modules):
    if name.split(".")[0] in {TEST_ONLY!r}:
        del sys.modules[name]
from chatscale.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_default_kv_pool_holds_max_num_seqs_full_contexts(checkpoint):
    """The tiny model's context is 512 tokens: 4 sequences need 4 x 32 pages, not a share of RAM."""
    path = str(checkpoint("llama"))
    assert LLM(path, max_num_seqs=4).engine.kv.num_blocks == 4 * 512 // 16
    assert LLM(path, max_num_seqs=4, max_model_len=100).engine.kv.num_blocks == 4 * 7  # ceil(100 / 16)
    given = LLM(path, max_num_seqs=4, kv_cache_bytes=4 << 20).engine
    assert given.kv.num_blocks == (4 << 20) // kv_bytes_per_block(given.model, 16) > 4 * 512 // 16


def test_default_kv_pool_is_bounded_by_the_fraction_of_free_memory(checkpoint):
    llm = LLM(str(checkpoint("llama")), max_num_seqs=10**6, kv_cache_fraction=0.001)
    per_block = kv_bytes_per_block(llm.engine.model, 16)
    assert llm.engine.kv.num_blocks == pytest.approx(available_memory_bytes() * 0.001 / per_block, rel=0.1)


def test_serve_needs_no_test_extras_says_the_pool_and_when_it_is_ready(checkpoint, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_WITHOUT_TEST_EXTRAS, "serve", "--model",
                                 str(checkpoint("llama")), "--port", str(port), "--threads", "1",
                                 "--max-num-seqs", "8"], stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = f"ready at http://127.0.0.1:{port}"

        def announced() -> bool:
            assert proc.poll() is None, f"chatscale serve exited:\n{log_path.read_text()}"
            return ready in log_path.read_text()

        assert wait_until(announced, 90), log_path.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = log_path.read_text()
    assert text.count("ready at") == 1, text
    assert "KV cache: 256 pages of 16 tokens" in text and "8 sequences x 512 tokens" in text, text
    assert text.index("KV cache:") < text.index(ready)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_serve_installs_runtime_dependencies_only():
    def recipe(target: str) -> str:
        return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    assert "pip install -q -e ." in recipe("serve") and "[test]" not in recipe("serve")
    assert "[test]" in recipe("test") and "[test]" in recipe("test-slow")


def test_make_test_slow_has_tests_to_run():
    """`make test-slow` runs `pytest -m slow`: some test must carry the mark (none did)."""
    marked = [p.name for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"^@pytest\.mark\.slow\b", p.read_text(), re.M)]
    assert marked
