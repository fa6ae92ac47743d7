"""Converted parameters saved and restored with orbax-checkpoint.

A ferrum checkpoint directory holds `config.json` (the HF config it came from),
`ferrum_checkpoint.json` (marker, dtype, and the weight quantization if any: its integer
weights and float32 scales are stored as they are) and `params/` (an orbax PyTree of the flat
parameter dict). Restoring takes the target abstract arrays — with their shardings — so
each device reads only its own shard.

Format 3 stores the parameters under their declared paths (models.declare: a linear layer's
`layers.attn.wq.weight`, `.scale`, `.bias`), per-layer ones stacked `[num_layers, ...]`. Format
2 (`layers.attn.wq`, `layers.attn.wq_scale`, before every projection became one linear module)
and format 1 (one tensor per layer) are refused with the command that rewrites them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ferrum_jax.interfaces.errors import FerrumError
from ferrum_jax.models.quantization import Quantization

MARKER = "ferrum_checkpoint.json"
FORMAT = 3


def is_ferrum_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_checkpoint(
    path: str | Path, flat_params: dict[str, jax.Array], hf_config: dict, dtype: str, quant: Quantization | None = None
) -> None:
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if (path / "params").exists():
        shutil.rmtree(path / "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", flat_params)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    marker = {"format": FORMAT, "dtype": dtype}
    if quant is not None:
        marker["quantization"] = {"method": quant.method, "group_size": quant.group_size}
    (path / MARKER).write_text(json.dumps(marker))


def checkpoint_dtype(path: str | Path) -> str:
    return json.loads((Path(path) / MARKER).read_text())["dtype"]


def checkpoint_quantization(path: str | Path) -> Quantization | None:
    stored = json.loads((Path(path) / MARKER).read_text()).get("quantization")
    return None if stored is None else Quantization(**stored)


def restore_checkpoint(path: str | Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restores into `target`'s shapes, dtypes and shardings; a mismatch names the tensor."""
    path = Path(path).absolute()
    fmt = json.loads((path / MARKER).read_text()).get("format")
    if fmt != FORMAT:
        raise FerrumError.invalid_config(
            f"checkpoint {path} has format {fmt}; this ferrum_jax reads format {FORMAT}: convert the original "
            f"model again with `python -m ferrum_jax.convert SRC {path}`"
        )
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "params")
        stored = getattr(stored, "item_metadata", stored)
        stored = dict(stored.tree if hasattr(stored, "tree") else stored)
        problems = [f"missing {k}" for k in sorted(set(target) - set(stored))]
        problems += [f"unexpected {k}" for k in sorted(set(stored) - set(target))]
        for k in sorted(set(target) & set(stored)):
            if tuple(stored[k].shape) != tuple(target[k].shape):
                problems.append(f"{k}: shape {list(stored[k].shape)}, expected {list(target[k].shape)}")
        if problems:
            raise FerrumError.invalid_config(f"checkpoint {path} does not match the model: " + "; ".join(problems))
        return ckptr.restore(path / "params", target)
