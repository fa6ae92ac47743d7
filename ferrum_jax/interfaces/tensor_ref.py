"""`TensorRef`: the tensor type the interfaces pass around (Rust `crate::TensorRef`).

Any array with `.shape` that supports numpy-style indexing: a `jax.Array` on the
accelerator, or a `numpy.ndarray` in tests and on the host. Kept as a plain alias so the
interfaces never import jax and stay usable on machines without an accelerator stack.
"""

from __future__ import annotations

from typing import Any, TypeAlias

TensorRef: TypeAlias = Any
