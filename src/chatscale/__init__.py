"""chatscale: serve a chat LLM to many users on a scarce, multi-region GPU fleet."""

from chatscale.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):
    # The torch-backed parts load on first use, so light commands (plan, tokens) stay fast.
    if name == "LLM":
        from chatscale.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from chatscale.engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "EngineConfig":
        from chatscale.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
