"""A roofline for each compiled step program: the HBM bytes and FLOPs it must move and do, what it
moves beyond that, and the step time and tokens/s they predict on the target chip.

Per device, for a step of T tokens in S sequences (T/S new tokens each) that each hold
`context_len` tokens of KV:
  weights      every parameter the device holds, read once; of a mixture of experts' stacks only
               what the step's T x k token-expert pairs gather (all experts from T x k = E on);
  kv read      each sequence's context once per layer (a sliding-window layer its window);
  kv written   T tokens' K and V in every layer;
  logits       the float32 logits rows the step returns;
  activations  what a layer must write per token (hidden states, q/k/v, the attention output,
               the MLP's gate/up/product), written once and read back once;
  excess       every other byte the program writes (aot.hlo_traffic: each instruction's
               result, loop bodies times their trip counts), written and read back: copies of
               weights out of the layer stack, relayouts, spills; and what async copies bring
               into TPU VMEM (weights already read once).
Predicted time: the larger of (weights + kv read + 2 x everything written + VMEM fills) / HBM
bandwidth and
FLOPs / the bf16 peak (weight-only quantized matmuls compute in bf16). FLOPs: 2 x the matmul
parameters a device holds (the decoder layers' linear weights, the lm_head on the logits rows)
per token, plus the attention's 4 x heads x head_dim x context per token and layer. Beside them,
`hlo_dot_flops` is what the program's dots and convolutions do and `kernel_flops` what its Pallas
kernels estimate for themselves (hlo_traffic; the attention kernel at half the table's capacity,
pallas_kernels.cost). Their sum is the compiled program's own count: for prefill steps it matches
the FLOPs above (tests/test_aot.py); below 128 tokens XLA:TPU writes matvecs as multiply-reduce
fusions, which it does not count, so the sum is a lower bound there.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ferrum_jax.aot.hlo_traffic import traffic
from ferrum_jax.aot.programs import CompiledProgram, Limits
from ferrum_jax.aot.targets import Target
from ferrum_jax.batch.buckets import BucketSpec
from ferrum_jax.kv.pages import kv_cache_dtype
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.registry import declarations
from ferrum_jax.models.sharding import kv_rows


def _activation_bytes_per_token(cfg: ModelConfig, tp: int, itemsize: int) -> int:
    """What one layer writes per token that it must: residual stream, norms, projections' outputs."""
    per_layer = (8 * cfg.hidden_size + (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // tp
                 + 3 * cfg.intermediate_size // tp)  # fmt: skip
    return cfg.num_layers * per_layer * itemsize


@dataclasses.dataclass(frozen=True)
class DeviceWeights:
    """The parameter bytes one device holds, and the part of them in expert stacks."""

    total: int
    experts: int = 0

    def read_by(self, cfg: ModelConfig, tokens: int) -> int:
        """What a step of `tokens` (padding included: padding rows route too) must read: the dense
        weights, and of the experts what its token-expert pairs gather (models.moe)."""
        if not cfg.num_experts:
            return self.total
        share = min(1.0, tokens * cfg.experts_per_token / cfg.num_experts)
        return self.total - self.experts + round(self.experts * share)


def program_roofline(cfg: ModelConfig, limits: Limits, target: Target, program: CompiledProgram,
                     weights: DeviceWeights, context_len: int, served: tuple[int, int] | None = None) -> dict:
    """The roofline of one step program (see the module docstring); bytes and FLOPs per device.
    served: the (tokens, sequences) of the batch run in it (default: the bucket's); padding
    tokens and rows are computed, but only served sequences read KV and only served tokens count
    in tokens/s."""
    shape = program.shape
    tokens, seqs, rows = shape.tokens, shape.seqs, shape.logit_rows
    served_tokens, seqs = served or (tokens, seqs)
    tp = limits.tensor_parallel_size
    itemsize = jnp.dtype(limits.dtype).itemsize
    kv_token = 2 * (kv_rows(cfg, tp) // tp) * cfg.head_dim * kv_cache_dtype(limits.kv_cache_dtype, limits.dtype).itemsize
    context_tokens = sum(min(context_len, w or context_len) for w in cfg.sliding_windows)
    kv_read = seqs * context_tokens * kv_token
    kv_written = tokens * cfg.num_layers * kv_token
    logits = rows * cfg.vocab_size * 4
    activations = tokens * _activation_bytes_per_token(cfg, tp, itemsize)
    weight_bytes = weights.read_by(cfg, tokens)
    t = traffic(program.hlo)
    excess_written = max(0, t.written_bytes - kv_written - logits - activations)
    excess = 2 * excess_written + t.vmem_fill_bytes
    hbm = weight_bytes + kv_read + 2 * t.written_bytes + t.vmem_fill_bytes
    attention_flops = 4 * (cfg.num_heads // tp) * cfg.head_dim * served_tokens * (
        context_tokens + cfg.num_layers * served_tokens // seqs)
    flops = 2 * tokens * declarations(cfg).layer_matmul_parameters() / tp + 2 * rows * cfg.vocab_size * cfg.hidden_size / tp + attention_flops
    memory_s = hbm / (target.chip.hbm_gbps * 1e9)
    compute_s = flops / (target.chip.bf16_tflops * 1e12)
    step_s = max(memory_s, compute_s)
    return {
        "program": f"{program.kind}_{program.bucket}",
        "tokens": served_tokens,
        "seqs": seqs,
        "weight_bytes": weight_bytes,
        "kv_read_bytes": kv_read,
        "kv_written_bytes": kv_written,
        "logits_bytes": logits,
        "activation_bytes": 2 * activations,
        "excess_bytes": excess,
        "excess_of_weights": round(excess / weight_bytes, 4),
        "hbm_bytes": hbm,
        "flops": flops,
        "hlo_dot_flops": t.dot_flops,
        "kernel_flops": t.kernel_flops,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "predicted_ms": round(step_s * 1e3, 4),
        "predicted_tokens_per_s": round(served_tokens / step_s, 1),
        "largest_writes": [f"{k}: {b} B x {n}" for k, b, n in t.largest_writes[:4]],
    }


def decode_rooflines(cfg: ModelConfig, limits: Limits, target: Target, programs: list[CompiledProgram],
                     buckets: BucketSpec, weights: DeviceWeights, context_len: int) -> dict[str, dict]:
    """Decode steps of one token in each of 1 and max_num_seqs sequences, in the program that
    serves them (a bucket may pad them: batch.buckets), where it was compiled."""
    out = {}
    for n in (1, limits.max_num_seqs):
        shape = buckets.shape_for(n, n, all_rows=False)
        program = next((p for p in programs if p.shape == shape), None)
        if program is not None:
            out[f"decode_{n}"] = program_roofline(cfg, limits, target, program, weights, context_len, (n, n))
    return out
