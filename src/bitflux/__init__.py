"""bitflux: 1.58-bit (ternary) FLUX transformers — quantize, store, and run them."""

from __future__ import annotations

import importlib

from .after_import import after_import
from .interop import register_with_diffusers

__version__ = "0.1.0"

# The public names, each imported from its module on first use: `import bitflux` (which the `bitflux` command
# does before anything else) stays a few milliseconds, not the seconds torch and diffusers take, so that the
# command itself catches a Ctrl-C in its first second like any other.
_EXPORTS = {
    "BitfluxError": "errors",
    "BitfluxQuantizationConfig": "interop.diffusers_quantizer",
    "QuantizationReport": "surgery",
    "TernaryConfig": "config",
    "TernaryLinear": "linear",
    "cuda_graphed": "graphs",
    "demo_model_path": "demo",
    "encode_prompts": "pipeline",
    "fuse_projections": "fusion",
    "generate": "pipeline",
    "load_pipeline": "pipeline",
    "load_transformer": "pipeline",
    "quantize_": "surgery",
    "quantize_checkpoint": "convert",
    "quantize_pipeline": "pipeline",
    "save_transformer": "checkpoint",
    "set_activations": "surgery",
    "set_packing": "surgery",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule, as `bitflux.pipeline` after `import bitflux`
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'bitflux' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _register_operators() -> None:
    # torch.ops.bitflux.* (kernels): what a torch.export'ed or AOT-compiled model with ternary layers calls
    importlib.import_module(f"{__name__}.kernels")


after_import("torch", _register_operators)
register_with_diffusers()  # diffusers' from_pretrained then loads bitflux folders (bitflux.interop)
