"""One layer of a stacked parameter, left unsliced until something reads it.

The decoder layers' parameters are stacked `[num_layers, ...]` and the layer loop hands each
module its layer (causal_lm). XLA fuses a dynamic slice of the stack into the dots that consume
it, but not into a custom call: before a Pallas kernel it writes the layer out (a copy of every
quantized weight per layer and step on GPU; on TPU a retiled copy of narrow codes). So the loop
gives modules `LayerSlice`s: indexing one (`param[...]`) slices as before, while the grouped
kernels (grouped_kernels) take `stack` and `index` and read the layer in place.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSlice:
    stack: jax.Array  # [num_layers, ...]
    index: jax.Array  # [] int32, the layer

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    @property
    def dtype(self):
        return self.stack.dtype

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    def __getitem__(self, key) -> jax.Array:
        return self.stack[self.index][key]
