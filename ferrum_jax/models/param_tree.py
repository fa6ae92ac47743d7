"""Flat `{"layers.0.attn.wq": array}` views of the model's NNX state.

Flat dotted paths are what the HF name table targets, what orbax stores (string keys only)
and what sharding rules match, so one conversion serves all three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.causal_lm import CausalLM
from ferrum_jax.models.config import ModelConfig


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """graphdef and an abstract state (ShapeDtypeStructs): no parameter memory is touched."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def random_model(cfg: ModelConfig, dtype, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    model = jax.jit(lambda: nnx.split(CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1])()
    graphdef, _ = abstract_model(cfg, dtype)
    return graphdef, model


def flatten_state(state: nnx.State) -> dict[str, jax.Array]:
    out = {}

    def walk(prefix: str, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", nnx.to_pure_dict(state))
    return out


def unflatten_into(abstract_state: nnx.State, flat: dict[str, jax.Array]) -> nnx.State:
    """Returns `abstract_state` with every leaf replaced from `flat` (same paths)."""
    pure = nnx.to_pure_dict(abstract_state)

    def fill(prefix: str, node):
        if isinstance(node, dict):
            return {k: fill(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()}
        return flat[prefix]

    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, fill("", pure))
    return state


def state_nbytes(state: nnx.State) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
