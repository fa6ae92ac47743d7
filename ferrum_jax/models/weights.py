"""HF checkpoint -> parameter pytree, one tensor at a time, through a regex name table.

The checkpoint is anything with HF tensor names: `SafetensorsDir` (a HF directory) or
`GGUFCheckpoint` (a GGUF file under HF names), each giving `entries` (name -> `.shape`),
`read(name)` (a host array in HF layout) and `path`.

Every HF tensor name is matched against the HF names the model's family declares (models.declare:
pattern -> our parameter path and the layout transform). All problems — missing, unexpected and mis-shaped tensors — are
collected from the safetensors headers first and reported in ONE error before any data is
read. Per-layer tensors land in one stacked parameter (`layers.attn.wq.weight [num_layers, ...]`, see
causal_lm): its layers are converted on the host one at a time into the stacked host array,
which is placed on device as soon as it is full, so at most one stacked parameter sits on the
host at a time.
"""

from __future__ import annotations

import itertools
import re

import jax
import numpy as np
from tqdm.auto import tqdm

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.declare import SCALE, Declarations, Layout, ParamDecl, name_pattern, scale_path
from ferrum_jax.models.quantization import Quantization, float_shape, quantize
from ferrum_jax.models.registry import declarations, family
from ferrum_jax.models.vocab_padding import unpadded_shape

# Buffers some checkpoints carry that hold nothing we need (RoPE is recomputed from config).
_IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def hf_table(decls: Declarations) -> list[tuple[re.Pattern, ParamDecl]]:
    """(HF name pattern, declaration) of every declared parameter; each `{}` matches an index
    (the layer, then an expert: models.declare)."""
    return [(name_pattern(d.hf), d) for d in decls]


def _target(table, name: str) -> tuple[ParamDecl, tuple[int, ...]] | None:
    """(declaration, the indexes the name carries: (), (layer,) or (layer, expert)) for an HF
    tensor name."""
    for pattern, decl in table:
        m = pattern.fullmatch(name)
        if m:
            return decl, tuple(int(g) for g in m.groups())
    return None


def load_hf_params(
    ckpt,
    cfg: ModelConfig,
    expected: dict[str, jax.ShapeDtypeStruct],
    shardings: dict[str, jax.sharding.Sharding] | None = None,
    progress: bool = True,
    quant: Quantization | None = None,
) -> dict[str, jax.Array]:
    """Reads a checkpoint into `{param path: device array}` matching `expected` exactly, through
    the HF names `cfg`'s family declares (models.declare; its `hf_rename` first).

    expected: our flat parameter paths -> abstract shape/dtype (from the model's eval_shape),
    the vocabulary padded for tensor parallelism where it is; the checkpoint holds
    `cfg.vocab_size` rows and the padding is zeros (see vocab_padding).
    quant: the quantization `expected` was built with; each weight with a `.scale` beside it
    is converted to float32 and quantized on the host, one layer at a time.
    """
    decls = declarations(cfg)
    table = hf_table(decls)
    rename = family(cfg).hf_rename or (lambda n: n)
    vocab_size = cfg.vocab_size
    plan: dict[str, dict[tuple[int, ...], tuple[str, Layout]]] = {}
    unexpected, misshaped, misshaped_targets = [], [], set()
    for name, entry in ckpt.entries.items():
        declared = rename(name)
        if declared is None or any(re.fullmatch(p, declared) for p in _IGNORED):
            continue
        if cfg.tie_word_embeddings and declared == "lm_head.weight":
            continue
        found = _target(table, declared)
        if found is None or found[0].path not in expected:
            unexpected.append(name)
            continue
        decl, index = found
        target, transform = decl.path, decl.layout
        shape = unpadded_shape(decls, target, _float_shape(decls, target, expected), vocab_size)
        if any(i >= n for i, n in zip(index, shape)):
            unexpected.append(name)
            continue
        want = tuple(transform.hf_shape(shape[len(index):]))
        if entry.shape != want:
            misshaped.append(f"{name}: shape {list(entry.shape)}, expected {list(want)}")
            misshaped_targets.add((target, index))
            continue
        plan.setdefault(target, {})[index] = (name, transform)
    missing = []
    for target, spec in sorted(expected.items()):
        if target.endswith(SCALE):  # derived from its weight
            continue
        template = decls[target].hf
        indexes = itertools.product(*(range(n) for n in spec.shape[: template.count("{}")]))
        # Named as the checkpoint would name them.
        missing += [
            template.format(*index)
            for index in indexes
            if index not in plan.get(target, {}) and (target, index) not in misshaped_targets
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
            shape = _float_shape(decls, target, expected)
            stored = unpadded_shape(decls, target, shape, vocab_size)
            scale_spec = expected.get(scale_path(target))
            if scale_spec is not None:
                arrays = _quantized(ckpt, decls[target], plan[target], spec, scale_spec, shape, stored, quant, bar)
            else:
                host = (np.empty if stored == tuple(shape) else np.zeros)(shape, spec.dtype)
                region = host[tuple(slice(0, n) for n in stored)]
                for index, (name, transform) in plan[target].items():
                    dst = region[index]
                    dst[...] = transform.convert(ckpt.read(name), dst.shape)
                    bar.update()
                arrays = {target: host}
            for path, array in arrays.items():
                sharding = shardings.get(path) if shardings else None
                out[path] = jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    return out


def _float_shape(decls: Declarations, target: str, expected: dict) -> tuple:
    """The float shape of `target` (a quantized int4 weight is stored packed)."""
    spec = expected[target]
    if scale_path(target) not in expected:
        return tuple(spec.shape)
    decl = decls[target]
    return float_shape(spec.shape, decl.n_in + decl.per_layer, np.dtype(spec.dtype) == np.uint8)


def _quantized(ckpt, decl: ParamDecl, layers: dict, spec, scale_spec, shape: tuple, stored: tuple, quant, bar) -> dict[str, np.ndarray]:
    """{target: codes, target_scale: scales}, one layer at a time: a layer whose file blocks are
    the groups `quant` asks for is taken as stored (`GGUFCheckpoint.read_blocks`: HF's `[out,
    in]` rows become ferrum's `[in..., out...]` columns, no float in between); any other is read
    in float32, padded and quantized on the host."""
    target, n_in, stacked = decl.path, decl.n_in, decl.per_layer
    if quant is None:
        raise FerrumError.internal(f"{target} expects a quantized weight but no quantization was given")
    layer_shape, layer_stored = (shape[1:], stored[1:]) if stacked else (shape, stored)
    ints = np.empty(spec.shape, spec.dtype)
    scales = np.empty(scale_spec.shape, np.float32)
    for index, (name, transform) in layers.items():
        dst_ints, dst_scale = ints[index], scales[index]
        if layer_stored == layer_shape and _blocks_fit(ckpt, name, layer_shape[n_in - 1], quant):
            codes, scale = ckpt.read_blocks(name)
            dst_ints[...] = codes.T.reshape(dst_ints.shape)
            dst_scale[...] = np.moveaxis(scale, 0, -1).reshape(dst_scale.shape)
        else:
            w = (np.empty if layer_stored == layer_shape else np.zeros)(layer_shape, np.float32)
            region = w[tuple(slice(0, n) for n in layer_stored)]
            region[...] = transform.convert(ckpt.read(name), region.shape)
            dst_ints[...], dst_scale[...] = quantize(w, n_in, quant, xp=np)
        bar.update()
    return {target: ints, scale_path(target): scales}


def _blocks_fit(ckpt, name: str, rows: int, quant: Quantization) -> bool:
    """Whether tensor `name` is stored in GGUF blocks of `quant`'s method whose 32-input groups
    are the groups `quant` asks for along a last input axis of `rows`."""
    block_method = getattr(ckpt, "block_method", None)
    return block_method is not None and quant.grouped and block_method(name) == quant.method and quant.group(rows) == 32
