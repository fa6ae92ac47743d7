"""Attention kernels for ferrum_jax, importable on their own (they depend on jax only).

ragged_paged_attention: one flat batch of new tokens from many sequences attending over a paged
KV cache, dispatched to a Mosaic TPU kernel, a Triton GPU kernel, a blocked XLA path (CPU) or a jnp reference (see
ragged_paged_attention/dispatch.py; layout and semantics in ragged_paged_attention/reference.py).
"""

from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_xla

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "ragged_paged_attention_xla"]
