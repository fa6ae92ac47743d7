"""Parameters for `from_pretrained`: a HF directory, a ferrum orbax checkpoint, or a GGUF file.

Whatever the source holds, the parameters arrive on device in the requested dtype: HF and GGUF
tensors are converted on the host one at a time (GGUF ones dequantized to float32 first), and
quantized there when a weight quantization is asked for (GGUF blocks that are that quantization
already, Q4_0/Q4_1/Q4_K for int4 and Q8_0 for int8, load as they are); an orbax checkpoint is restored in its
stored dtype, shard by shard, and cast on device (its quantized weights and scales as stored).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.checkpoint import checkpoint_dtype, checkpoint_quantization, is_ferrum_checkpoint, restore_checkpoint
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.gguf_config import hf_config_from_gguf
from ferrum_jax.models.gguf_file import find_gguf, open_gguf
from ferrum_jax.models.gguf_weights import GGUFCheckpoint
from ferrum_jax.models.param_tree import abstract_model, flatten_state, param_shardings, unflatten_into
from ferrum_jax.models.declare import SCALE, scale_path
from ferrum_jax.models.quantization import Quantization
from ferrum_jax.models.registry import declarations, model_config
from ferrum_jax.models.safetensors_reader import SafetensorsDir
from ferrum_jax.models.vocab_padding import pad_to, unpadded_shape
from ferrum_jax.models.weights import load_hf_params


@dataclasses.dataclass
class Loaded:
    cfg: ModelConfig
    hf_config: dict
    graphdef: nnx.GraphDef
    state: nnx.State
    model_id: str
    quant: Quantization | None = None


def source_dtype(path: str | Path) -> str:
    """The parameter dtype a checkpoint holds: an orbax checkpoint's stored dtype; the most
    common floating dtype of a HF directory's tensors; float32 for a GGUF file holding
    quantized or float32 tensors (the dequantized values are exact only in float32), else its
    float16/bfloat16."""
    path = Path(path)
    gguf = find_gguf(path)
    if gguf is not None:
        kinds = Counter(t.type_name for t in open_gguf(gguf).tensors.values() if len(t.shape) > 1)
    elif is_ferrum_checkpoint(path):
        return checkpoint_dtype(path)
    else:
        kinds = Counter(e.dtype for e in SafetensorsDir(path).entries.values() if e.dtype in ("F32", "F16", "BF16", "F64"))
    common = kinds.most_common(1)[0][0] if kinds else "F32"
    return {"F16": "float16", "BF16": "bfloat16"}.get(common, "float32")


def hf_config_of(path: Path) -> dict:
    """The HF config of a checkpoint without reading a weight: a GGUF file's metadata, or the
    config.json of a HF or orbax directory (a directory holding only config.json will do)."""
    gguf = find_gguf(path)
    if gguf is not None:
        return hf_config_from_gguf(open_gguf(gguf))
    if not path.is_dir():
        raise FerrumError.invalid_config(f"model path {path} is neither a directory nor a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FerrumError.invalid_config(f"no config.json (and no .gguf file) in {path}")
    return json.loads(config_file.read_text())


def load_params(path: Path, dtype: str, mesh: Mesh, progress: bool = True, quant: Quantization | None = None,
                expert_parallel: bool = False) -> Loaded:
    """Every parameter on device in `dtype` (linear weights quantized by `quant`), placed shard
    by shard in its tensor-parallel layout over `mesh`."""
    hf_config = hf_config_of(path)
    gguf = find_gguf(path)
    if gguf is not None:
        return _load_named(GGUFCheckpoint(open_gguf(gguf), hf_config), hf_config, dtype, mesh, progress, gguf.stem, quant,
                           expert_parallel)
    if is_ferrum_checkpoint(path):
        return _restore(path, hf_config, dtype, mesh, quant, expert_parallel)
    return _load_named(SafetensorsDir(path), hf_config, dtype, mesh, progress, path.name, quant, expert_parallel)


def _load_named(ckpt, hf_config: dict, dtype: str, mesh: Mesh, progress: bool, model_id: str, quant,
                expert_parallel: bool) -> Loaded:
    cfg = model_config(hf_config)
    if quant is not None and quant.group_size is None and _holds_blocks_of(ckpt, quant.method):
        # A GGUF file with Q4_0/Q4_1/Q4_K (int4) or Q8_0 (int8) linear tensors: their own 32-input
        # groups are the file's exact precision (regrouping int4 by 128 loses it: +45% perplexity
        # on the default model) and load unconverted; other tensors of a mixed file (Q4_K_M's
        # Q6_K ones) are quantized into the same groups.
        quant = Quantization(quant.method, 32)
    graphdef, abstract = abstract_model(cfg, jnp.dtype(dtype), mesh.shape["model"], quant)
    flat = load_hf_params(ckpt, cfg, flatten_state(abstract), param_shardings(cfg, mesh, abstract, expert_parallel),
                          progress=progress, quant=quant)
    return Loaded(cfg, hf_config, graphdef, unflatten_into(abstract, flat), model_id, quant)


def _holds_blocks_of(ckpt, method: str) -> bool:
    """Whether any linear tensor of `ckpt` is GGUF blocks that load as `method` unconverted."""
    block_method = getattr(ckpt, "block_method", None)
    return block_method is not None and any(block_method(n) == method for n in ckpt.entries if n.endswith("_proj.weight"))


def _restore(path: Path, hf_config: dict, dtype: str, mesh: Mesh, quant: Quantization | None, expert_parallel: bool) -> Loaded:
    cfg = model_config(hf_config)
    decls = declarations(cfg)
    stored = jnp.dtype(checkpoint_dtype(path))
    saved_quant = checkpoint_quantization(path)
    if quant is not None and quant != saved_quant:
        raise FerrumError.invalid_config(
            f"checkpoint {path} holds {saved_quant.method if saved_quant else 'float'} weights; quantization={quant.method!r} "
            "applies when converting from a float source (python -m ferrum_jax.convert --quantization)"
        )
    quant = saved_quant
    graphdef, abstract = abstract_model(cfg, jnp.dtype(dtype), mesh.shape["model"], quant)
    shardings = param_shardings(cfg, mesh, abstract, expert_parallel)
    padded = {k: tuple(v.shape) for k, v in flatten_state(abstract).items()}
    # The checkpoint holds the real vocabulary, which a tensor-parallel degree that does not
    # divide it cannot split: such tensors restore whole on every device, then pad and split.
    replicated = NamedSharding(mesh, PartitionSpec())
    # Quantized weights and their scales restore as stored; the float leaves in `stored`.
    kept = {k: v.dtype for k, v in flatten_state(abstract).items() if k.endswith(SCALE) or scale_path(k) in padded}
    target = {}
    for k, shape in padded.items():
        real = unpadded_shape(decls, k, shape, cfg.vocab_size)
        target[k] = jax.ShapeDtypeStruct(real, kept.get(k, stored), sharding=shardings[k] if real == shape else replicated)
    flat = {k: pad_to(v, padded[k], shardings[k]) for k, v in restore_checkpoint(path, target).items()}
    want = jnp.dtype(dtype)
    if want != stored:
        # One leaf at a time, so at most one extra tensor is alive during the cast.
        for k in list(flat):
            if k not in kept:
                flat[k] = flat[k].astype(want)
    return Loaded(cfg, hf_config, graphdef, unflatten_into(abstract, flat), path.name, quant)
