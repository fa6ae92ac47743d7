"""Conversion of the interface dataclasses to JSON-safe dicts.

The Rust originals derive serde `Serialize`; `to_dict()` is the Python counterpart, so
status and metrics can be shipped over HTTP or logged as JSON without each class
hand-writing its own conversion.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from ferrum_jax.interfaces.errors import FerrumError

# Field metadata key marking a field that must not be serialised (serde's `#[serde(skip)]`).
SKIP_SERIALIZATION = "skip_serialization"


def to_json_safe(value: Any) -> Any:
    """Recursively convert `value` into str/int/float/bool/None/list/dict only.

    Enums become their `.value`, objects with a `to_json_value()` hook (Device) become
    what it returns, dataclasses become dicts of their non-skipped fields, and non-finite floats
    become None because that is what serde_json writes for NaN/inf and strict JSON has no
    spelling for them.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_json_safe(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "to_json_value"):
        return value.to_json_value()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json_safe(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get(SKIP_SERIALIZATION, False)
        }
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    # numpy scalars (np.float32 from a metric computation, np.int64 from a shape) are common
    # in executor code; `.item()` turns them into the matching Python scalar.
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return to_json_safe(item())
    raise FerrumError.invalid_request(
        f"cannot serialise value {value!r} of type {type(value).__name__} to JSON; "
        "only str/int/float/bool/None, enums, Device, dataclasses, dicts and lists are supported"
    )


class JsonSerializable:
    """Mixin giving a dataclass `to_dict()`; see `to_json_safe` for the conversion rules."""

    def to_dict(self) -> dict[str, Any]:
        return to_json_safe(self)
