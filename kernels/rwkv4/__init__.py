"""RWKV-4 WKV operator: Triton kernels, autograd function and the plain-PyTorch reference."""

from .reference import EMPTY_MAX, empty_wkv_state, wkv4_reference
from .wkv4 import wkv4

__all__ = ["EMPTY_MAX", "empty_wkv_state", "wkv4", "wkv4_reference"]
