"""Rotary position embeddings (HF `rotate_half` convention) with linear and llama3 scaling.

Inverse frequencies are computed once on the host in float32, the same arithmetic HF uses,
so angles agree with transformers to float32 rounding even at long positions.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ferrum_jax.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies after the configured scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions_t: jnp.ndarray, inv_freq) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin `[tokens, head_dim]` in float32 for integer `positions_t` `[tokens]`."""
    freqs_tf = positions_t.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    emb_td = jnp.concatenate([freqs_tf, freqs_tf], axis=-1)
    return jnp.cos(emb_td), jnp.sin(emb_td)


def apply_rope(x_tnh: jnp.ndarray, cos_td: jnp.ndarray, sin_td: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x_tnh` `[tokens, heads, head_dim]`; math in float32, result in x's dtype."""
    x = x_tnh.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_td[:, None, :] + rotated * sin_td[:, None, :]
    return out.astype(x_tnh.dtype)
