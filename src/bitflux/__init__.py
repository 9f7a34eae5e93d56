"""bitflux: 1.58-bit (ternary) FLUX transformers — quantize, store, and run them."""

__version__ = "0.1.0"

from .config import TernaryConfig  # noqa: E402
from .errors import BitfluxError  # noqa: E402
from .linear import TernaryLinear  # noqa: E402

__all__ = ["BitfluxError", "TernaryConfig", "TernaryLinear", "__version__"]
