"""Where bitflux keeps what it makes once and reuses: the demo model in ternary form, kernel choices."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("BITFLUX_CACHE", Path.home() / ".cache" / "bitflux"))
