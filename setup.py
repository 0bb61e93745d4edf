"""Which packages an install ships: the one thing pyproject.toml cannot compute for us.

Every package under `rwkv_ft/` is found by `find_packages`, and every `kernels/<op>/` holding an
`__init__.py` ships as `rwkv_ft.kernels.<op>`, so a new model version or kernel folder is never
left out of a non-editable install. `kernels/` itself is never a package: a top-level `kernels`
module would shadow the Hub's `kernels` package that transformers imports (see DEVELOPERS.md).
Everything else about the distribution is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def kernel_packages() -> dict[str, str]:
    """{"rwkv_ft.kernels.<op>": "kernels/<op>"} for every operator folder (relative paths, as setuptools wants)."""
    ops = sorted(init.parent.name for init in (ROOT / "kernels").glob("*/__init__.py"))
    return {f"rwkv_ft.kernels.{op}": f"kernels/{op}" for op in ops}


kernels = kernel_packages()
setup(
    packages=[*find_packages(where=str(ROOT), include=["rwkv_ft", "rwkv_ft.*"]), *kernels],
    package_dir={"rwkv_ft": "rwkv_ft", **kernels},
)
