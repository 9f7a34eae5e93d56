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
        self.name, self.then, self.done = name, then, False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        finders = list(sys.meta_path)
        after = finders[finders.index(self) + 1:] if self in finders else finders
        spec = next((spec for finder in after if hasattr(finder, "find_spec")
                     for spec in [finder.find_spec(fullname, path, target)] if spec is not None), None)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThen(spec.loader, self)
        return spec

    def loaded(self) -> None:
        # Once: another finder that looks the module up again (wrapt's) has this one wrap its loader twice
        if self.done:
            return
        self.done = True
        with contextlib.suppress(ValueError):  # another thread's import of it may have removed it
            sys.meta_path.remove(self)
        try:
            self.then()
        except RuntimeError as exc:
            # Python's _DeadlockError: another thread imports the module then() imports, and waits for this one;
            # that thread's import finishes it.
            if type(exc).__name__ != "_DeadlockError":
                raise


class _LoaderThen:
    """The found loader, and the finder's loaded() after it executes the module. A wrapper, not the loader's own
    exec_module replaced: another import hook's loader (wrapt's, which OpenTelemetry uses) may pass such an
    assignment on to the loader it wraps, whose exec_module would then call itself. The module keeps the found
    loader."""

    def __init__(self, loader, finder: _Finder):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create else None

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.finder.loaded()
