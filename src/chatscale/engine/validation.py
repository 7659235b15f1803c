"""Checks a request must pass before it is queued, run where the request arrives (the server's
process, or the offline engine), so a bad request fails fast with its own error and never reaches
a step. They need only the engine's shape (EngineInfo), not the engine."""

from __future__ import annotations

from chatscale.engine.errors import ContextLengthError, InvalidRequestError
from chatscale.engine.messages import EngineInfo
from chatscale.engine.sampling_params import SamplingParams


def check_request(info: EngineInfo, ids: list[int], params: SamplingParams, prompt_noun: str = "messages") -> None:
    """Raise InvalidRequestError or ContextLengthError for a request that cannot be served; fill in
    `params.max_tokens` (None: the rest of the context) in place."""
    if not ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    vocab = info.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
    for name, ids_ in (("logit_bias", [int(t) for t in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids_ if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab})", name)
    if params.max_tokens is None:
        params.max_tokens = max(1, info.max_model_len - len(ids))
    total = len(ids) + params.max_tokens
    if total > info.max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {info.max_model_len} tokens. However, you requested "
            f"{total} tokens ({len(ids)} in the {prompt_noun}, {params.max_tokens} in the completion). "
            f"Please reduce the length of the {prompt_noun} or completion."
        )
    if -(-total // info.block_size) > info.num_blocks:
        raise ContextLengthError(
            f"The request needs {total} tokens of KV cache but the cache holds only "
            f"{info.num_blocks * info.block_size}; reduce the prompt or max_tokens."
        )


class EngineFront:
    """What the side that takes requests knows from EngineInfo alone, without asking the engine:
    its limits, the checkpoint's sampling defaults, and the checks a request must pass."""

    info: EngineInfo

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, overridden by the caller."""
        return SamplingParams(**{**self.info.sampling_defaults, **overrides})

    def check_request(self, ids: list[int], params: SamplingParams, prompt_noun: str = "messages") -> None:
        check_request(self.info, ids, params, prompt_noun)
