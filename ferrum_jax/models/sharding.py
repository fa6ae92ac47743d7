"""Megatron-style tensor parallelism as shardings over a `("data", "model")` Mesh.

The families declare each parameter's logical axes (models.declare); here they meet the mesh.
Column-parallel q/k/v/gate/up (their output axis on "model"), row-parallel o/down (their
input axis on "model", so XLA adds one all-reduce after attention and one after the MLP),
embedding and lm_head split over the vocabulary (padded to a multiple of the TP size when it
does not divide, see vocab_padding), KV pages split over KV heads. Norms are
replicated on purpose: they are tiny and every shard needs them whole.

When tensor_parallel_size exceeds the KV-head count (and is a multiple of it), k/v weights are
replicated on every model shard (each shard computes all KV heads) and the KV pages hold one row
per shard, the KV head its query heads read (`kv_rows`). Per-layer parameters are stacked along
a leading layer axis, which is never sharded. The "data" axis (size 1 here) leaves room for
replicas.

Expert parallelism (`expert_parallel`, vLLM's `--enable-expert-parallel`) splits a mixture of
experts' stacks over "model" by expert instead of by their inner width: each shard holds whole
experts, `num_experts / tp` of them, and the MoE layer runs its shard's experts for every token
(models.moe). Attention stays tensor-parallel.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import LAYER_PREFIX, SCALE
from ferrum_jax.models.registry import declarations
from ferrum_jax.models.scale_sharding import scale_spec

MESH_AXES = ("data", "model")


def make_mesh(tensor_parallel_size: int) -> Mesh:
    devices = jax.devices()
    if tensor_parallel_size < 1 or tensor_parallel_size > len(devices):
        raise FerrumError.invalid_config(
            f"tensor_parallel_size={tensor_parallel_size}: {len(devices)} {jax.default_backend()} devices are visible"
        )
    grid = np.asarray(devices[:tensor_parallel_size]).reshape(1, tensor_parallel_size)
    return Mesh(grid, MESH_AXES)


def kv_heads_sharded(cfg: ModelConfig, tp: int) -> bool:
    """True if KV heads split over the model axis; False if they are replicated."""
    if cfg.num_kv_heads % tp == 0:
        return True
    if tp % cfg.num_kv_heads == 0:
        return False
    raise FerrumError.invalid_config(
        f"tensor_parallel_size={tp} neither divides nor is a multiple of num_key_value_heads={cfg.num_kv_heads}"
    )


def check_divisible(cfg: ModelConfig, tp: int, expert_parallel: bool = False) -> None:
    if expert_parallel and cfg.num_experts % tp:
        raise FerrumError.invalid_config(
            f"enable_expert_parallel with num_experts={cfg.num_experts}: the experts do not divide over "
            f"tensor_parallel_size={tp} devices (each shard holds whole experts, as many on every shard)")
    for name, value in [
        ("num_attention_heads", cfg.num_heads),
        ("intermediate_size", cfg.intermediate_size),
        ("moe_intermediate_size", 0 if expert_parallel else cfg.moe_intermediate_size),
    ]:
        if value % tp:
            raise FerrumError.invalid_config(f"{name}={value} is not divisible by tensor_parallel_size={tp}")
    kv_heads_sharded(cfg, tp)


def param_specs(cfg: ModelConfig, tp: int, params: dict, expert_parallel: bool = False) -> dict[str, P]:
    """PartitionSpec of every flat parameter path (see param_tree) -> array or ShapeDtypeStruct,
    from the declared logical axes (models.declare); expert stacks split by expert with
    `expert_parallel`. A quantized weight's `scale` follows its weight (scale_sharding.scale_spec)."""
    check_divisible(cfg, tp, expert_parallel)
    decls = declarations(cfg)
    mesh_axes = {"vocab": "model", "heads": "model", "kv_heads": "model" if kv_heads_sharded(cfg, tp) else None, "ffn": "model", "experts": None, None: None}

    def layer_spec(path: str) -> P:
        if path.endswith(SCALE):
            weight = decls.weight_of(path)
            stacked = weight.per_layer
            n_out = len(weight.shape) - weight.n_in
            # int8 per channel `[out...]`, grouped int8 `[groups, out...]`, int4 `[groups, 2, out...]`.
            inner = len(params[path].shape) - stacked - n_out - 1
            groups = params[path].shape[stacked] if inner >= 0 else None
            return scale_spec(layer_spec(weight.path), weight.n_in, groups, tp, inner)
        decl = decls.get(path)
        if decl is None:
            raise FerrumError.internal(f"parameter {path} is not declared by the {cfg.architecture} family")
        axes = [mesh_axes[a] for a in decl.axes]
        if expert_parallel and decl.axes[:1] == ("experts",):
            axes = ["model", *(None for _ in axes[1:])]
        # Replicated parameters get P(), the spec the other layouts compare equal to.
        return P(*axes) if any(axes) else P()

    return {path: P(None, *layer_spec(path)) if path.startswith(LAYER_PREFIX) else layer_spec(path) for path in params}


def kv_rows(cfg: ModelConfig, tp: int) -> int:
    """Leading axis of the KV pages: the KV heads, or one row per shard when heads replicate."""
    return cfg.num_kv_heads if kv_heads_sharded(cfg, tp) else tp


def kv_spec(tp: int) -> P:
    """KV pages `[kv_rows, layers * num_pages, page_size, head_dim]`, rows split over "model".

    Without tensor parallelism this is P(), the sharding the step hands the donated pages back
    with: a ("model", ...) spec over a 1-device axis compares unequal to it, so the first program
    would be traced again once fed its own output."""
    return P() if tp == 1 else P("model", None, None, None)


def kv_scale_spec(tp: int) -> P:
    """Scales of narrow KV pages, `[kv_rows, layers]`: rows split as the pages' rows are."""
    return P() if tp == 1 else P("model", None)


def named(mesh: Mesh, specs: dict[str, P]) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, v) for k, v in specs.items()}
