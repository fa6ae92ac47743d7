"""What the executor's "auto" options become on a platform: dtype, attention, step token budget.

Each takes the platform the programs compile for — the mesh's devices — rather than reading the
process's default backend, so `python -m ferrum_jax.aot` on a CPU host compiling for a TPU or GPU
gets exactly what a server on that chip would run.
"""

from __future__ import annotations

import math

import jax

from ferrum_jax.batch.step_cost import StepCost, model_step_cost
from ferrum_jax.chips import chip_of
from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.param_tree import flatten_state
from ferrum_jax.models.registry import declarations

ATTENTION_CHOICES = ("auto", "xla", "pallas")
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def on_accelerator(platform: str | None = None) -> bool:
    return (platform or jax.default_backend()) in ACCELERATORS


def default_dtype(platform: str | None = None) -> str:
    """bfloat16 on accelerators; float32 on CPU, where XLA's bfloat16 matmuls are ~15x slower."""
    return "bfloat16" if on_accelerator(platform) else "float32"


def resolve_attention(attention: str, platform: str | None = None) -> str:
    """The `AttentionBackend.kind` for `attention` on `platform`."""
    if attention not in ATTENTION_CHOICES:
        raise FerrumError.invalid_config(f"attention={attention!r} is not one of {ATTENTION_CHOICES}")
    if attention == "auto":
        return "pallas" if on_accelerator(platform) else "xla"
    if attention == "pallas" and not on_accelerator(platform):
        return "pallas_interpret"
    return attention


def default_max_num_batched_tokens(platform: str | None = None) -> int:
    """2048 on accelerators; 512 on CPU, where a step's cost grows with every token in it."""
    return 2048 if on_accelerator(platform) else 512


def step_cost(cfg: ModelConfig, state, device) -> StepCost:
    """The bucketing cost model (batch.step_cost) of `cfg` with parameters `state` (arrays or
    ShapeDtypeStructs: their bytes, quantized or not) on `device`'s chip; a CPU, or a chip
    missing from ferrum_jax.chips, gets no roofline."""
    decls = declarations(cfg)
    nbytes = {path: jax.dtypes.itemsize_bits(x.dtype) * math.prod(x.shape) // 8 for path, x in flatten_state(state).items()}
    experts = sum(n for path, n in nbytes.items() if decls.is_expert_stack(path))
    chip = chip_of(device.device_kind) if on_accelerator(device.platform) else None
    return model_step_cost(decls.layer_matmul_parameters(), cfg.hidden_size * cfg.vocab_size, sum(nbytes.values()),
                           chip.bf16_tflops * 1e12 if chip else None, chip.hbm_gbps * 1e9 if chip else None,
                           experts, cfg.experts_per_token / cfg.num_experts if cfg.num_experts else 0.0)
