"""A user's mistake on the command line (a missing file, a file that does not parse, an unknown
name) ends with one line naming it and a non-zero exit status, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.json").write_text("{bad")
    (d / "chat.json").write_text('{"turns": []}')
    (d / "bad.yaml").write_text("regions: [\n")
    return d


CASES = [
    (["tokens", "count", "missing.txt"], "missing.txt: No such file or directory"),
    (["tokens", "count", "--chat", "bad.json"], "bad.json: not valid JSON"),
    (["tokens", "count", "--chat", "chat.json"], 'chat.json: a chat is a JSON list of messages'),
    (["simulate", "replica", "--workload", "poisson:1:1", "--cost", "missing.json"], "missing.json: No such file"),
    (["simulate", "replica", "--workload", "poisson:1:1", "--cost", "bad.json"], "bad.json: not a step-cost profile"),
    (["simulate", "replica", "--workload", "log:missing.jsonl", "--cost", "roofline:llama-3-8b:h100"],
     "missing.jsonl: No such file"),
    (["simulate", "replica", "--workload", "poisson:1:1", "--cost", "roofline:nope:h100"], "unknown model 'nope'"),
    (["gateway", "--config", "missing.yaml"], "missing.yaml: No such file"),
    (["gateway", "--config", "bad.yaml"], "bad.yaml: not valid YAML"),
    (["chat", "--model", "missing-model", "hi"], "'missing-model' does not exist"),
    (["serve", "--model", "missing-model"], "missing-model: no config.json"),
    (["serve", "--tensor-parallel-size", "3"], "8 query heads; 2 KV heads (the ranks must divide them"),
    (["bench", "serve", "--base-url", "http://127.0.0.1:9", "--dataset", "trace", "--trace", "missing.csv"],
     "missing.csv: No such file"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(CASES)])
def test_a_mistake_is_one_line_and_a_failure(files, args, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("CHATSCALE_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "chatscale.cli", *args], cwd=files, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"chatscale {args[0]}") and message in lines[0], lines[0]
