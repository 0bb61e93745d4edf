"""RWKV-7 WKV operator: Triton kernels, autograd function and the plain-PyTorch reference."""

from .reference import wkv7_reference
from .wkv7 import wkv7

__all__ = ["wkv7", "wkv7_reference"]
