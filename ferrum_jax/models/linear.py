"""The one linear layer every projection goes through: float, int8 (per channel or grouped) or
int4 weights, an optional bias, and the tensor-parallel split its declaration implies.

Parameters: `weight [in..., out...]` (quantized: integer codes, see quantization), `scale` beside
it when quantized, `bias [out...]` when declared. The declaration (models.declare) gives the
shape, how many leading axes are inputs, and whether tensor parallelism splits the outputs
("column") or the inputs ("row"), which the grouped Pallas kernels need (grouped_kernels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.declare import BIAS, WEIGHT, Declarations
from ferrum_jax.models.quantization import Quantization, project, quantize


class Linear(nnx.Module):
    def __init__(self, decls: Declarations, path: str, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        """`path`: the layer's declared path without `.weight` (`layers.attn.wq`)."""
        decl = decls[path + WEIGHT]
        self.n_in, self.parallel, self.dtype = decl.n_in, decl.parallel, dtype
        w = jax.random.normal(rngs.params(), decl.shape, jnp.float32) / math.prod(decl.shape[: decl.n_in]) ** 0.5
        if quant is None:
            self.weight, self.scale = nnx.Param(w.astype(dtype)), None
        else:
            ints, scale = quantize(w, decl.n_in, quant)
            self.weight, self.scale = nnx.Param(ints), nnx.Param(scale)
        bias = decls.get(path + BIAS)
        self.bias = None if bias is None else nnx.Param(jnp.zeros(bias.shape, dtype))

    def __call__(self, x_tk: jax.Array, backend=None, out_dtype=None) -> jax.Array:
        """`x_tk [tokens, K]` (K the flattened inputs) -> `[tokens, out...]`. backend: the step's
        AttentionBackend (whether grouped codes take a Pallas kernel)."""
        y = project(x_tk, self.weight, self.scale, self.n_in, self.dtype, out_dtype=out_dtype, backend=backend, parallel=self.parallel)
        return y if self.bias is None else y + self.bias[...]
