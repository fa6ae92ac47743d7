"""The imperative executor: `JaxModelExecutor` and its KV handles."""

from ferrum_jax.executor.jax_executor import JaxModelExecutor
from ferrum_jax.executor.sequence_table import PagedKvCacheHandle

__all__ = ["JaxModelExecutor", "PagedKvCacheHandle"]
