"""A GGUF file (llama.cpp's single-file checkpoint): metadata, tensor index, host dequantization.

Parsing goes through the `gguf` package's reader (a memory map: nothing is read until a
tensor is asked for). Every failure of the reader — a wrong magic number, a file cut short,
a tensor type the reader does not know — becomes one `FerrumError` naming the file.

Tensors are dequantized on the host one at a time into float32 and returned in HF (torch)
layout: GGUF lists dimensions innermost first (`ne[0]` is the input dimension of a linear
layer), so a `[in, out]` GGUF shape is a `[out, in]` array here.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from ferrum_jax.interfaces.errors import FerrumError

# The tensor types a file may hold: the float types and llama.cpp's _0/_1 and K-quant families,
# which its common quantizations (Q8_0, Q4_K_M, Q5_K_M, ...) are made of. The IQ and ternary
# types are refused by name.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # torch order: outermost first


class GGUFFile:
    """One opened `.gguf`: `metadata` (key -> Python value) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from gguf import GGUFReader

            self._reader = GGUFReader(self.path)
        except FileNotFoundError:
            raise FerrumError.invalid_config(f"GGUF file {self.path} does not exist") from None
        except Exception as e:  # the reader raises ValueError, KeyError, struct and numpy errors alike
            raise FerrumError.invalid_config(f"{self.path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
        self._fields = self._reader.fields
        self._by_name = {t.name: t for t in self._reader.tensors}
        self.tensors = {
            t.name: GGUFTensor(t.name, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)))
            for t in self._reader.tensors
        }
        unsupported = sorted({f"{t.name}: {t.type_name}" for t in self.tensors.values()
                              if t.type_name not in SUPPORTED_TENSOR_TYPES})  # fmt: skip
        if unsupported:
            raise FerrumError.unsupported(
                f"{self.path} holds tensor types ferrum_jax cannot dequantize ({', '.join(unsupported[:5])}"
                f"{', ...' if len(unsupported) > 5 else ''}); supported: {list(SUPPORTED_TENSOR_TYPES)}"
            )

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key` (int, float, bool, str, or a list of them)."""
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise FerrumError.invalid_config(f"GGUF file {self.path} lacks the metadata key {key!r}")
        return value

    def dequantize(self, name: str) -> np.ndarray:
        """The float32 values of tensor `name`, in torch layout (`self.tensors[name].shape`)."""
        from gguf.quants import dequantize

        t = self._by_name[name]
        return dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(self.tensors[name].shape)


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed file, once per process while it is unchanged: the server reads the tokenizer
    and the weights from the same file, and parsing the metadata of a 49k-token vocabulary
    takes ~3 s here."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FerrumError.invalid_config(f"GGUF file {path} does not exist") from None
    return _open(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open(path: Path, _mtime_ns: int, _size: int) -> GGUFFile:
    return GGUFFile(path)


def find_gguf(path: str | Path) -> Path | None:
    """`path` if it is a `.gguf` file; the one `.gguf` in `path` if it is a directory holding
    exactly one and no HF `config.json`; otherwise None (not a GGUF checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise FerrumError.invalid_config(
            f"{path} holds {len(found)} GGUF files ({[f.name for f in found]}); name the one to load"
        )
    return found[0] if found else None
