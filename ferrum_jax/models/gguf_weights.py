"""A GGUF file seen as a HF checkpoint: HF tensor names, HF shapes, float32 host arrays.

`GGUFCheckpoint` has the `entries` / `read` surface of `SafetensorsDir`, so `load_hf_params`
(its name table, one-error mismatch report, progress bar and shard-by-shard placement) loads
GGUF files unchanged. Two things differ from a HF file and are undone here:

- names: llama.cpp's `blk.N.attn_q.weight` is HF's `model.layers.N.self_attn.q_proj.weight`, as
  the family declares both (models.declare); llama.cpp keeps a layer's experts in one tensor
  (`blk.N.ffn_gate_exps.weight`, `[experts, out, in]`), HF one tensor each, so such a tensor is
  seen as its experts' HF tensors, each read as its slice;
- Gemma's norm weights: llama.cpp's converter stores w + 1 (its RMSNorm multiplies by the weight,
  Gemma's by 1 + w), so 1 is taken off again;
- RoPE layout: for `llama`/`mistral` files llama.cpp's converter permutes the rows of q and k
  (within each head, the two rotated halves are interleaved pairwise, the layout its rotary
  kernel wants). HF's `rotate_half` wants the halves contiguous, so the rows are put back.
  Qwen files are written unpermuted (llama.cpp rotates them in the NeoX layout, which is HF's).

`read_blocks` hands Q4_0 / Q4_1 / Q4_K tensors over still quantized, as ferrum's int4 at group 32
(`models.quantization`: value = q * step + offset, 16 bytes a group whose low nibbles are inputs
0-15 and high nibbles inputs 16-31). Q4_0/Q4_1: a block of 32 inputs is one f16 scale d (and
for Q4_1 a minimum m) and 16 bytes in exactly that layout: step d, offset m, or -8 d for Q4_0's
centred values. Q4_K: a super-block of 256 inputs is f16 d and dmin, twelve bytes packing eight
6-bit (scale, min) pairs, and 128 bytes holding eight groups of 32 two by two (byte i of a
64-input chunk: low nibble input i, high nibble input 32 + i); each group is step d * scale,
offset -dmin * min, and its nibbles are repacked into ferrum's order (a shuffle of the 4-bit
codes, no float values in between). `read_blocks` also hands Q8_0 tensors over as ferrum's
grouped int8 at group 32 (a block is its f16 scale d and 32 int8 codes: w = d * q). The other
K-quants load through a float copy.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ferrum_jax.models.declare import Declarations, name_pattern
from ferrum_jax.models.gguf_file import GGUFFile
from ferrum_jax.models.registry import declarations, family, model_config

# Consumed by the config (Llama 3's RoPE scaling), not a parameter.
_CONFIG_TENSORS = {"rope_freqs.weight"}
# Bytes before the 16 nibble bytes of a 32-input block.
_INT4_BLOCKS = {"Q4_0": 2, "Q4_1": 4}
_Q4_K_BLOCK = 144  # bytes of 256 inputs: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 of nibbles
_Q8_0_BLOCK = 34  # bytes of 32 inputs: d (f16), 32 int8 codes


@dataclasses.dataclass(frozen=True)
class _Entry:
    gguf_name: str
    shape: tuple[int, ...]
    expert: int | None = None  # of a stacked expert tensor, the slice this entry is


def gguf_names(decls: Declarations) -> list[tuple[re.Pattern, str]]:
    """(GGUF name pattern, HF name template) of every parameter declared with a GGUF name."""
    return [(name_pattern(d.gguf), d.hf) for d in decls if d.gguf is not None]


def hf_name(names: list[tuple[re.Pattern, str]], gguf_name: str) -> str:
    """The HF name of a GGUF tensor; an unknown name is returned as is (and reported as unexpected)."""
    for pattern, template in names:
        m = pattern.fullmatch(gguf_name)
        if m:
            # An index the GGUF name lacks (the expert of a stacked tensor) stays `{}`.
            return template.format(*m.groups(), *("{}",) * (template.count("{}") - len(m.groups())))
    return gguf_name


class GGUFCheckpoint:
    """`entries` (HF name -> entry with `.shape`) and `read(HF name)` over one GGUF file, with the
    tensor names of the family `hf_config` belongs to (models.registry)."""

    def __init__(self, f: GGUFFile, hf_config: dict):
        self.path = f.path
        self._file = f
        cfg = model_config(hf_config)
        fam = family(cfg)
        names = gguf_names(declarations(cfg))
        self.entries = {}
        for t in f.tensors.values():
            if t.name in _CONFIG_TENSORS:
                continue
            name = hf_name(names, t.name)
            if "{}" in name:
                self.entries.update({name.format(e): _Entry(t.name, t.shape[1:], e) for e in range(t.shape[0])})
            else:
                self.entries[name] = _Entry(t.name, t.shape)
        self._stack: tuple[str, np.ndarray] | None = None  # the last expert tensor read, whole
        # Norm weights llama.cpp's converter stored as w + 1 (Gemma's x * (1 + w)).
        self._plus_one = {n for n in self.entries if fam.gguf_norms_plus_one and n.endswith("norm.weight")}
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        self._row_groups = {}
        if cfg.architecture in fam.gguf_permuted_tags:
            for name in self.entries:
                if ".self_attn.q_proj." in name:
                    self._row_groups[name] = heads
                elif ".self_attn.k_proj." in name:
                    self._row_groups[name] = kv_heads

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry.expert is not None:
            # The loader reads a layer's experts in turn: dequantize their tensor once.
            if self._stack is None or self._stack[0] != entry.gguf_name:
                self._stack = (entry.gguf_name, self._file.dequantize(entry.gguf_name))
            return self._stack[1][entry.expert]
        values = self._file.dequantize(entry.gguf_name)
        if name in self._plus_one:
            values = values - np.float32(1)
        heads = self._row_groups.get(name)
        return values if heads is None else _unpermute_rows(values, heads)

    def block_method(self, name: str) -> str | None:
        """"int4" (Q4_0 / Q4_1 / Q4_K) or "int8" (Q8_0) when `read_blocks` can hand the tensor
        over quantized in groups of 32, else None (always for a slice of stacked experts)."""
        if self.entries[name].expert is not None:
            return None
        kind = self._file.tensors[self.entries[name].gguf_name].type_name
        return "int4" if kind in _INT4_BLOCKS or kind == "Q4_K" else "int8" if kind == "Q8_0" else None

    def read_blocks(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A tensor `[out, in]` of `block_method` as ferrum's codes and scales in groups of 32,
        rows in HF order: int4 (packed `[out, in / 2]` uint8, `[out, in / 32, 2]` step and
        offset), int8 (`[out, in]` int8, `[out, in / 32]` scale); the file's own codes and
        scales, no float weight in between."""
        kind, raw = self._file.raw(self.entries[name].gguf_name)
        rows = raw.shape[0]
        if kind == "Q8_0":
            blocks = raw.reshape(rows, -1, _Q8_0_BLOCK)
            codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
            scale = _f16(blocks[..., 0:2])
        elif kind == "Q4_K":
            codes, step, offset = _q4_k_groups(raw.reshape(rows, -1, _Q4_K_BLOCK))
            scale = np.stack([step, offset], axis=-1)
        else:
            header = _INT4_BLOCKS[kind]
            blocks = raw.reshape(rows, -1, header + 16)
            step = _f16(blocks[..., 0:2])
            offset = _f16(blocks[..., 2:4]) if kind == "Q4_1" else -8 * step
            codes, scale = np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1), np.stack([step, offset], axis=-1)
        heads = self._row_groups.get(name)
        if heads is not None:
            codes, scale = _unpermute_rows(codes, heads), _unpermute_rows(scale, heads)
        return codes, scale


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """float32 values of the little-endian f16 held in the last axis' two bytes."""
    return two_bytes.copy().view(np.float16)[..., 0].astype(np.float32)


def _q4_k_groups(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks `[rows, n, 144]` as ferrum int4 groups of 32 (see the module docstring)."""
    rows, n, _ = blocks.shape
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sm = blocks[..., 4:16].astype(np.uint8)
    # llama.cpp's get_scale_min_k4: groups 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
    # (mins); groups 4-7 from the nibbles of bytes 8-11 and the top 2 bits of bytes 0-3 / 4-7.
    scale = np.concatenate([sm[..., 0:4] & 63, (sm[..., 8:12] & 0xF) | ((sm[..., 0:4] >> 6) << 4)], axis=-1)
    minimum = np.concatenate([sm[..., 4:8] & 63, (sm[..., 8:12] >> 4) | ((sm[..., 4:8] >> 6) << 4)], axis=-1)
    step = d[..., None] * scale.astype(np.float32)
    offset = -(dmin[..., None] * minimum.astype(np.float32))
    chunks = blocks[..., 16:].reshape(rows, n, 4, 32)
    codes = np.stack([chunks & 0xF, chunks >> 4], axis=3).reshape(rows, n, 8, 32)  # group g = 2 * chunk + half
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return packed.reshape(rows, -1), step.reshape(rows, -1), offset.reshape(rows, -1)


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows [pairs, 2] -> [2, pairs]."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
