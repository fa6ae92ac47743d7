"""What a model family provides (models.families), and the registry's view of it (models.registry).

A family is one module: its HF config parsing, its parameter declarations (models.declare) and
its decoder block. Everything else — loading from every format, sharding, quantization,
parameter counts, the compile-only sizing — works from those three.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import ParamDecl


@dataclasses.dataclass(frozen=True)
class Family:
    """architectures / model_types: HF `architectures` entries and
    `model_type`s it reads, each to the `ModelConfig.architecture` tag it gives (the tag names
    the variant: `qwen2` inside the Llama family); gguf_architectures: GGUF
    `general.architecture` -> tag.

    config(hf dict, tag) -> ModelConfig; declare(cfg, vocab_rows) -> the parameters (vocab_rows:
    the vocabulary axis, padded for tensor parallelism); block: the decoder layer module,
    `block(cfg, decls, dtype=, rngs=, quant=)` called as `(h_td, rope, k_pages, v_pages, meta,
    backend, window, k_scale, v_scale) -> (h_td, k_pages, v_pages)`.

    gguf_expert_architectures: GGUF `general.architecture` -> tag for files with experts
    (`{arch}.expert_count` > 0) only, taking precedence over `gguf_architectures` (llama.cpp writes
    Mixtral as `llama`).

    GGUF quirks of llama.cpp's converters: gguf_permuted_tags, the tags whose q/k rows are
    permuted for llama.cpp's rotary layout; gguf_norms_plus_one, norm weights stored as w + 1.
    gguf_model_type: tag -> the HF `model_type` a GGUF file of that tag becomes (default the tag);
    gguf_config(key, base) -> the HF config fields the family reads from its own GGUF keys
    (`key(name, default)` reads `{arch}.{name}`), on top of the common ones in `base`.
    hf_rename: a checkpoint's tensor name -> the declared HF name, or None for a tensor the
    family does not load (a vision tower beside a text model); None: names are as declared.
    """

    architectures: dict[str, str]
    model_types: dict[str, str]
    gguf_architectures: dict[str, str]
    config: Callable[[dict[str, Any], str], ModelConfig]
    declare: Callable[[ModelConfig, int], list[ParamDecl]]
    block: type
    gguf_expert_architectures: dict[str, str] = dataclasses.field(default_factory=dict)
    gguf_permuted_tags: tuple[str, ...] = ()
    gguf_norms_plus_one: bool = False
    gguf_model_type: dict[str, str] = dataclasses.field(default_factory=dict)
    gguf_config: Callable[[Callable, dict], dict] | None = None
    hf_rename: Callable[[str], str | None] | None = None
