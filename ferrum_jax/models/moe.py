"""Sparse mixture-of-experts MLP: each token through its top-k experts, no token ever dropped.

Routing as transformers computes it (Qwen3-MoE, Mixtral): router logits in the model dtype,
softmax in float32, top-k, the k weights renormalized to sum to 1 where the model says
(`norm_topk_prob`; Mixtral always), then used in the model dtype (Qwen3-MoE) or float32
(Mixtral) to scale each expert's output before the outputs are summed per token.

Experts are stacked gated MLPs: `gate/up [experts, hidden, ffn]`, `down [experts, ffn, hidden]`.
Every way to run them is dropless (an expert takes as many tokens as choose it), chosen by the
step's static shape and the platform:
- gathered or looped (fewer token-expert pairs than experts: decode), so the step reads only
  the experts tokens chose: each pair gathers its expert's weights from the stack, or on TPU,
  where a shard's experts are whole tiles, a loop over the pairs slices each expert in place
  (XLA:TPU turned a gather of such large slices into slices of the whole stack);
- grouped, TPU/GPU: the pairs sorted by expert, every expert's rows one group of
  `jax.lax.ragged_dot` (XLA's ragged dot instruction there), the outputs unsorted and summed;
- in place, CPU: the C++ kernel (pallas_kernels.expert_mlp) reads each chosen expert's weights
  from the stack where they lie, where XLA:CPU writes every gathered slice out before its dot
  (`python -m ferrum_jax.bench moe-forms`: 1.7x faster than the gathered form at 1 token, 4x
  at 8, 1.8-2.5x faster than the blocked form from 128 to 1024 tokens);
- gathered or blocked, CPU without a C++ compiler (or not float32 SiLU experts): XLA:CPU has
  no ragged dot (jax lowers it to a dense product of every row with every expert, masked: 64x
  the FLOPs at 64 experts), so the sorted pairs are laid out in blocks of `block` rows, each
  expert's rows padded to whole blocks, and each block multiplies its expert's weights
  (gathered per block): at most `num_experts x (block - 1)` padding rows.

Under tensor parallelism every shard holds every expert's slice of the inner width; under expert
parallelism (models.sharding) whole experts, and each shard runs the same forms over its own
experts, the other shards' picks shifted out of range (`_expert_parallel`).
"""

from __future__ import annotations

import functools

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
        """backend: the step's AttentionBackend (its platform picks the form, its mesh and
        `expert_parallel` how the stacks are split)."""
        logits_te = x_td @ self.router[...]
        probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
        weights_tk, experts_tk = jax.lax.top_k(probs_te, self.k)
        if self.norm_topk:
            weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
        if not self.float32_weights:
            weights_tk = weights_tk.astype(x_td.dtype)
        experts = tuple(w.get_value() for w in (self.gate, self.up, self.down))
        platform = jax.default_backend() if backend is None else backend.platform
        if backend is not None and backend.expert_parallel:
            run = functools.partial(self._experts, platform=platform, mesh=None, gather=False)
            return _expert_parallel(run, x_td, experts_tk, weights_tk, experts, backend.mesh)
        return self._experts(x_td, experts_tk, weights_tk, experts, platform, None if backend is None else backend.mesh)

    def _experts(self, x_td, experts_tk, weights_tk, experts, platform: str, mesh, gather: bool = True) -> jax.Array:
        """The form for this step's shape and platform (module docstring); expert ids outside
        the stacks' `[0, experts)` add nothing. gather False: never the gathered form on TPU/GPU
        (an expert-parallel shard's: XLA:TPU turned its gather of whole experts into slices of the
        whole stack, 656 GiB a Qwen3-30B-A3B decode step on a v6e-8, where the grouped form reads
        the shard's experts once)."""
        act = ACTIVATIONS[self.hidden_act]
        pairs, num_experts = experts_tk.size, experts[0].shape[0]
        if platform == "cpu":
            if self._cpu_kernel(x_td):
                return _in_place_cpu(x_td, experts_tk, weights_tk, experts, mesh)
            block = row_block(pairs, num_experts)
            if pairs <= num_blocks(pairs, num_experts, block):
                return _gathered(x_td, experts_tk, weights_tk, experts, act)
            return _blocked(x_td, experts_tk, weights_tk, experts, act, block)
        tp = 1 if mesh is None else mesh.shape["model"]
        if platform == "tpu" and pairs < num_experts and _whole_tiles(experts, tp):
            return _looped(x_td, experts_tk, weights_tk, experts, act)
        if gather and pairs < num_experts:
            return _gathered(x_td, experts_tk, weights_tk, experts, act)
        return _grouped(x_td, experts_tk, weights_tk, experts, act)

    def _cpu_kernel(self, x_td: jax.Array) -> bool:
        return kernel_supports(x_td.dtype, self.gate.dtype, self.hidden_act) and cpu_kernel_target() is not None


def _stacks(experts) -> tuple[list[jax.Array], jax.Array]:
    """The whole `[layers, experts, ...]` stacks of a layer's experts and the layer's index (a
    plain array is a one-layer stack)."""
    if isinstance(experts[0], LayerSlice):
        return [w.stack for w in experts], experts[0].index
    return [w[...][None] for w in experts], jnp.int32(0)


def _expert_parallel(run, x_td, experts_tk, weights_tk, experts, mesh) -> jax.Array:
    """Expert parallelism: each shard holds `experts / shards` whole experts and runs them for
    every token, the other shards' picks shifted out of its range (so they add nothing), and the
    outputs are summed over the shards. Tokens are replicated after attention's all-reduce, so
    dispatch needs no communication and the combine is the one psum a tensor-parallel MLP's row
    split costs anyway; an all-to-all pays only where tokens are split across devices."""
    stacks, layer = _stacks(experts)

    def local(x, chosen, weights, index, *local_stacks):
        first = jax.lax.axis_index("model") * local_stacks[0].shape[1]
        y = run(x, chosen - first, weights, tuple(LayerSlice(w, index) for w in local_stacks))
        return jax.lax.psum(y, "model")

    specs = (P(), P(), P(), P(), *(P(None, "model") for _ in stacks))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
        x_td, experts_tk, weights_tk, layer, *stacks)


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


def _pairs(experts_tk, weights_tk, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The flat token-expert pairs: expert ids with picks outside `[0, num_experts)` (another
    shard's experts) moved to `num_experts`, so they sort last and join no group, and their
    routing weights zeroed."""
    flat = experts_tk.reshape(-1)
    mine = (flat >= 0) & (flat < num_experts)
    return jnp.where(mine, flat, num_experts), jnp.where(mine, weights_tk.reshape(-1), 0)


def _grouped(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    t, k = experts_tk.shape
    gate, up, down = (w[...] for w in experts)
    num_experts = gate.shape[0]
    flat, weights = _pairs(experts_tk, weights_tk, num_experts)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    # Rows past the groups (other shards' pairs) come out of the ragged dots as zeros.
    sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    x_nd = x_td[token]
    h_nf = act(jax.lax.ragged_dot(x_nd, gate, sizes)) * jax.lax.ragged_dot(x_nd, up, sizes)
    y_nd = jax.lax.ragged_dot(h_nf, down, sizes)
    return _combine(y_nd, weights[order], token, t, x_td.dtype)


def _blocked(x_td, experts_tk, weights_tk, experts, act, block: int) -> jax.Array:
    t, k = experts_tk.shape
    num_experts = experts[0].shape[0]
    pairs = t * k
    flat, weights = _pairs(experts_tk, weights_tk, num_experts)
    order = jnp.argsort(flat, stable=True)
    expert_of = flat[order]  # of each sorted pair
    sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts]
    padded = -(-sizes // block) * block
    ends = jnp.cumsum(padded)
    nb = num_blocks(pairs, num_experts, block)
    # Sorted pair i of expert e lands at row (e's padded start) + (i - e's first sorted pair);
    # other shards' pairs at row nb * block, past the end (dropped, read back as zeros).
    row = (ends - padded)[expert_of] + jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert_of]
    row = jnp.where(expert_of < num_experts, row, nb * block)
    token_of_row = jnp.full(nb * block, t, jnp.int32).at[row].set(order // k, mode="drop")  # t: a zero row
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(nb) * block, side="right"), num_experts - 1)
    x_brd = jnp.concatenate([x_td, jnp.zeros_like(x_td[:1])])[token_of_row].reshape(nb, block, -1)
    gate, up, down = (_expert_rows(w, block_expert) for w in experts)
    h_brf = act(jnp.einsum("brd,bdf->brf", x_brd, gate)) * jnp.einsum("brd,bdf->brf", x_brd, up)
    y_rd = jnp.einsum("brf,bfd->brd", h_brf, down).reshape(nb * block, -1)
    return _combine(y_rd.at[row].get(mode="fill", fill_value=0), weights[order], order // k, t, x_td.dtype)


def _expert_rows(w, chosen: jax.Array) -> jax.Array:
    """`[pairs, ...]`: the chosen experts of a stack, read from it where it lies (a LayerSlice's
    layer of the stacked decoder weights: one gather, not the layer's whole slice first)."""
    if isinstance(w, LayerSlice):
        return w.stack[w.index, chosen]
    return w[...][chosen]


def _in_place_cpu(x_td, experts_tk, weights_tk, experts, mesh) -> jax.Array:
    """The CPU kernel over the layer's stacks in place; under tensor parallelism each shard runs
    it on its slice of the experts' inner width and the partial outputs are summed."""
    stacks, layer = _stacks(experts)
    args = (x_td.astype(jnp.float32), experts_tk, weights_tk.astype(jnp.float32), layer, *stacks)
    tp = 1 if mesh is None else mesh.shape["model"]
    if tp == 1:
        return expert_mlp_cpu(*args).astype(x_td.dtype)
    run = lambda *a: jax.lax.psum(expert_mlp_cpu(*a), "model")  # noqa: E731
    ffn_in, ffn_out = P(None, None, None, "model"), P(None, None, "model", None)
    specs = (P(), P(), P(), P(), ffn_in, ffn_in, ffn_out)
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(*args).astype(x_td.dtype)


def _whole_tiles(experts, tp: int) -> bool:
    """Whether a shard's expert matrices (`[hidden, ffn / tp]`, `[ffn / tp, hidden]`) are whole
    (8, 128) TPU tiles. Only then does XLA:TPU slice one expert out of the stack in place; a
    narrower one (Qwen3-30B-A3B at TP 8: 96 columns) it re-tiles by copying the whole stack
    (939% excess a decode step on v6e-8), where a gather reads it in place (0.0%)."""
    hidden, ffn = experts[0].shape[-2], experts[0].shape[-1] // tp
    return hidden % 128 == 0 and ffn % 128 == 0


def _looped(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    """One pair at a time, each expert's matrices a dynamic slice of the stack that XLA:TPU
    fuses into the dots: a gather of whole experts it turned into slices of the whole stack
    (Mixtral-8x7B at TP 8 on v5e-8: 674 GiB a decode step)."""
    t, k = experts_tk.shape
    num_experts = experts[0].shape[0]
    flat, weights = _pairs(experts_tk, weights_tk, num_experts)
    flat = jnp.minimum(flat, num_experts - 1)

    def expert(w, e):
        if isinstance(w, LayerSlice):
            return jax.lax.dynamic_index_in_dim(w.stack.reshape(-1, *w.stack.shape[2:]), w.index * num_experts + e, keepdims=False)
        return jax.lax.dynamic_index_in_dim(w[...], e, keepdims=False)

    def pair(n, y_td):
        gate, up, down = (expert(w, flat[n]) for w in experts)
        x_d = jax.lax.dynamic_index_in_dim(x_td, n // k, keepdims=False)
        y_d = ((act(x_d @ gate) * (x_d @ up)) @ down) * weights[n]
        return jax.lax.dynamic_update_index_in_dim(y_td, y_td[n // k] + y_d.astype(y_td.dtype), n // k, 0)

    return jax.lax.fori_loop(0, t * k, pair, jnp.zeros_like(x_td))


def _gathered(x_td, experts_tk, weights_tk, experts, act) -> jax.Array:
    t, k = experts_tk.shape
    num_experts = experts[0].shape[0]
    flat, weights = _pairs(experts_tk, weights_tk, num_experts)
    # Another shard's pair reads this shard's last expert and is weighted by zero.
    gate, up, down = (_expert_rows(w, jnp.minimum(flat, num_experts - 1)) for w in experts)
    x_nd = jnp.repeat(x_td, k, axis=0)
    h_nf = act(jnp.einsum("nd,ndf->nf", x_nd, gate)) * jnp.einsum("nd,ndf->nf", x_nd, up)
    y_nd = jnp.einsum("nf,nfd->nd", h_nf, down)
    return _combine(y_nd, weights, jnp.repeat(jnp.arange(t), k), t, x_td.dtype)
