"""Cross-entropy over rows of logits (the language-model loss): Triton kernel, custom op and the
plain-PyTorch reference. `rwkv_ft.models.loss` runs the head over blocks of rows and calls it."""

from .cross_entropy import cross_entropy_rows
from .reference import IGNORE_INDEX, cross_entropy_rows_reference

__all__ = ["IGNORE_INDEX", "cross_entropy_rows", "cross_entropy_rows_reference"]
