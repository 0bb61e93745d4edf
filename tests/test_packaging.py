"""A non-editable install ships every package: each folder under rwkv_ft/, each kernels/<op>/ as
rwkv_ft.kernels.<op>, the bundled vocabulary, and never a top-level `kernels` package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "rwkv_ft", "kernels")


def _can_build_wheels() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):  # bdist_wheel is built in
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def expected_wheel_files() -> set[str]:
    """Every .py file of the source tree, at the path an install must put it."""
    files = {f"rwkv_ft/{p.relative_to(ROOT / 'rwkv_ft').as_posix()}" for p in (ROOT / "rwkv_ft").rglob("*.py")}
    for init in (ROOT / "kernels").glob("*/__init__.py"):
        op = init.parent
        files |= {f"rwkv_ft/kernels/{op.name}/{p.relative_to(op).as_posix()}" for p in op.rglob("*.py")}
    return files


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The file names in a wheel built from a copy of the sources (the checkout stays untouched)."""
    if not _can_build_wheels():
        pytest.skip("this environment's setuptools has no bdist_wheel (needs setuptools >= 70.1 or `wheel`)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if not path.exists():
            continue
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("rwkv_ft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_every_package_and_kernel_folder_is_in_the_wheel(wheel_files):
    expected = expected_wheel_files()
    assert "rwkv_ft/models/rwkv7/modeling_rwkv7.py" in expected and "rwkv_ft/kernels/rwkv7/wkv7.py" in expected
    missing = sorted(expected - wheel_files)
    assert not missing, f"a non-editable install would lack: {missing}"
    assert "rwkv_ft/tokenizers/rwkv_vocab_v20230424.txt" in wheel_files


def test_kernels_is_never_a_top_level_package(wheel_files):
    assert not [name for name in wheel_files if name.startswith("kernels/")]
    assert not (ROOT / "kernels" / "__init__.py").exists(), "see DEVELOPERS.md: never add kernels/__init__.py"


# Declared minimums CI cannot install on its CPU machine; ci/lower-bounds.txt says why (they are the
# GPU machine's torch 2.11 / triton 3.6 pair, exercised by the GPU benchmark scripts).
NOT_PINNED_AT_THE_MINIMUM = {"torch", "triton"}


def test_lower_bounds_file_pins_every_declared_minimum():
    """CI's lower-bound run (ci/lower-bounds.txt) tests exactly the minimums pyproject.toml declares,
    its optional extras' included."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The dependencies and the optional extras users install (dev's tools are pinned, not bounded).
    extras = [spec for name, specs in project["optional-dependencies"].items() if name != "dev" for spec in specs]
    declared = {}
    for spec in [*project["dependencies"], *extras]:
        requirement = Requirement(spec)
        minimums = [s.version for s in requirement.specifier if s.operator == ">="]
        assert minimums, f"pyproject.toml: {spec!r} declares no lower bound"
        declared[requirement.name.lower().replace("_", "-")] = Version(minimums[0])
    pinned = {}
    for line in (ROOT / "ci" / "lower-bounds.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name.strip().lower().replace("_", "-")] = Version(version.strip())
    assert set(pinned) <= set(declared), f"pinned but not a dependency: {sorted(set(pinned) - set(declared))}"
    for name, minimum in declared.items():
        if name in NOT_PINNED_AT_THE_MINIMUM:
            continue
        found = pinned.get(name)
        assert found == minimum, f"{name}: pyproject.toml says >={minimum}, ci/lower-bounds.txt pins {found}"
