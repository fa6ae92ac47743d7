"""Model presets from `configs/<name>.yaml`: a HF-style model config, a seed for the random
weights, and executor options. The `tiny` preset (the test model) needs no files beyond this repo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.registry import model_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    hf_config: dict
    seed: int
    executor_options: dict


def load_preset(name: str) -> Preset:
    path = CONFIG_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not _is_preset(raw):
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if _is_preset(yaml.safe_load(p.read_text())))
        raise FerrumError.invalid_config(f"unknown preset {name!r}; known presets: {known}")
    return Preset(
        name=name,
        model=model_config(raw["model"]),
        hf_config=raw["model"],
        seed=int(raw.get("seed", 0)),
        executor_options=dict(raw.get("executor", {})),
    )


def _is_preset(raw) -> bool:
    """Model presets hold a `model:` mapping; serving configs in the same folder do not."""
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict)
