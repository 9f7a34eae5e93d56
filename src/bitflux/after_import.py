"""Run a function once a module is imported, now or whenever that happens: bitflux registers its torch
operators and its diffusers quantizer without importing torch or diffusers itself, so `import bitflux` stays
a few milliseconds (the `bitflux` command then catches a Ctrl-C during torch's seconds-long import)."""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from collections.abc import Callable


def after_import(name: str, then: Callable[[], None]) -> None:
    """then() now if module `name` is imported, else right after its import completes. then() imports a module
    of bitflux's; where another thread is importing that one meanwhile, that thread's import does it."""
    if name in sys.modules:
        then()
    elif not any(isinstance(f, _Finder) and (f.name, f.then) == (name, then) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, then))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds module `name` as the finders after it would, and wraps its loading to call then() after it. It stays
    until the module is loaded: a lookup alone (importlib.util.find_spec) does not use it up."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        finders = list(sys.meta_path)
        after = finders[finders.index(self) + 1:] if self in finders else finders
        spec = next((spec for finder in after if hasattr(finder, "find_spec")
                     for spec in [finder.find_spec(fullname, path, target)] if spec is not None), None)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then(module):
            load(module)
            with contextlib.suppress(ValueError):  # another thread's import of it may have removed it
                sys.meta_path.remove(self)
            try:
                self.then()
            except RuntimeError as exc:
                # Python's _DeadlockError: another thread imports the module then() imports, and waits for this
                # one; that thread's import finishes it.
                if type(exc).__name__ != "_DeadlockError":
                    raise

        spec.loader.exec_module = load_then
        return spec
