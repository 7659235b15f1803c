"""Token counting and token-aware splitting of long documents (the `chatscale tokens` command).

Limits, costs and context windows are all counted in tokens of one particular tokenizer, so these
tools take the tokenizer of the model that will read the text. `split_text` cuts a document into
chunks of at most `max_tokens` tokens, with about `overlap` tokens repeated between neighbours (so a
sentence cut at a chunk's end is still seen whole by the next one). Cuts prefer paragraph, then
sentence, then word boundaries; they fall on character offsets, so never inside a multi-byte
character. Every chunk is re-encoded on its own to check its budget: BPE token counts of a piece of
text are not simply the count of the tokens it spans in the whole document.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol


class TextTokenizer(Protocol):
    """What the token tools need from a tokenizer (chatscale.models.tokenizer.Tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class Chunk:
    """`text == document[start:end]`, and it is `n_tokens` tokens long on its own."""

    start: int
    end: int
    n_tokens: int
    text: str


def count_tokens(
    tokenizer: TextTokenizer, text_or_messages: str | list[dict[str, Any]], add_generation_prompt: bool = True
) -> int:
    """Tokens of a string (content only, no BOS), or of a chat as the model's template renders it."""
    if isinstance(text_or_messages, str):
        return len(tokenizer.encode(text_or_messages, add_special_tokens=False))
    return len(tokenizer.encode_chat(text_or_messages, add_generation_prompt=add_generation_prompt))


# Cut candidates, coarsest first: each pattern's match ends are offsets where a new unit starts.
_BOUNDARIES = (
    re.compile(r"\n[^\S\n]*\n\s*"),  # paragraph: a blank line
    re.compile(r"[.!?\u3002\uff01\uff1f\u2026]+[\"'\u201d\u2019)\]]*\s+"),  # sentence end, then space
    re.compile(r"\s+"),  # word
)


def _boundaries(text: str) -> list[Sequence[int]]:
    """Sorted cut offsets per level: paragraph, sentence, word, then every character. The end of the
    text is a boundary of every level."""
    levels: list[Sequence[int]] = [sorted({m.end() for m in p.finditer(text)} | {len(text)}) for p in _BOUNDARIES]
    return [*levels, range(len(text) + 1)]


def _last_fitting(cands: Sequence[int], fits: Callable[[int], bool]) -> int:
    """Binary search for the last candidate that fits; the first one is known to fit.

    `fits` is treated as monotone (true, then false). BPE counts are nearly but not exactly monotone,
    so the result is always one that was actually checked, which is what the guarantees need.
    """
    lo, hi = 0, len(cands)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(cands[mid]):
            lo = mid
        else:
            hi = mid
    return cands[lo]


def _cut(levels: list[Sequence[int]], first: int, last: int, anchor: int, fits: Callable[[int], bool]) -> int | None:
    """The offset in [first, last] farthest from `anchor` that fits, preferring coarse boundaries as
    long as they keep at least half of the reach a character cut would have."""
    best: int | None = None
    reach = 0
    for cands in reversed(levels):  # characters first: they give the reach to compare with
        window = cands[bisect.bisect_left(cands, first) : bisect.bisect_right(cands, last)]
        if anchor > last:  # searching backwards, away from the anchor
            window = window[::-1]
        if not window or not fits(window[0]):
            continue
        pos = _last_fitting(window, fits)
        if best is None:
            best, reach = pos, abs(pos - anchor)
        elif 2 * abs(pos - anchor) >= reach:
            best = pos
    return best


def split_text(tokenizer: TextTokenizer, text: str, max_tokens: int, overlap: int = 0) -> list[Chunk]:
    """Chunks of at most `max_tokens` tokens that cover `text` in order, neighbours sharing a stretch
    of at most `overlap` tokens (as much as boundaries allow). An empty text gives no chunks."""
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(f"need max_tokens >= 1 and 0 <= overlap < max_tokens (got {max_tokens}, {overlap})")

    def n_tokens(a: int, b: int) -> int:
        return len(tokenizer.encode(text[a:b], add_special_tokens=False))

    levels = _boundaries(text)
    chunks: list[Chunk] = []
    start = end = 0
    while end < len(text):
        # Bound the search: double the window until it no longer fits (or reaches the end).
        span = 4 * max_tokens
        while start + span < len(text) and n_tokens(start, start + span) <= max_tokens:
            span *= 2
        # Each chunk must end past the previous one, so the document is covered in order.
        cut = _cut(levels, end + 1, min(len(text), start + span), start, lambda e: n_tokens(start, e) <= max_tokens)
        if cut is None:
            raise ValueError(f"the character at offset {start} alone needs more than {max_tokens} tokens")
        end = cut
        chunks.append(Chunk(start, end, n_tokens(start, end), text[start:end]))
        next_start = end
        if overlap and end < len(text):
            back = _cut(levels, start + 1, end - 1, end, lambda b: n_tokens(b, end) <= overlap)
            # Keep the overlap only if the next chunk can still move past `end` with it.
            if back is not None and n_tokens(back, end + 1) <= max_tokens:
                next_start = back
        start = next_start
    return chunks


def _load_tokenizer(model: str | None) -> TextTokenizer:
    from chatscale.models.demo import demo_model_path
    from chatscale.models.packaged import resolve_model
    from chatscale.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model(model) if model else demo_model_path("target"))


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")


def _chat_messages(text: str, name: str) -> list[dict]:
    """A JSON chat: a list of messages, or an object with "messages"."""
    try:
        chat = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not valid JSON ({exc})") from exc
    messages = chat.get("messages") if isinstance(chat, dict) else chat
    if not isinstance(messages, list):
        raise ValueError(f'{name}: a chat is a JSON list of messages, or an object with "messages"')
    return messages


def run_cli(args: argparse.Namespace) -> int:
    """`chatscale tokens count|split`: prints a count, or one JSON chunk per line."""
    tok = _load_tokenizer(args.model)
    text = _read(args.file)
    if args.tokens_command == "count":
        if args.chat:
            print(count_tokens(tok, _chat_messages(text, args.file)))
        else:
            print(count_tokens(tok, text))
        return 0
    for i, chunk in enumerate(split_text(tok, text, args.max_tokens, args.overlap)):
        print(json.dumps({"index": i, **asdict(chunk)}, ensure_ascii=False))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `chatscale tokens count FILE` and `chatscale tokens split FILE ...`."""
    p = sub.add_parser("tokens", help="count tokens of a file or chat, or split a document into chunks")
    tsub = p.add_subparsers(dest="tokens_command", required=True)
    count = tsub.add_parser("count", help="print the number of tokens of FILE ('-' for stdin)")
    split = tsub.add_parser("split", help="split FILE into chunks of at most N tokens (JSON lines)")
    for q in (count, split):
        q.add_argument("file", metavar="FILE")
        q.add_argument("--model", default=None,
                       help="model directory, .gguf file or smollm2, whose tokenizer counts (default: demo target)")
    count.add_argument("--chat", action="store_true",
                       help="FILE is a JSON chat (a list of messages, or {\"messages\": [...]}): count with the template")
    split.add_argument("--max-tokens", type=int, required=True, help="token budget of each chunk")
    split.add_argument("--overlap", type=int, default=0, help="tokens repeated between neighbours (at most)")
    p.set_defaults(func=run_cli)
