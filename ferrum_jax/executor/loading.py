"""Parameters for `from_pretrained`: a HF directory or a ferrum orbax checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.checkpoint import checkpoint_dtype, is_ferrum_checkpoint, restore_checkpoint
from ferrum_jax.models.config import ModelConfig
from jax.sharding import Mesh

from ferrum_jax.models.param_tree import abstract_model, flatten_state, param_shardings, unflatten_into
from ferrum_jax.models.weights import load_hf_params


def load_params(path: Path, dtype: str, mesh: Mesh, progress: bool = True):
    """Returns (config, graphdef, state) with every parameter on device in `dtype`, placed
    shard by shard in its tensor-parallel layout over `mesh`."""
    if not path.is_dir():
        raise FerrumError.invalid_config(f"model path {path} is not a directory")
    cfg = ModelConfig.from_hf_dir(path)
    graphdef, abstract = abstract_model(cfg, jnp.dtype(dtype))
    expected = flatten_state(abstract)
    shardings = param_shardings(cfg, mesh, abstract)
    if is_ferrum_checkpoint(path):
        stored = checkpoint_dtype(path)
        if stored != dtype:
            raise FerrumError.invalid_config(f"checkpoint {path} holds {stored} parameters, {dtype} was requested")
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in expected.items()}
        flat = restore_checkpoint(path, target)
    else:
        flat = load_hf_params(path, expected, shardings, tied_embeddings=cfg.tie_word_embeddings, progress=progress)
    return cfg, graphdef, unflatten_into(abstract, flat)
