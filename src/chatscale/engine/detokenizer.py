"""Incremental detokenization with stop strings.

`tokenizers.DecodeStream` turns each new token into its text in one step (it holds back a token that
ends inside a multi-byte character, and is primed with the prompt's last tokens so the first output
token gets its spacing right). On top of it, the last `len(longest stop) - 1` characters are held
back until they cannot be the start of a stop string, so a stop string never leaks into a stream
even when it spans several tokens.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from chatscale.models.tokenizer import Tokenizer

_CONTEXT_TOKENS = 6  # prompt tokens the stream is primed with


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str],
                 include_stop: bool = False, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer.hf
        self._stream = DecodeStream(ids=list(prompt_ids[-_CONTEXT_TOKENS:]), skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.stopped_by: str | None = None
        self._sent = 0

    def add(self, token_id: int) -> None:
        """Append one token's text; sets `stopped_by` if a stop string now appears."""
        delta = self._stream.step(self._tok, token_id)
        if not delta:
            return  # an incomplete character, or a token with no text
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        if not self.stop:
            return
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
