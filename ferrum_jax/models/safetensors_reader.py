"""Zero-copy host reader for `.safetensors` files (single or sharded via the index).

The format is an 8-byte header length, a JSON header of name -> dtype/shape/offsets, then
raw little-endian data. Reading it directly over a memory map gives numpy views for every
dtype including bfloat16 (via ml_dtypes), without a framework and without loading a whole
shard into memory.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ferrum_jax.interfaces.errors import FerrumError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsDir:
    """All tensors of a HF checkpoint directory, indexed by name; data read on demand."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FerrumError.invalid_config(f"no *.safetensors (or model.safetensors.index.json) in {path}")
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            if not f.is_file():
                raise FerrumError.invalid_config(f"sharded checkpoint lists {f.name}, which does not exist")
            for name, entry in _read_header(f).items():
                self.entries[name] = entry

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e.file not in self._maps:
            self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
        raw = self._maps[e.file][e.begin : e.end]
        return raw.view(_DTYPES[e.dtype]).reshape(e.shape)


def _read_header(f: Path) -> dict[str, TensorEntry]:
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise FerrumError.unsupported(f"tensor {name} in {f.name} has dtype {meta['dtype']}, not supported")
        b, e = meta["data_offsets"]
        out[name] = TensorEntry(f, meta["dtype"], tuple(meta["shape"]), base + b, base + e)
    return out
