"""Interoperability: GGUF files with ggml's ternary blocks (gguf.py), LoRA side branches (lora.py), and
diffusers' own from_pretrained of bitflux folders (diffusers_quantizer.py)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_DIFFUSERS_QUANTIZERS = "diffusers.quantizers.auto"


def register_with_diffusers() -> None:
    """bitflux's quantizer put in diffusers' table now if diffusers' quantizers are loaded, else as soon as they
    are: importing them here would add seconds to `import bitflux`."""
    if _DIFFUSERS_QUANTIZERS in sys.modules:
        importlib.import_module(f"{__name__}.diffusers_quantizer")  # registers as it is imported
    elif not any(isinstance(finder, _AfterDiffusersQuantizers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterDiffusersQuantizers())


class _AfterDiffusersQuantizers(importlib.abc.MetaPathFinder):
    """Finds diffusers' quantizer table as the other finders would, and registers bitflux's once it is loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DIFFUSERS_QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_register(module):
            load(module)
            register_with_diffusers()

        spec.loader.exec_module = load_then_register
        return spec
