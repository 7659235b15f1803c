"""Log-probabilities in OpenAI's two shapes: chat's `content: [{token, logprob, bytes, top_logprobs}]`
and the legacy completions lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

import re

from chatscale.engine.messages import TokenLogprobs
from chatscale.models.tokenizer import Tokenizer
from chatscale.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as one printable character; this inverts it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's spelling of a raw byte


def _bytes(tokenizer: Tokenizer, token_id: int, text: str) -> list[int]:
    """The token's own bytes. A token holding part of a UTF-8 character decodes to U+FFFD on its
    own; OpenAI's `bytes` field exists so clients can join such pieces, so recover them."""
    if "\ufffd" in text:
        piece = tokenizer.id_to_token(token_id) or ""
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return [int(match.group(1), 16)]
        if piece and all(c in _BYTE_LEVEL for c in piece):
            return [_BYTE_LEVEL[c] for c in piece]
    return list(text.encode())


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = tokenizer.token_text(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=_bytes(tokenizer, token_id, text))


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs] | None) -> ChatLogprobs | None:
    if lps is None:
        return None
    return ChatLogprobs(content=[
        TokenLogprob(**_top(tokenizer, lp.token_id, lp.logprob).model_dump(),
                     top_logprobs=[_top(tokenizer, i, v) for i, v in lp.top])
        for lp in lps
    ])


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs] | None,
                        offset: int) -> tuple[CompletionLogprobs | None, int]:
    """The legacy shape, and the text offset after these tokens (streams continue from it)."""
    if lps is None:
        return None, offset
    tokens = [tokenizer.token_text(lp.token_id) for lp in lps]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [{tokenizer.token_text(i): v for i, v in lp.top} for lp in lps]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=top,
                              text_offset=offsets), offset
