"""The demo models shipped inside the package, so chatscale serves something with no download.

Three checkpoints in Hugging Face format share one byte-level BPE tokenizer and ChatML template:
`target` (Llama, GQA, ~13M parameters: the default model), `draft` (a 2-layer Llama, the target's
speculative-decoding draft) and `moe` (Mixtral, 8 experts, top-2). They are trained from scratch by
tools/demo_models/ on generated conversations; see each folder's README.md and docs/demo_models.md.
Demos and tests only.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODELS = ("target", "draft", "moe")


def demo_model_path(name: str = "target") -> Path:
    """Directory of the shipped demo model `name` (one of DEMO_MODELS)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; choose one of: {', '.join(DEMO_MODELS)}")
    path = DEMO_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: demo model {name!r} is missing; rebuild it with tools/demo_models/train.py --model {name}"
        )
    return path
