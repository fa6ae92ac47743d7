"""HF checkpoint -> parameter pytree, one tensor at a time, through a regex name table.

The checkpoint is anything with HF tensor names: `SafetensorsDir` (a HF directory) or
`GGUFCheckpoint` (a GGUF file under HF names), each giving `entries` (name -> `.shape`),
`read(name)` (a host array in HF layout) and `path`.

Every HF tensor name is matched against `_TABLE` (pattern -> our parameter path and the
layout transform). All problems — missing, unexpected and mis-shaped tensors — are
collected from the safetensors headers first and reported in ONE error before any data is
read. Per-layer tensors land in one stacked parameter (`layers.attn.wq [num_layers, ...]`, see
causal_lm): its layers are converted on the host one at a time into the stacked host array,
which is placed on device as soon as it is full, so at most one stacked parameter sits on the
host at a time.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.quantization import SCALE_SUFFIX, Quantization, float_shape, input_axes, quantize
from ferrum_jax.models.vocab_padding import unpadded_shape

# HF layouts are torch Linear [out, in]; ours are [in, ...heads, head_dim] / [heads, head_dim, out].
# Each transform: (HF shape expected for our shape, converter HF array -> our array).
_Transform = tuple[Callable[[tuple], tuple], Callable[[np.ndarray, tuple], np.ndarray]]
_SAME: _Transform = (lambda s: s, lambda a, s: a)
_TRANSPOSE: _Transform = (lambda s: s[::-1], lambda a, s: a.T)
_IN_PROJ: _Transform = (lambda s: (s[1] * s[2], s[0]), lambda a, s: a.T.reshape(s))
_OUT_PROJ: _Transform = (lambda s: (s[2], s[0] * s[1]), lambda a, s: a.T.reshape(s))
_HEAD_BIAS: _Transform = (lambda s: (s[0] * s[1],), lambda a, s: a.reshape(s))

_L = r"model\.layers\.(\d+)\."
_TABLE: list[tuple[str, str, _Transform]] = [
    (r"model\.embed_tokens\.weight", "embed", _SAME),
    (r"model\.norm\.weight", "final_norm.weight", _SAME),
    (r"lm_head\.weight", "lm_head", _TRANSPOSE),
    (_L + r"input_layernorm\.weight", "layers.input_norm.weight", _SAME),
    (_L + r"post_attention_layernorm\.weight", "layers.post_attn_norm.weight", _SAME),
    (_L + r"self_attn\.q_proj\.weight", "layers.attn.wq", _IN_PROJ),
    (_L + r"self_attn\.k_proj\.weight", "layers.attn.wk", _IN_PROJ),
    (_L + r"self_attn\.v_proj\.weight", "layers.attn.wv", _IN_PROJ),
    (_L + r"self_attn\.o_proj\.weight", "layers.attn.wo", _OUT_PROJ),
    (_L + r"self_attn\.q_proj\.bias", "layers.attn.bq", _HEAD_BIAS),
    (_L + r"self_attn\.k_proj\.bias", "layers.attn.bk", _HEAD_BIAS),
    (_L + r"self_attn\.v_proj\.bias", "layers.attn.bv", _HEAD_BIAS),
    (_L + r"self_attn\.o_proj\.bias", "layers.attn.bo", _SAME),
    (_L + r"self_attn\.q_norm\.weight", "layers.attn.q_norm.weight", _SAME),
    (_L + r"self_attn\.k_norm\.weight", "layers.attn.k_norm.weight", _SAME),
    (_L + r"mlp\.gate_proj\.weight", "layers.mlp.gate", _TRANSPOSE),
    (_L + r"mlp\.up_proj\.weight", "layers.mlp.up", _TRANSPOSE),
    (_L + r"mlp\.down_proj\.weight", "layers.mlp.down", _TRANSPOSE),
    (_L + r"mlp\.gate_proj\.bias", "layers.mlp.gate_bias", _SAME),
    (_L + r"mlp\.up_proj\.bias", "layers.mlp.up_bias", _SAME),
    (_L + r"mlp\.down_proj\.bias", "layers.mlp.down_bias", _SAME),
]
# Buffers some checkpoints carry that hold nothing we need (RoPE is recomputed from config).
_IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def _target(name: str) -> tuple[str, int | None, _Transform] | None:
    """(our path, layer index or None, transform) for an HF tensor name."""
    for pattern, path, transform in _TABLE:
        m = re.fullmatch(pattern, name)
        if m:
            return path, int(m.group(1)) if m.groups() else None, transform
    return None


def _layer_shape(path: str, shape: tuple) -> tuple:
    """One layer's shape of `path`: stacked parameters drop their leading layer axis."""
    return shape[1:] if path.startswith("layers.") else shape


def _checkpoint_shape(target: str, shape, vocab_size: int | None) -> tuple:
    return tuple(shape) if vocab_size is None else unpadded_shape(target, tuple(shape), vocab_size)


def load_hf_params(
    ckpt,
    expected: dict[str, jax.ShapeDtypeStruct],
    shardings: dict[str, jax.sharding.Sharding] | None = None,
    tied_embeddings: bool = False,
    progress: bool = True,
    vocab_size: int | None = None,
    quant: Quantization | None = None,
) -> dict[str, jax.Array]:
    """Reads a checkpoint into `{param path: device array}` matching `expected` exactly.

    expected: our flat parameter paths -> abstract shape/dtype (from the model's eval_shape).
    vocab_size: the real vocabulary when `expected` pads it for tensor parallelism; the
    checkpoint holds that many rows and the padding is zeros (see vocab_padding).
    quant: the quantization `expected` was built with; each weight with a `_scale` beside it
    is converted to float32 and quantized on the host, one layer at a time.
    """
    plan: dict[str, dict[int | None, tuple[str, _Transform]]] = {}
    unexpected, misshaped, misshaped_targets = [], [], set()
    for name, entry in ckpt.entries.items():
        if any(re.fullmatch(p, name) for p in _IGNORED) or (tied_embeddings and name == "lm_head.weight"):
            continue
        found = _target(name)
        if found is None or found[0] not in expected:
            unexpected.append(name)
            continue
        target, layer, transform = found
        shape = _checkpoint_shape(target, _float_shape(target, expected), vocab_size)
        if layer is not None and layer >= shape[0]:
            unexpected.append(name)
            continue
        want = tuple(transform[0](_layer_shape(target, shape)))
        if entry.shape != want:
            misshaped.append(f"{name}: shape {list(entry.shape)}, expected {list(want)}")
            misshaped_targets.add((target, layer))
            continue
        plan.setdefault(target, {})[layer] = (name, transform)
    missing = []
    for target, spec in sorted(expected.items()):
        if target.endswith(SCALE_SUFFIX):  # derived from its weight
            continue
        layers = range(spec.shape[0]) if target.startswith("layers.") else [None]
        missing += [
            target if layer is None else f"{target}[{layer}]"
            for layer in layers
            if layer not in plan.get(target, {}) and (target, layer) not in misshaped_targets
        ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {sorted(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {misshaped}")
        raise FerrumError.invalid_config(f"checkpoint {ckpt.path} does not match the model config; " + "; ".join(parts))

    out = {}
    with tqdm(total=sum(map(len, plan.values())), desc="loading weights", unit="tensor", disable=not progress) as bar:
        for target in sorted(plan):
            spec = expected[target]
            shape = _float_shape(target, expected)
            stored = _checkpoint_shape(target, shape, vocab_size)
            scale_spec = expected.get(target + SCALE_SUFFIX)
            if scale_spec is not None:
                arrays = _quantized(ckpt, target, plan[target], spec, scale_spec, shape, stored, quant, bar)
            else:
                host = (np.empty if stored == tuple(shape) else np.zeros)(shape, spec.dtype)
                region = host[tuple(slice(0, n) for n in stored)]
                for layer, (name, transform) in plan[target].items():
                    dst = region if layer is None else region[layer]
                    dst[...] = transform[1](ckpt.read(name), dst.shape)
                    bar.update()
                arrays = {target: host}
            for path, array in arrays.items():
                sharding = shardings.get(path) if shardings else None
                out[path] = jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    return out


def _float_shape(target: str, expected: dict) -> tuple:
    """The float shape of `target` (a quantized int4 weight is stored packed)."""
    spec = expected[target]
    if target + SCALE_SUFFIX not in expected:
        return tuple(spec.shape)
    n_in = input_axes(target) + target.startswith("layers.")
    return float_shape(spec.shape, n_in, np.dtype(spec.dtype) == np.uint8)


def _quantized(ckpt, target: str, layers: dict, spec, scale_spec, shape: tuple, stored: tuple, quant, bar) -> dict[str, np.ndarray]:
    """{target: codes, target_scale: scales}, one layer at a time: a layer whose file blocks are
    the groups `quant` asks for is taken as stored (`GGUFCheckpoint.read_blocks`: HF's `[out,
    in]` rows become ferrum's `[in..., out...]` columns, no float in between); any other is read
    in float32, padded and quantized on the host."""
    if quant is None:
        raise FerrumError.internal(f"{target} expects a quantized weight but no quantization was given")
    n_in = input_axes(target)
    stacked = target.startswith("layers.")
    layer_shape, layer_stored = (shape[1:], stored[1:]) if stacked else (shape, stored)
    ints = np.empty(spec.shape, spec.dtype)
    scales = np.empty(scale_spec.shape, np.float32)
    for layer, (name, transform) in layers.items():
        dst_ints, dst_scale = (ints, scales) if layer is None else (ints[layer], scales[layer])
        if layer_stored == layer_shape and _blocks_fit(ckpt, name, layer_shape[n_in - 1], quant):
            codes, scale = ckpt.read_blocks(name)
            dst_ints[...] = codes.T.reshape(dst_ints.shape)
            dst_scale[...] = np.moveaxis(scale, 0, -1).reshape(dst_scale.shape)
        else:
            w = (np.empty if layer_stored == layer_shape else np.zeros)(layer_shape, np.float32)
            region = w[tuple(slice(0, n) for n in layer_stored)]
            region[...] = transform[1](ckpt.read(name), region.shape)
            dst_ints[...], dst_scale[...] = quantize(w, n_in, quant, xp=np)
        bar.update()
    return {target: ints, target + SCALE_SUFFIX: scales}


def _blocks_fit(ckpt, name: str, rows: int, quant: Quantization) -> bool:
    """Whether tensor `name` is stored in GGUF blocks of `quant`'s method whose 32-input groups
    are the groups `quant` asks for along a last input axis of `rows`."""
    block_method = getattr(ckpt, "block_method", None)
    return block_method is not None and quant.grouped and block_method(name) == quant.method and quant.group(rows) == 32
