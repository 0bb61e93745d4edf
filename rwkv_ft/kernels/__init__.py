"""Kernels shipped with rwkv_ft. The sources live in the repository's top-level `kernels/` folder."""

from rwkv_ft.kernels.cross_entropy import cross_entropy_rows, cross_entropy_rows_reference
from rwkv_ft.kernels.rwkv4 import EMPTY_MAX, empty_wkv_state, wkv4, wkv4_reference
from rwkv_ft.kernels.rwkv7 import wkv7, wkv7_chunked, wkv7_reference

__all__ = [
    "EMPTY_MAX",
    "cross_entropy_rows",
    "cross_entropy_rows_reference",
    "empty_wkv_state",
    "wkv4",
    "wkv4_reference",
    "wkv7",
    "wkv7_chunked",
    "wkv7_reference",
]
