"""The parameter declaration: each parameter of a model family declared once.

A family (models.families) lists its parameters as `ParamDecl`s for a config; everything that
needs to know the parameters derives from that list:

- the modules create their parameters from it (`Declarations.get`: shape, init, whether a bias or
  norm exists at all), so a module and the table cannot disagree;
- checkpoint loading (weights, gguf_weights) maps HF and GGUF tensor names and layouts to paths;
- tensor parallelism (sharding) maps the logical axes to mesh axes;
- quantization, vocabulary padding and parameter counts read `n_in` and the axes.

Paths are the flat state paths of param_tree: a linear layer `attn.wq` owns `attn.wq.weight`,
and when quantized `attn.wq.scale` beside it (derived, never declared) and `attn.wq.bias` when
declared. Per-layer parameters are declared at one layer's shape under `layers.`; the model
stacks them (`[num_layers, ...]`, causal_lm).

Logical axes name what a dimension indexes; sharding decides which of them split over the mesh:
`vocab`, `heads` (query heads), `kv_heads`, `ffn` (the MLP's inner width), `experts` (an expert
stack's leading axis), or None.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable

import numpy as np

from ferrum_jax.interfaces.errors import FerrumError

LAYER_PREFIX = "layers."
WEIGHT, SCALE, BIAS = ".weight", ".scale", ".bias"
LOGICAL_AXES = ("vocab", "heads", "kv_heads", "ffn", "experts", None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a HF tensor (torch layout) maps onto ours: the HF shape for our shape, and the array
    conversion HF -> ours. Checkpoint-only: the model never sees HF layouts."""

    hf_shape: Callable[[tuple], tuple]
    convert: Callable[[np.ndarray, tuple], np.ndarray]


SAME = Layout(lambda s: s, lambda a, s: a)
# torch Linear [out, in] -> ours [in, out].
TRANSPOSE = Layout(lambda s: s[::-1], lambda a, s: a.T)


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """One parameter. `shape` is one layer's for per-layer parameters (path under `layers.`).

    hf / gguf: the checkpoint tensor names, `{}` standing for the layer index; a further `{}`
    indexes the next leading axis of `shape` (HF stores each expert of an expert stack as its own
    tensor: `...experts.{}.gate_proj.weight`), `layout` then mapping one such tensor; gguf None:
    the family has no GGUF spelling for it. n_in: a linear weight's leading input axes (it is then
    quantizable and its path ends in `.weight`); None for everything else. init: `normal`
    (scaled by the inputs), `ones` or `zeros` (random models only: checkpoints overwrite all).
    """

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf: str
    gguf: str | None = None
    layout: Layout = SAME
    n_in: int | None = None
    init: str = "normal"

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise FerrumError.internal(f"{self.path}: axes {self.axes} for shape {self.shape}")
        if any(a not in LOGICAL_AXES for a in self.axes):
            raise FerrumError.internal(f"{self.path}: axes {self.axes} outside {LOGICAL_AXES}")
        if self.n_in is not None and not self.path.endswith(WEIGHT):
            raise FerrumError.internal(f"{self.path}: a linear weight's path ends in {WEIGHT}")

    @property
    def per_layer(self) -> bool:
        return self.path.startswith(LAYER_PREFIX)

    @property
    def parallel(self) -> str | None:
        """How tensor parallelism splits a linear weight: "column" (a split output axis),
        "row" (a split input axis), or None (replicated)."""
        split = [i for i, a in enumerate(self.axes) if a is not None]
        if self.n_in is None or not split:
            return None
        return "row" if split[0] < self.n_in else "column"


def linear(path: str, shape: tuple[int, ...], axes: tuple, n_in: int, hf: str, gguf: str | None, layout: Layout) -> ParamDecl:
    """A linear layer's weight `[in..., out...]`, `path` the layer (`layers.attn.wq`)."""
    return ParamDecl(path + WEIGHT, tuple(shape), tuple(axes), hf, gguf, layout, n_in=n_in)


def vector(path: str, shape: tuple[int, ...], axes: tuple, hf: str, gguf: str | None, init: str, layout: Layout = SAME) -> ParamDecl:
    """A norm weight or bias."""
    return ParamDecl(path, tuple(shape), tuple(axes), hf, gguf, layout, init=init)


class Declarations:
    """A family's declared parameters for one config, by path (see the module docstring).
    experts_per_token: of an expert stack, how many experts a token multiplies."""

    def __init__(self, decls: Iterable[ParamDecl], num_layers: int, experts_per_token: int = 0):
        self.num_layers = num_layers
        self.experts_per_token = experts_per_token
        self.by_path: dict[str, ParamDecl] = {}
        for d in decls:
            if d.path in self.by_path:
                raise FerrumError.internal(f"parameter {d.path} declared twice")
            self.by_path[d.path] = d

    def __iter__(self):
        return iter(self.by_path.values())

    def get(self, path: str) -> ParamDecl | None:
        return self.by_path.get(path)

    def __getitem__(self, path: str) -> ParamDecl:
        if path not in self.by_path:
            raise FerrumError.internal(f"parameter {path} is not declared")
        return self.by_path[path]

    def weight_of(self, path: str) -> ParamDecl | None:
        """The linear weight declaration a flat path belongs to (its weight or its scale)."""
        if path.endswith(SCALE):
            path = path.removesuffix(SCALE) + WEIGHT
        d = self.by_path.get(path)
        return d if d is not None and d.n_in is not None else None

    def num_parameters(self) -> int:
        """Float parameters (a tied lm_head is not declared, so not counted twice)."""
        return sum(math.prod(d.shape) * (self.num_layers if d.per_layer else 1) for d in self)

    def is_expert_stack(self, path: str) -> bool:
        """Whether `path` is a mixture of experts' stack (its first axis indexes the experts)."""
        d = self.by_path.get(path)
        return d is not None and d.axes[:1] == ("experts",)

    def layer_matmul_parameters(self) -> int:
        """The decoder layers' weights each token multiplies (2 FLOPs a weight): the linear ones,
        and of an expert stack the experts a token takes."""
        total = 0
        for d in self:
            if d.per_layer and self.is_expert_stack(d.path):
                total += math.prod(d.shape[1:]) * self.experts_per_token * self.num_layers
            elif d.per_layer and d.n_in is not None:
                total += math.prod(d.shape) * self.num_layers
        return total

    def vocab_axis(self, path: str) -> int | None:
        """The vocabulary axis of `path` counted from the end (a quantized weight's scales end with
        its output axes, so the same index holds for them), or None."""
        d = self.weight_of(path) or self.by_path.get(path)
        if d is None or "vocab" not in d.axes:
            return None
        return d.axes.index("vocab") - len(d.axes)


def name_pattern(template: str) -> re.Pattern:
    """A checkpoint name template (`{}` for the layer index, then any further indexes) as a
    regex capturing each index."""
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


def scale_path(weight_path: str) -> str:
    return weight_path.removesuffix(WEIGHT) + SCALE
