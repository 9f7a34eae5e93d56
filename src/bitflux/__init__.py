"""bitflux: 1.58-bit (ternary) FLUX transformers — quantize, store, and run them."""

__version__ = "0.1.0"

from .checkpoint import save_transformer  # noqa: E402
from .config import TernaryConfig  # noqa: E402
from .convert import quantize_checkpoint  # noqa: E402
from .demo import demo_model_path  # noqa: E402
from .errors import BitfluxError  # noqa: E402
from .fusion import fuse_projections  # noqa: E402
from .graphs import cuda_graphed  # noqa: E402
from .interop import register_with_diffusers  # noqa: E402
from .linear import TernaryLinear  # noqa: E402
from .pipeline import (  # noqa: E402
    encode_prompts,
    generate,
    load_pipeline,
    load_transformer,
    quantize_pipeline,
)
from .surgery import QuantizationReport, quantize_, set_activations, set_packing  # noqa: E402

register_with_diffusers()  # diffusers' from_pretrained then loads bitflux folders


def __getattr__(name: str):
    # diffusers' quantization config: importing diffusers' quantizers takes seconds, so only on first use
    if name == "BitfluxQuantizationConfig":
        from .interop.diffusers_quantizer import BitfluxQuantizationConfig

        return BitfluxQuantizationConfig
    raise AttributeError(f"module 'bitflux' has no attribute {name!r}")


__all__ = ["BitfluxError", "BitfluxQuantizationConfig", "QuantizationReport", "TernaryConfig", "TernaryLinear",
           "__version__", "cuda_graphed", "demo_model_path", "encode_prompts", "fuse_projections", "generate", "load_pipeline", "load_transformer",
           "quantize_pipeline", "quantize_", "quantize_checkpoint", "save_transformer", "set_activations", "set_packing"]
