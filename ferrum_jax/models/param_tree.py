"""Flat `{"layers.attn.wq.weight": array}` views of the model's NNX state (per-layer parameters stacked).

Flat dotted paths are what the HF name table targets, what orbax stores (string keys only)
and what sharding rules match, so one conversion serves all three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ferrum_jax.models.causal_lm import CausalLM
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import Declarations, scale_path
from ferrum_jax.models.quantization import Quantization, float_shape, quantize
from ferrum_jax.models.registry import declarations
from ferrum_jax.models.sharding import named, param_specs
from ferrum_jax.models.vocab_padding import pad_zeros, padded_vocab


def abstract_model(cfg: ModelConfig, dtype, tp: int = 1, quant: Quantization | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """graphdef and an abstract state (ShapeDtypeStructs) for tensor parallelism `tp` (which
    pads the vocabulary, see vocab_padding) and weight quantization `quant`: no parameter
    memory is touched."""
    rows = padded_vocab(cfg.vocab_size, tp)
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0), vocab_rows=rows, quant=quant))
    graphdef, state = nnx.split(model)
    _check_declared(cfg, rows, flatten_state(state), quant)
    return graphdef, state


def _check_declared(cfg: ModelConfig, rows: int, flat: dict[str, jax.ShapeDtypeStruct], quant: Quantization | None) -> None:
    """The model's parameters are exactly its family's declarations (and the scales quantization
    adds), at the declared shapes: a module and its family's table cannot drift apart."""
    decls = declarations(cfg, rows)
    want = {d.path for d in decls} | ({scale_path(d.path) for d in decls if d.n_in is not None} if quant else set())
    problems = sorted(set(flat) ^ want)
    for d in decls:
        shape = flat[d.path].shape if d.path in flat else None
        full = (cfg.num_layers, *d.shape) if d.per_layer else d.shape
        if shape is not None and (quant is None or d.n_in is None) and tuple(shape) != full:
            problems.append(f"{d.path}: module shape {tuple(shape)}, declared {full}")
    if problems:
        raise FerrumError.internal(f"the {cfg.architecture} model's parameters differ from its declarations: {problems}")


def param_shardings(cfg: ModelConfig, mesh: Mesh, abstract_state: nnx.State, expert_parallel: bool = False) -> dict[str, NamedSharding]:
    """Flat path -> NamedSharding for tensor (and expert) parallelism over the mesh's "model" axis."""
    paths = flatten_state(abstract_state)
    return named(mesh, param_specs(cfg, mesh.shape["model"], paths, expert_parallel))


def random_model(cfg: ModelConfig, dtype, seed: int, mesh: Mesh, quant: Quantization | None = None,
                 expert_parallel: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """Seeded random weights, each parameter created directly in its sharded layout. The values
    do not depend on the mesh: a padded vocabulary's rows are zeros after the seeded ones.
    Quantized, they are the quantization of the float model of the same seed."""
    graphdef, abstract = abstract_model(cfg, dtype, mesh.shape["model"], quant)
    shardings = unflatten_into(abstract, param_shardings(cfg, mesh, abstract, expert_parallel))
    padded = flatten_state(abstract)

    def make():
        flat = flatten_state(nnx.split(CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1])
        if quant is not None:
            flat = quantize_flat(declarations(cfg), flat, padded, quant)
        return unflatten_into(abstract, {k: pad_zeros(v, padded[k].shape) for k, v in flat.items()})

    return graphdef, jax.jit(make, out_shardings=shardings)()


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


def quantize_flat(decls: Declarations, flat: dict[str, jax.Array], padded: dict[str, jax.ShapeDtypeStruct], quant: Quantization) -> dict[str, jax.Array]:
    """A float flat state's linear weights quantized (in a program); padded vocabularies are
    padded first, as the quantized layout expects."""
    out = dict(flat)
    for path in flat:
        decl = decls.weight_of(path)
        if decl is not None and decl.path == path and scale_path(path) in padded:
            n_in = decl.n_in + decl.per_layer
            w = pad_zeros(flat[path], float_shape(padded[path].shape, n_in, padded[path].dtype == jnp.uint8))
            quantizer = lambda x: quantize(x, decl.n_in, quant)  # noqa: E731
            out[path], out[scale_path(path)] = jax.vmap(quantizer)(w) if decl.per_layer else quantizer(w)
    return out


def state_nbytes(state: nnx.State) -> int:
    """Parameter bytes as stored (int4 at half a byte, packed or `uint4`)."""
    return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(state))
