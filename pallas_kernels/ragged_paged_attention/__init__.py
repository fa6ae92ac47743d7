"""Ragged paged attention: one flat batch of new tokens from many sequences over paged KV."""

from pallas_kernels.ragged_paged_attention.dispatch import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.xla import ragged_paged_attention_xla

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "ragged_paged_attention_xla"]
