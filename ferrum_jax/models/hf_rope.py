"""RoPE parameters from a HF config dict, in both transformers spellings.

4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`, which for models with
per-layer-type RoPE (Gemma 3) is a dict keyed by layer type. What this cannot express exactly
(another rope_type, partial rotary) is a `FerrumError` naming it.
"""

from __future__ import annotations

from typing import Any

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ROPE_TYPES, RopeConfig


def rope_from_params(params: dict[str, Any], default_theta: float) -> RopeConfig:
    """A RoPE from one parameter dict (`rope_theta`, `rope_type` or `type`, scaling fields)."""
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise FerrumError.unsupported(f"rope_type={rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise FerrumError.unsupported(f"partial_rotary_factor={params['partial_rotary_factor']}: only 1.0 is implemented")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    """The one RoPE of a config: `rope_parameters` (5.x) over `rope_scaling` (4.x), `rope_theta`
    at the top level for 4.x."""
    merged = {**dict(d.get("rope_scaling") or {}), **dict(d.get("rope_parameters") or {})}
    if "partial_rotary_factor" in d:
        merged.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    return rope_from_params(merged, float(d.get("rope_theta", 10000.0)))


def rope_by_layer_type(d: dict[str, Any], global_theta: float, local_theta: float) -> tuple[RopeConfig, RopeConfig]:
    """(full-attention RoPE, sliding-window RoPE) of a config with per-layer-type RoPE: 5.x's
    `rope_parameters` keyed by layer type, or 4.x's `rope_theta` + `rope_scaling` for global
    layers and `rope_local_base_freq` (default RoPE) for local ones."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
        if unknown:
            raise FerrumError.unsupported(f"rope_parameters for layer types {unknown} are not supported")
        return (
            rope_from_params(params.get("full_attention") or {}, global_theta),
            rope_from_params(params.get("sliding_attention") or {}, local_theta),
        )
    full = rope_from_params({**dict(d.get("rope_scaling") or {}), **params}, float(d.get("rope_theta", global_theta)))
    return full, RopeConfig(theta=float(d.get("rope_local_base_freq", local_theta)))
