"""Model code, one folder per RWKV version.

A version package `rwkv_ft.models.rwkvN` holds `configuration_rwkvN.py` and `modeling_rwkvN.py`
(each registers its classes with transformers' Auto classes when imported, see `registration.py`)
and `conversion_rwkvN.py`, which registers the version's `Architecture` (see `architecture.py`)
with everything the version-free code asks.
"""

from __future__ import annotations

import importlib
from typing import Any

VERSION_PACKAGES = ("rwkv_ft.models.rwkv4", "rwkv_ft.models.rwkv7")

# Each version's Architecture, by the name tests and tools use (imported on first use).
_ARCHITECTURE_NAMES = {
    "RWKV4": "rwkv_ft.models.rwkv4.conversion_rwkv4",
    "RWKV7": "rwkv_ft.models.rwkv7.conversion_rwkv7",
}


def __getattr__(name: str) -> Any:
    if name in _ARCHITECTURE_NAMES:
        return getattr(importlib.import_module(_ARCHITECTURE_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
