import os

# Triton kernels run on CPU under the interpreter in CI. triton reads this when a kernel is
# decorated, so it must be set before any test module imports a Triton kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")
