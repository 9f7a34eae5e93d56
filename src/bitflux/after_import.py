"""Run a function once a module is imported, now or whenever that happens: bitflux registers its torch
operators and its diffusers quantizer without importing torch or diffusers itself, so `import bitflux` stays
a few milliseconds (the `bitflux` command then catches a Ctrl-C during torch's seconds-long import)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def after_import(name: str, then: Callable[[], None]) -> None:
    """then() now if module `name` is imported, else right after its import completes."""
    if name in sys.modules:
        then()
    elif not any(isinstance(f, _Finder) and (f.name, f.then) == (name, then) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, then))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds module `name` as the other finders would, and wraps its loading to call then() after it."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then(module):
            load(module)
            self.then()

        spec.loader.exec_module = load_then
        return spec
