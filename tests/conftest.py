import os

# Triton kernels run on CPU under the interpreter in CI. triton reads this when a kernel is
# decorated, so it must be set before any test module imports a Triton kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (scripts/test.sh) hands whole files to its processes in collection order: the files
# that take minutes go first, so that none of them is left running alone at the end.
SLOWEST_FILES = (
    "test_distributed.py",
    "test_wkv7.py",
    "test_compile.py",
    "test_wkv4.py",
    "test_faults.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: order within a file kept


from rwkv_ft.testing import patch_the_triton_language_once_per_module_and_launch  # noqa: E402

patch_the_triton_language_once_per_module_and_launch()  # test speed: see its docstring
