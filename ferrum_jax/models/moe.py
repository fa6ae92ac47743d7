"""Sparse mixture-of-experts MLP: each token through its top-k experts, no token ever dropped.

Routing as transformers computes it (Qwen3-MoE, Mixtral): router logits in the model dtype,
softmax in float32, top-k, the k weights renormalized to sum to 1 where the model says
(`norm_topk_prob`; Mixtral always), then used in the model dtype (Qwen3-MoE) or float32
(Mixtral) to scale each expert's output before the outputs are summed per token.

Experts are stacked gated MLPs: `gate/up [experts, hidden, ffn]`, `down [experts, ffn, hidden]`.
Every way to run them is dropless (an expert takes as many tokens as choose it), chosen by the
step's static shape and the platform:
- gathered (fewer token-expert pairs than the alternative reads experts: decode): each pair
  gathers its expert's weights from the stack, so the step reads only the experts tokens chose;
- grouped, TPU/GPU: the pairs sorted by expert, every expert's rows one group of
  `jax.lax.ragged_dot` (XLA's ragged dot instruction there), the outputs unsorted and summed;
- in place, CPU, up to `KERNEL_MAX_ROWS_PER_EXPERT` pairs an expert on average (decode): the
  C++ kernel (pallas_kernels.expert_mlp) streams each chosen expert's weights once from the
  stack, where XLA:CPU would write every gathered slice out before its dot;
- blocked, CPU, larger steps or without a C++ compiler: XLA:CPU has no ragged dot (jax lowers it to a dense product of every row with
  every expert, masked: 64x the FLOPs at 64 experts), so the sorted pairs are laid out in
  blocks of `block` rows, each expert's rows padded to whole blocks, and each block multiplies
  its expert's weights (gathered per block): at most `num_experts x (block - 1)` padding rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.expert_mlp.cpu_kernel import expert_mlp_cpu, kernel_supports, target_name as cpu_kernel_target

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import Declarations
from ferrum_jax.models.layer_slice import LayerSlice
from ferrum_jax.models.mlp import ACTIVATIONS
from ferrum_jax.models.quantization import Quantization

PARAMS = ("router", "gate", "up", "down")
# Above this many token-expert pairs per expert the CPU kernel's axpy loops stop beating the
# blocked form's dots (`python -m ferrum_jax.bench moe-forms`: 1.7x faster at 32, even at 64).
KERNEL_MAX_ROWS_PER_EXPERT = 32


class SparseMoE(nnx.Module):
    """`[tokens, hidden] -> [tokens, hidden]`; parameters `layers.mlp.{router, gate, up, down}`."""

    def __init__(self, cfg: ModelConfig, decls: Declarations, *, dtype, rngs: nnx.Rngs, quant: Quantization | None = None):
        if quant is not None:
            raise FerrumError.unsupported(
                f"quantization={quant.method!r} of a mixture-of-experts model: expert weights are float only for now")
        self.k, self.norm_topk, self.float32_weights = cfg.experts_per_token, cfg.norm_topk_prob, cfg.moe_float32_weights
        self.hidden_act = cfg.hidden_act
        for name in PARAMS:
            shape = decls[f"layers.mlp.{name}"].shape
            w = jax.random.normal(rngs.params(), shape, jnp.float32) / shape[-2] ** 0.5
            setattr(self, name, nnx.Param(w.astype(dtype)))

    def __call__(self, x_td: jax.Array, backend=None) -> jax.Array:
        """backend: the step's AttentionBackend (its platform picks the grouped form)."""
        logits_te = x_td @ self.router[...]
        probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
        weights_tk, experts_tk = jax.lax.top_k(probs_te, self.k)
        if self.norm_topk:
            weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
        if not self.float32_weights:
            weights_tk = weights_tk.astype(x_td.dtype)
        experts, act = tuple(w.get_value() for w in (self.gate, self.up, self.down)), ACTIVATIONS[self.hidden_act]
        pairs, num_experts = experts_tk.size, self.gate.shape[0]
        platform = jax.default_backend() if backend is None else backend.platform
        if platform == "cpu":
            if pairs <= KERNEL_MAX_ROWS_PER_EXPERT * num_experts and self._cpu_kernel(x_td):
                return _in_place_cpu(x_td, experts_tk, weights_tk, experts, None if backend is None else backend.mesh)
            block = row_block(pairs, num_experts)
            if pairs <= num_blocks(pairs, num_experts, block):
                return _gathered(x_td, experts_tk, weights_tk, experts, act)
            return _blocked(x_td, experts_tk, weights_tk, experts, act, block)
        if pairs < num_experts:
            return _gathered(x_td, experts_tk, weights_tk, experts, act)
        return _grouped(x_td, experts_tk, weights_tk, experts, act)

    def _cpu_kernel(self, x_td: jax.Array) -> bool:
        return kernel_supports(x_td.dtype, self.gate.dtype, self.hidden_act) and cpu_kernel_target() is not None


def row_block(pairs: int, num_experts: int) -> int:
    """Rows a block of the blocked form holds: about half an expert's average share of the pairs
    (fewer padding rows against fewer gathered weights), a power of two from 8 to 64."""
    return min(64, max(8, 1 << max(0, (pairs // (2 * num_experts)).bit_length() - 1)))


def num_blocks(pairs: int, num_experts: int, block: int) -> int:
    """The blocks that hold `pairs` sorted rows with every expert's group padded to whole blocks."""
    return -(-(pairs + num_experts * (block - 1)) // block)


def _combine(y_nd: jax.Array, weights_n: jax.Array, token_n: jax.Array, num_tokens: int, dtype) -> jax.Array:
    """Each pair's output scaled by its routing weight, summed per token."""
    y_nd = (y_nd * weights_n[:, None]).astype(dtype)
    return jnp.zeros((num_tokens, y_nd.shape[1]), dtype).at[token_n].add(y_nd)


def _grouped(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    t, k = experts_tk.shape
    gate, up, down = (w[...] for w in experts)
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    x_nd = x_td[token]
    h_nf = act(jax.lax.ragged_dot(x_nd, gate, sizes)) * jax.lax.ragged_dot(x_nd, up, sizes)
    y_nd = jax.lax.ragged_dot(h_nf, down, sizes)
    return _combine(y_nd, weights_tk.reshape(-1)[order], token, t, x_td.dtype)


def _blocked(x_td, experts_tk, weights_tk, experts, act, block: int) -> jax.Array:
    t, k = experts_tk.shape
    num_experts = experts[0].shape[0]
    pairs = t * k
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert_of = flat[order]  # of each sorted pair
    sizes = jnp.bincount(flat, length=num_experts)
    padded = -(-sizes // block) * block
    ends = jnp.cumsum(padded)
    # Sorted pair i of expert e lands at row (e's padded start) + (i - e's first sorted pair).
    row = (ends - padded)[expert_of] + jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert_of]
    nb = num_blocks(pairs, num_experts, block)
    token_of_row = jnp.full(nb * block, t, jnp.int32).at[row].set(order // k)  # t: a zero row
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(nb) * block, side="right"), num_experts - 1)
    x_brd = jnp.concatenate([x_td, jnp.zeros_like(x_td[:1])])[token_of_row].reshape(nb, block, -1)
    gate, up, down = (_expert_rows(w, block_expert) for w in experts)
    h_brf = act(jnp.einsum("brd,bdf->brf", x_brd, gate)) * jnp.einsum("brd,bdf->brf", x_brd, up)
    y_rd = jnp.einsum("brf,bfd->brd", h_brf, down).reshape(nb * block, -1)
    return _combine(y_rd[row], weights_tk.reshape(-1)[order], order // k, t, x_td.dtype)


def _expert_rows(w, chosen: jax.Array) -> jax.Array:
    """`[pairs, ...]`: the chosen experts of a stack, read from it where it lies (a LayerSlice's
    layer of the stacked decoder weights: one gather, not the layer's whole slice first)."""
    if isinstance(w, LayerSlice):
        return w.stack[w.index, chosen]
    return w[...][chosen]


def _in_place_cpu(x_td, experts_tk, weights_tk, experts, mesh) -> jax.Array:
    """The CPU kernel over the layer's stacks in place; under tensor parallelism each shard runs
    it on its slice of the experts' inner width and the partial outputs are summed."""
    stacks = [w.stack if isinstance(w, LayerSlice) else w[...][None] for w in experts]
    layer = experts[0].index if isinstance(experts[0], LayerSlice) else jnp.int32(0)
    args = (x_td.astype(jnp.float32), experts_tk, weights_tk.astype(jnp.float32), layer, *stacks)
    tp = 1 if mesh is None else mesh.shape["model"]
    if tp == 1:
        return expert_mlp_cpu(*args).astype(x_td.dtype)
    run = lambda *a: jax.lax.psum(expert_mlp_cpu(*a), "model")  # noqa: E731
    ffn_in, ffn_out = P(None, None, None, "model"), P(None, None, "model", None)
    specs = (P(), P(), P(), P(), ffn_in, ffn_in, ffn_out)
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(*args).astype(x_td.dtype)


def _gathered(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    t, k = experts_tk.shape
    flat = experts_tk.reshape(-1)
    gate, up, down = (_expert_rows(w, flat) for w in experts)
    x_nd = jnp.repeat(x_td, k, axis=0)
    h_nf = act(jnp.einsum("nd,ndf->nf", x_nd, gate)) * jnp.einsum("nd,ndf->nf", x_nd, up)
    y_nd = jnp.einsum("nf,nfd->nd", h_nf, down)
    return _combine(y_nd, weights_tk.reshape(-1), jnp.repeat(jnp.arange(t), k), t, x_td.dtype)
