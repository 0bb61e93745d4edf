"""Run a function right after a module is imported (or now, if it already is).

`import rwkv_ft` must stay cheap (the command line answers `--help` in well under a second), yet
registering our models with transformers' Auto classes and our default LoRA targets with peft
needs those libraries, which take seconds to import. So the registrations run when the user's
code (or ours) first imports the transformers / peft module they extend: a user who writes
`import rwkv_ft; from transformers import AutoModelForCausalLM` gets the registration at that
moment, one who imported transformers first gets it at `import rwkv_ft`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType

_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}
_LOCK = threading.RLock()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` once module `name` has been imported: now, or right after its import."""
    with _LOCK:
        module = sys.modules.get(name)
        if module is None:
            _PENDING.setdefault(name, []).append(callback)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    callback(module)


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks waiting for the module."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            callbacks = _PENDING.pop(self._name, [])
        for callback in callbacks:
            callback(module)

    def __getattr__(self, attr):  # get_source, get_filename, is_package, ... for tools that ask
        return getattr(self._loader, attr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


_FINDER = _PostImportFinder()
