"""Production request traces shipped inside the package (attribution and licences: README.md here).

A trace is named by its file name (`azure_llm_2023_conv.csv`) wherever a path is accepted, so the
simulator, `chatscale bench serve --trace` and the benchmarks work in any checkout or installation.
"""

from __future__ import annotations

from pathlib import Path

TRACES_DIR = Path(__file__).resolve().parent
TRACE_FILES = ("azure_llm_2023_code.csv", "azure_llm_2023_conv.csv", "mooncake_conversation.jsonl")


def trace_path(name_or_path: str | Path) -> Path:
    """An existing file as given, else the shipped trace of that name."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path) not in TRACE_FILES:
        return path
    return TRACES_DIR / str(name_or_path)
