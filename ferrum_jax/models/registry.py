"""Architectures -> model families: HF `architectures` / `model_type`, GGUF
`general.architecture`, and `ModelConfig.architecture` tags.

Adding a family is one module under models.families and one entry in `FAMILIES`. Anything the
registry does not know is a `FerrumError` naming it and listing what is supported.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import Declarations
from ferrum_jax.models.families.gemma import GEMMA
from ferrum_jax.models.families.llama import LLAMA
from ferrum_jax.models.families.moe import MOE
from ferrum_jax.models.family import Family

FAMILIES: tuple[Family, ...] = (LLAMA, GEMMA, MOE)


def _table(field: str) -> dict[str, tuple[Family, str]]:
    return {key: (f, tag) for f in FAMILIES for key, tag in getattr(f, field).items()}


def supported_architectures() -> list[str]:
    return sorted(_table("architectures"))


def resolve_hf(d: dict[str, Any]) -> tuple[Family, str]:
    """(family, tag) of a HF config dict: its first `architectures` entry, else its `model_type`."""
    archs = d.get("architectures") or []
    by_arch = _table("architectures")
    for arch in archs:
        if arch in by_arch:
            return by_arch[arch]
    if archs:
        raise FerrumError.unsupported(f"architecture {archs[0]!r} is not supported; supported: {supported_architectures()}")
    by_type = _table("model_types")
    model_type = d.get("model_type")
    if model_type in by_type:
        return by_type[model_type]
    raise FerrumError.unsupported(f"model_type {model_type!r} is not supported; supported: {sorted(by_type)}")


def resolve_gguf(arch: str, path, has_experts: bool = False) -> tuple[Family, str]:
    """(family, tag) of a GGUF `general.architecture`, of a file with experts or without."""
    with_experts = _table("gguf_expert_architectures")
    if has_experts and arch in with_experts:
        return with_experts[arch]
    by_gguf = _table("gguf_architectures")
    if arch not in by_gguf:
        raise FerrumError.unsupported(f"GGUF architecture {arch!r} in {path} is not supported; supported: {sorted(by_gguf)}")
    return by_gguf[arch]


def family(cfg: ModelConfig) -> Family:
    for f in FAMILIES:
        if cfg.architecture in f.architectures.values():
            return f
    raise FerrumError.unsupported(f"model architecture tag {cfg.architecture!r} belongs to no family")


def model_config(d: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a HF config dict, parsed by its family."""
    fam, tag = resolve_hf(d)
    return fam.config(d, tag)


def model_config_from_dir(path: str | Path) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FerrumError.invalid_config(f"no config.json in {path}")
    return model_config(json.loads(cfg_path.read_text()))


@functools.lru_cache(maxsize=64)
def declarations(cfg: ModelConfig, vocab_rows: int | None = None) -> Declarations:
    """The parameters of `cfg`'s family for it; vocab_rows: the vocabulary axis padded for tensor
    parallelism (None: the vocabulary)."""
    return Declarations(family(cfg).declare(cfg, vocab_rows or cfg.vocab_size), cfg.num_layers, cfg.experts_per_token)
