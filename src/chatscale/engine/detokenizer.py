"""Incremental detokenization with stop strings.

Text is emitted only once it is final: a token that ends inside a multi-byte character (decoded
as U+FFFD) waits for the next one, and the last `len(longest stop) - 1` characters are held back
until they cannot be the start of a stop string, so a stop string never leaks into a stream even
when it spans several tokens.
"""

from __future__ import annotations

from chatscale.models.tokenizer import Tokenizer

_CONTEXT_TOKENS = 6  # prompt tokens decoded along, so the first output token gets its spacing right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str],
                 include_stop: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.stopped_by: str | None = None
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> None:
        """Append one token's text; sets `stopped_by` if a stop string now appears."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character or a merge still in progress
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        hits = [(at, s) for s in self.stop if (at := self.text.find(s, search_from)) != -1]
        if hits:
            at, s = min(hits)  # the earliest stop string wins
            self.text = self.text[: at + len(s) if self.include_stop else at]
            self.stopped_by = s

    def flush(self, finished: bool) -> str:
        """New final text since the last call; everything once the sequence has finished."""
        end = len(self.text) if finished or self.stopped_by else max(self._sent, len(self.text) - self.holdback)
        delta = self.text[self._sent: end]
        self._sent = end
        return delta
