"""diffusers FluxPipeline with a bitflux transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_transformer
from .errors import BitfluxError


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers FluxPipeline from a bitflux pipeline folder (transformer ternary, the rest as saved)."""
    from diffusers import FluxPipeline

    root = Path(path)
    if not (root / "model_index.json").exists():
        raise BitfluxError(f"{root}: not a pipeline folder (no model_index.json)")
    transformer = load_transformer(root / "transformer", device=device, dtype=dtype)
    pipe = FluxPipeline.from_pretrained(str(root), transformer=transformer, torch_dtype=dtype, local_files_only=True)
    return pipe.to(device)
