"""The engine's one hook into structured outputs: every call the step loop makes, in one class.

Per request: `start` compiles its grammar on the compiler's thread while the request waits outside
the scheduler; `ready` hands back requests whose grammar is built, each sequence with its own
`GrammarState` (`seq.grammar`). Per step:
  1. `check_proposals`: speculative proposals cut at the first token the grammar refuses
     (a draft model's proposals never contain one: `mask_draft` masks its logits too);
  2. `fill_masks` starts filling the step's bitmask on a worker thread while the forward runs:
     one row per logits row of a constrained sequence, i.e. for a speculating sequence a row for
     each of its k+1 verified positions (the grammar advanced over the proposals, then rolled back);
  3. `apply`: after the forward, disallowed logits become -inf before sampling and verification;
  4. `accept`: each token the engine appends advances its sequence's grammar.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from chatscale.engine.sequence import Sequence
from chatscale.engine.structured.bitmask import allocate_bitmask, apply_bitmask
from chatscale.engine.structured.compiler import CompiledGrammar, GrammarCompiler

log = logging.getLogger("chatscale.engine")


@dataclass
class StepMasks:
    """A step's bitmask: row i masks logits row `rows[i]`."""

    bitmask: torch.Tensor
    rows: list[int]


class StructuredOutputs:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], threads: int = 2) -> None:
        self.compiler = GrammarCompiler(tokenizer_json, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        self._threads = threads
        self._executor = None  # llguidance's mask filler, made on first use
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._pending: dict[str, tuple[Future[CompiledGrammar], list[Sequence]]] = {}

    # ---- requests -----------------------------------------------------------------------------
    def start(self, request_id: str, seqs: list[Sequence]) -> None:
        self._pending[request_id] = (self.compiler.compile(seqs[0].params.structured), seqs)

    def ready(self) -> list[tuple[list[Sequence], BaseException | None]]:
        """Requests whose grammar finished compiling: (sequences, None) with `seq.grammar` set, or
        (sequences, the compile error)."""
        done = []
        for request_id, (future, seqs) in list(self._pending.items()):
            if future.done():
                del self._pending[request_id]
                error = future.exception()
                if error is None:
                    grammar = future.result()
                    for seq in seqs:
                        seq.grammar = grammar.new_state()
                done.append((seqs, error))
        return done

    def wait(self, timeout: float = 0.05) -> None:
        """Block until a pending grammar compiles (the engine has nothing else to do)."""
        if self._pending:
            future = next(iter(self._pending.values()))[0]
            try:
                future.exception(timeout=timeout)
            except TimeoutError:
                pass

    def abort(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ---- steps --------------------------------------------------------------------------------
    @staticmethod
    def check_proposals(proposals: dict) -> None:
        """Cut each constrained sequence's proposal at the first token its grammar refuses: the
        target would reject it anyway (its masked probability is 0), so it is not worth verifying.
        Exact only for deterministic proposals (n-gram); draft models are masked while proposing."""
        for seq, proposal in proposals.items():
            if seq.grammar is not None and proposal.tokens:
                keep = seq.grammar.valid_prefix(proposal.tokens)
                if keep < len(proposal.tokens):
                    proposal.tokens = proposal.tokens[:keep]
                    proposal.probs = None if proposal.probs is None else proposal.probs[:keep]

    def fill_masks(self, rows: list[tuple[Sequence, int, list[int]]]) -> Future[StepMasks] | None:
        """Start filling the masks of `(sequence, first logits row, proposed tokens)`; the rows of a
        sequence are its first row and one per proposal. Runs on a worker thread (llguidance drops
        the GIL), so it overlaps the forward pass; None when no row is constrained."""
        constrained = [(seq, row, tokens) for seq, row, tokens in rows if seq.grammar is not None]
        if not constrained:
            return None
        return self._filler.submit(self._fill, constrained)

    def _fill(self, constrained: list[tuple[Sequence, int, list[int]]]) -> StepMasks:
        logits_rows, plain, speculative = [], [], []
        for seq, row, tokens in constrained:
            if tokens:
                speculative.append((seq.grammar.matcher, len(logits_rows), tokens))
            else:
                plain.append((seq.grammar.matcher, len(logits_rows)))
            logits_rows += range(row, row + len(tokens) + 1)
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(self._threads)
        bitmask = allocate_bitmask(len(logits_rows), self.vocab_size)
        where = (bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, *where)
        if speculative:  # row K: the mask now; row K + i + 1: after the first i + 1 proposals
            self._executor.unsafe_compute_mask_ptr_with_draft_token(speculative, *where)
        return StepMasks(bitmask, logits_rows)

    @staticmethod
    def apply(logits: torch.Tensor, masks: Future[StepMasks] | None) -> None:
        if masks is not None:
            m = masks.result()
            with torch.inference_mode():  # the runner's logits are inference tensors
                apply_bitmask(logits, m.bitmask, m.rows)

    # ---- the draft model's proposals ----------------------------------------------------------
    def mask_draft(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Mask a draft step's logits (one row per sequence) by each grammar's state, which the
        proposer moves over the tokens proposed so far and rolls back afterwards."""
        constrained = [(seq, row, []) for row, seq in enumerate(seqs) if seq.grammar is not None]
        if constrained:  # the draft's next step needs these at once: nothing to overlap with
            m = self._fill(constrained)
            with torch.inference_mode():
                apply_bitmask(logits, m.bitmask, m.rows)

    # ---- bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def accept(seq: Sequence, token: int) -> bool:
        """Advance `seq`'s grammar over a token the engine appended; False if the grammar refused
        it (only possible when something after the mask overrode it, e.g. min_tokens banning EOS)."""
        if seq.grammar is None or seq.grammar.accept([token]):
            return True
        log.warning("request %s: token %d breaks its grammar (%s)", seq.request_id, token, seq.grammar.error)
        return False
