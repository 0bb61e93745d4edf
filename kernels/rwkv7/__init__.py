"""RWKV-7 WKV operator: Triton kernels, autograd function, the plain-PyTorch chunked path and the
per-token reference."""

from .chunked import wkv7_chunked
from .reference import wkv7_reference
from .wkv7 import wkv7

__all__ = ["wkv7", "wkv7_chunked", "wkv7_reference"]
