"""A GGUF file (llama.cpp's single-file checkpoint): metadata, tensor index, host dequantization.

The header (metadata and tensor index) is parsed here straight from a memory map: the `gguf`
package's reader builds a numpy view per array element, which for a 49k-token vocabulary and
its merges took ~5.5 s of every start-up; this takes ~0.1 s. Tensor bytes stay in the map
until a tensor is asked for, and the `gguf` package dequantizes them. Every failure — a wrong
magic number, a file cut short, an unknown value type — becomes one `FerrumError` naming the
file.

Tensors are dequantized on the host one at a time into float32 and returned in HF (torch)
layout: GGUF lists dimensions innermost first (`ne[0]` is the input dimension of a linear
layer), so a `[in, out]` GGUF shape is a `[out, in]` array here.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
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
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._fields, infos = _Header(self._map).parse()
        except FileNotFoundError:
            raise FerrumError.invalid_config(f"GGUF file {self.path} does not exist") from None
        except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as e:
            raise FerrumError.invalid_config(f"{self.path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self._data = {}
        self.tensors = {}
        data_start = _align(infos.end, int(self._fields.get("general.alignment", 32)))
        for name, dims, type_id, offset in infos.entries:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise FerrumError.unsupported(f"{self.path}: tensor {name} has unknown GGML type {type_id}") from None
            shape = tuple(reversed(dims))
            self.tensors[name] = GGUFTensor(name, qtype.name, shape)
            block, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block * type_size
            rows = int(np.prod(shape[:-1], dtype=np.int64))
            begin = data_start + offset
            if begin + rows * row_bytes > len(self._map):
                raise FerrumError.invalid_config(
                    f"{self.path} is not a readable GGUF file: tensor {name} ends at byte "
                    f"{begin + rows * row_bytes}, past the file's {len(self._map)} bytes"
                )
            self._data[name] = (qtype, begin, (*shape[:-1], row_bytes))
        unsupported = sorted({f"{t.name}: {t.type_name}" for t in self.tensors.values()
                              if t.type_name not in SUPPORTED_TENSOR_TYPES})  # fmt: skip
        if unsupported:
            raise FerrumError.unsupported(
                f"{self.path} holds tensor types ferrum_jax cannot dequantize ({', '.join(unsupported[:5])}"
                f"{', ...' if len(unsupported) > 5 else ''}); supported: {list(SUPPORTED_TENSOR_TYPES)}"
            )

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key` (int, float, bool, str, or a list of them)."""
        return self._fields.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise FerrumError.invalid_config(f"GGUF file {self.path} lacks the metadata key {key!r}")
        return value

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """(type name, the stored bytes `[rows..., row_bytes]`) of tensor `name`, a view of the file."""
        qtype, begin, byte_shape = self._data[name]
        return qtype.name, self._map[begin : begin + int(np.prod(byte_shape, dtype=np.int64))].reshape(byte_shape)

    def dequantize(self, name: str) -> np.ndarray:
        """The float32 values of tensor `name`, in torch layout (`self.tensors[name].shape`)."""
        from gguf.quants import dequantize

        qtype, begin, byte_shape = self._data[name]
        raw = self._map[begin : begin + int(np.prod(byte_shape, dtype=np.int64))].reshape(byte_shape)
        return dequantize(raw, qtype).astype(np.float32, copy=False).reshape(self.tensors[name].shape)

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


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


# GGUF value types: id -> struct format of a scalar (strings and arrays are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAGIC = 0x46554747  # b"GGUF" read little-endian


@dataclasses.dataclass
class _TensorInfos:
    entries: list[tuple[str, tuple[int, ...], int, int]]  # name, ggml dims, type id, data offset
    end: int  # where the header ends; tensor data starts at the next alignment boundary


class _Header:
    """A cursor over the little-endian GGUF v2/v3 header."""

    def __init__(self, buf: np.ndarray):
        self.buf = memoryview(buf)
        self.pos = 0

    def parse(self) -> tuple[dict[str, Any], _TensorInfos]:
        magic, version = self._unpack("<II")
        if magic != _MAGIC:
            raise ValueError(f"magic number {magic:#x} is not GGUF's {_MAGIC:#x}")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unknown); supported: 2 and 3")
        num_tensors, num_fields = self._unpack("<QQ")
        fields = {}
        for _ in range(num_fields):
            key = self._string()
            (kind,) = self._unpack("<I")
            fields[key] = self._value(kind)
        entries = []
        for _ in range(num_tensors):
            name = self._string()
            (ndims,) = self._unpack("<I")
            dims = self._unpack(f"<{ndims}Q")
            type_id, offset = self._unpack("<IQ")
            entries.append((name, dims, type_id, offset))
        return fields, _TensorInfos(entries, self.pos)

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the file's end")
        s = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return s

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, n = self._unpack("<IQ")
            if item == _STRING:
                return [self._string() for _ in range(n)]
            if item in _SCALARS:
                return list(self._unpack(f"<{n}{_SCALARS[item]}"))
            return [self._value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind} at offset {self.pos}")
        return self._unpack("<" + _SCALARS[kind])[0]
