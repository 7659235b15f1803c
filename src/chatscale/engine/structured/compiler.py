"""Grammar compilation off the engine loop: a worker thread, results cached by spec.

Compiling builds an llguidance matcher for the model's vocabulary (under a millisecond for typical
schemas on SmolLM2's 49,152 tokens, see docs/benchmarks.md); each sequence then gets a cheap copy
of the cached one. llguidance releases the GIL while it compiles, so the engine thread keeps stepping.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from chatscale.engine.structured.spec import GrammarError, GrammarSpec, check
from chatscale.engine.structured.state import GrammarState

if TYPE_CHECKING:
    import llguidance


class CompiledGrammar:
    """A matcher at the grammar's start; `new_state()` copies it for one sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids

    def new_state(self) -> GrammarState:
        return GrammarState(self._matcher.deep_copy(), self._eos)


class GrammarCompiler:
    """`compile(spec)` returns a Future; the same spec twice shares one compilation (LRU, `capacity`)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], capacity: int = 512) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use, in the worker
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[GrammarSpec, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        self.hits = self.misses = 0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            import llguidance  # imported where used: an engine serving no grammar never needs it

            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self._vocab_size,
                                                     eos_token=self._eos)
        return self._tokenizer

    def compile(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        with self._lock:
            future = self._cache.get(spec)
            if future is not None and not (future.done() and future.exception()):
                self._cache.move_to_end(spec)
                self.hits += 1
                return future
            self.misses += 1
            future = self._pool.submit(self._build, spec)
            self._cache[spec] = future
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return future

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, check(spec))
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return CompiledGrammar(matcher, frozenset(self._eos))
