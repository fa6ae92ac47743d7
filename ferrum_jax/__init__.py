"""ferrum_jax: a JAX/XLA executor for decoder-only LLMs (Llama, Mistral, Qwen2/Qwen3)
implementing ferrum's ModelExecutor interface. See DESIGN.md for the layers."""

from ferrum_jax.default_model import DEFAULT_MODEL_NAME, default_model_path
from ferrum_jax.executor import JaxModelExecutor, PagedKvCacheHandle
from ferrum_jax.interfaces import *  # noqa: F403 — the interface types are the public API
from ferrum_jax.interfaces import __all__ as _interface_names
from ferrum_jax.models.config import ModelConfig

__all__ = [
    "DEFAULT_MODEL_NAME", "JaxModelExecutor", "ModelConfig", "PagedKvCacheHandle", "default_model_path", *_interface_names,
]  # fmt: skip
__version__ = "0.1.0"
