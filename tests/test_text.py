"""Token counting and splitting: the guarantees hold on arbitrary Unicode, checked with hypothesis."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatscale.cli import main
from chatscale.models.demo import demo_model_path
from chatscale.models.tokenizer import Tokenizer
from chatscale.text import count_tokens, split_text

TOK = Tokenizer.from_dir(demo_model_path("target"))

# Arbitrary code points (multi-byte ones included), and prose-like text with real boundaries.
words = st.sampled_from(["KV", "cache", "batch", "token", "naïve", "日本語", "🎉", "x" * 30, "1234", "a"])
separators = st.sampled_from([" ", " ", " ", ". ", "! ", "\n", "\n\n", ", ", "\t"])
prose = st.lists(st.tuples(words, separators), max_size=80).map(lambda ps: "".join(w + s for w, s in ps))
texts = st.one_of(st.text(max_size=300), prose)


def n(text: str) -> int:
    return count_tokens(TOK, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, max_tokens=st.integers(4, 48), data=st.data())
def test_split_budget_coverage_order_overlap(text: str, max_tokens: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, max_tokens - 1), label="overlap")
    chunks = split_text(TOK, text, max_tokens, overlap)
    if not text:
        assert chunks == []
        return
    # Budget: every chunk, encoded on its own, fits; the reported count is the real one.
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert c.n_tokens == n(c.text) <= max_tokens
    # Coverage and order: from the first character to the last, each chunk starting inside the
    # previous one (or right after it) and moving forward.
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.start < nxt.start <= prev.end < nxt.end
        shared = text[nxt.start:prev.end]
        # Overlap: at most `overlap` tokens, none when none is asked for, and some whenever the
        # last character fits in it with room to move on (a code point is at most 4 byte tokens).
        assert n(shared) <= overlap
        if overlap == 0:
            assert shared == ""
        elif overlap >= 4 and overlap + 4 <= max_tokens:
            assert shared != ""
    # The pieces between chunk starts rebuild the document exactly.
    starts = [c.start for c in chunks] + [len(text)]
    assert "".join(text[a:b] for a, b in zip(starts, starts[1:])) == text


def test_split_prefers_paragraphs_then_sentences() -> None:
    para = "The KV cache stores keys and values. It grows with every token."
    text = "\n\n".join([para] * 6)
    chunks = split_text(TOK, text, max_tokens=n(para) * 2 + 4, overlap=0)
    assert len(chunks) > 1
    assert all(c.text.rstrip().endswith("token.") for c in chunks)
    # A budget smaller than a paragraph cuts after a sentence instead.
    chunks = split_text(TOK, text, max_tokens=n(para) - 2, overlap=0)
    assert all(c.text.rstrip().endswith(".") for c in chunks)


def test_split_rejects_bad_budgets() -> None:
    with pytest.raises(ValueError):
        split_text(TOK, "abc", max_tokens=4, overlap=4)
    with pytest.raises(ValueError, match="alone needs more"):
        split_text(TOK, "🎉", max_tokens=1)


def test_count_text_and_chat() -> None:
    msgs = [{"role": "user", "content": "What is a KV cache?"}]
    assert count_tokens(TOK, "What is a KV cache?") == len(TOK.encode("What is a KV cache?"))
    assert count_tokens(TOK, msgs) == len(TOK.encode_chat(msgs))
    # The template adds role markers and the generation prompt around the content.
    assert count_tokens(TOK, msgs) > count_tokens(TOK, msgs, add_generation_prompt=False) > n(msgs[0]["content"])


def test_cli_count_and_split(tmp_path, capsys) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("Batching matters. " * 40 + "\n\n" + "日本語のテキスト。" * 10, encoding="utf-8")
    assert main(["tokens", "count", str(doc)]) == 0
    assert int(capsys.readouterr().out) == n(doc.read_text(encoding="utf-8"))

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert main(["tokens", "count", str(chat), "--chat"]) == 0
    assert int(capsys.readouterr().out) == count_tokens(TOK, [{"role": "user", "content": "hi"}])

    assert main(["tokens", "split", str(doc), "--max-tokens", "32", "--overlap", "8"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) > 2
    assert all(r["n_tokens"] <= 32 for r in rows) and rows[-1]["end"] == len(doc.read_text(encoding="utf-8"))
