"""A vocabulary the tensor-parallel degree does not divide, padded as vLLM's vocab-parallel
embedding pads it.

The embedding `[vocab, hidden]` and lm_head `[hidden, vocab]` split their vocabulary axis over
the "model" mesh axis, and a JAX array splits only evenly, so under tensor parallelism `tp`
they hold `padded_vocab(vocab, tp)` rows: the vocabulary rounded up to a multiple of `tp`.
Checkpoints (HF, GGUF, orbax) hold the real vocabulary: loading pads with zeros, saving cuts the
padding off, so a checkpoint is independent of the `tp` it was saved at. No token id reaches a
padded embedding row (ids are checked against the real vocabulary), and the model cuts the
padded logit columns off before anything samples or returns them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ferrum_jax.models.declare import Declarations


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def unpadded_shape(decls: Declarations, path: str, shape: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """`shape` of parameter `path` with its declared vocabulary axis (if any) at the real
    vocabulary; a quantized weight's scales end with its output axes, so they follow it."""
    axis = decls.vocab_axis(path)
    if axis is None:
        return tuple(shape)
    out = list(shape)
    out[axis] = vocab_size
    return tuple(out)


def unpad(decls: Declarations, flat: dict[str, jax.Array], vocab_size: int) -> dict[str, jax.Array]:
    """The parameters with the padding rows cut off (what a checkpoint stores)."""
    out = {}
    for k, v in flat.items():
        axis = decls.vocab_axis(k)
        out[k] = v if axis is None else jax.lax.slice_in_dim(v, 0, vocab_size, axis=axis % v.ndim)
    return out


def pad_zeros(value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`value` zero-padded at the end of each axis to `shape` (traceable)."""
    if tuple(value.shape) == tuple(shape):
        return value
    return jnp.pad(value, [(0, want - have) for have, want in zip(value.shape, shape)])


def pad_to(value: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    """`value` zero-padded to `shape`, placed with `sharding` (the padded, vocabulary-split layout)."""
    if tuple(value.shape) == tuple(shape):
        return jax.device_put(value, sharding)
    return jax.jit(lambda x: pad_zeros(x, shape), out_shardings=sharding)(value)
