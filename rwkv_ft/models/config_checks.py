"""Checks of model-shape fields, so that a bad config.json is named instead of crashing later."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rwkv_ft.io import CheckpointError


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_int(mapping: Mapping[str, Any], key: str, source: str) -> int:
    """mapping[key] as a positive int, or a CheckpointError naming `source` and the field."""
    if key not in mapping or mapping[key] is None:
        raise CheckpointError(f"{source}: the field {key!r} is missing; it is needed to build the model")
    value = mapping[key]
    if not _is_positive_int(value):
        raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def check_positive_fields(config_name: str, **fields: Any) -> None:
    """Raise ValueError naming the first field that is not a positive int (config __init__ checks)."""
    for key, value in fields.items():
        if not _is_positive_int(value):
            raise ValueError(f"{config_name}: {key} must be a positive integer, got {value!r}")


WKV_BACKENDS = ("auto", "triton", "torch")


def check_wkv_backend(backend: Any) -> None:
    """Raise ValueError unless `backend` is a WKV backend every architecture has (config __init__ checks)."""
    if backend not in WKV_BACKENDS:
        raise ValueError(f"wkv_backend must be 'auto', 'triton' or 'torch', got {backend!r}")
