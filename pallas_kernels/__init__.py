"""Attention kernels for ferrum_jax, importable on their own (they depend on jax only).

ragged_paged_attention: one flat batch of new tokens from many sequences attending over a paged
KV cache, dispatched to a Mosaic TPU kernel, a Triton GPU kernel or a jnp reference (see
ragged_paged_attention/dispatch.py; layout and semantics in ragged_paged_attention/reference.py).
"""

from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]
