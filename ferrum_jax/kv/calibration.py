"""Scales of narrow KV pages (int8, fp8), calibrated once when an executor loads its weights.

Per (layer, KV row) the scale maps the largest |K| (and |V|) the float model writes for a fixed
calibration prompt, times HEADROOM, to the narrow type's largest value (`kv.pages.kv_max`);
values beyond it saturate. Static per-head scales are what let every attention implementation
read narrow pages unchanged (see kv.pages): vLLM and tpu-inference use one static scale per
tensor; one per (layer, head) follows each head's own range.

The prompt needs no tokenizer: CALIBRATION_TOKENS token ids drawn from a fixed seed after the
BOS token, run as one prefill through the same model and attention backend the executor steps
with (a float KV pool of just that sequence). English text reaches further in some heads
(default model, three 256-token windows of tests/data/perplexity_text.txt: the median head
within 1.02x (K) / 1.09x (V) of the random prompt's maximum, the worst 1.6x / 2.2x), and those
rare values saturate; resolution matters more than they do. Default model perplexity with int8
pages by HEADROOM: 1.0 -> 20.25, 1.25 -> 20.17, 2.0 -> 20.51, 3.0 -> 21.06 (float32 pages: 20.32).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from ferrum_jax.kv.layout import kv_layout
from ferrum_jax.kv.pages import kv_max
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.paged_attention import AttentionBackend, AttentionMetadata
from ferrum_jax.models.sharding import kv_spec

CALIBRATION_TOKENS = 256
HEADROOM = 1.25
SEED = 0


def calibration_tokens(cfg: ModelConfig) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, cfg.vocab_size, CALIBRATION_TOKENS, dtype=np.int32)
    if cfg.bos_token_id is not None:
        ids[0] = cfg.bos_token_id
    return ids


def kv_amax(graphdef: nnx.GraphDef, state: nnx.State, cfg: ModelConfig, backend: AttentionBackend, dtype,
            page_size: int, kv_rows: int) -> tuple[jax.Array, jax.Array]:
    """The largest |K| and |V| per (KV row, layer), `[kv_rows, num_layers]` float32, that the
    float model writes for `calibration_tokens(cfg)`."""
    ids = calibration_tokens(cfg)
    tokens = ids.shape[0]
    pages = -(-tokens // page_size)
    layout = kv_layout(cfg)
    # Page 0 is the reserved padding page; KV group g's table is pages 1 + g * pages ... .
    num_pages = 1 + layout.num_groups * pages
    pool = (kv_rows, layout.slots * num_pages, page_size, cfg.head_dim)
    tp = 1 if backend.mesh is None else backend.mesh.shape["model"]
    sharding = None if backend.mesh is None else NamedSharding(backend.mesh, kv_spec(tp))
    first = 1 + pages * np.arange(layout.num_groups, dtype=np.int32)[:, None]
    # Per layer, the pool rows its KV went to.
    rows = np.stack([s * num_pages + first[g, 0] + np.arange(pages) for g, s in map(layout.place, range(cfg.num_layers))])

    @jax.jit
    def run(state, ids):
        model = nnx.merge(graphdef, state)
        k = jnp.zeros(pool, dtype)
        v = jnp.zeros(pool, dtype)
        if sharding is not None:
            k, v = jax.lax.with_sharding_constraint((k, v), (sharding, sharding))
        meta = AttentionMetadata(
            slot_mapping=jnp.asarray(first * page_size + np.arange(tokens, dtype=np.int32)[None, :]),
            cu_q_lens=jnp.array([0, tokens], jnp.int32),
            kv_lens=jnp.array([tokens], jnp.int32),
            page_table=jnp.asarray((first + np.arange(pages, dtype=np.int32)[None, :])[:, None, :]),
            num_seqs=jnp.array(1, jnp.int32),
        )
        _, k, v = model(ids, jnp.arange(tokens, dtype=jnp.int32), k, v, meta,
                        jnp.array([tokens - 1], jnp.int32), backend)

        def amax(x):
            return jnp.max(jnp.abs(x[:, rows].astype(jnp.float32)).reshape(kv_rows, cfg.num_layers, -1), axis=-1)

        return amax(k), amax(v)

    return run(state, jnp.asarray(ids))


def kv_scales(k_amax: jax.Array, v_amax: jax.Array, page_dtype) -> tuple[jax.Array, jax.Array]:
    """Scales of pages of `page_dtype` for the measured maxima (a head that wrote only zeros
    gets scale 1)."""
    limit = kv_max(page_dtype)

    def scale(amax):
        return jnp.where(amax > 0, amax * HEADROOM / limit, 1.0).astype(jnp.float32)

    return scale(k_amax), scale(v_amax)
