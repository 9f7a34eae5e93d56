"""The embedded demo model: procedural shape scenes, their caption grammar, the training script, and the
trained diffusers FluxPipeline folder shipped inside the package (see docs/DEMO_MODEL.md)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BitfluxError


def demo_model_path() -> Path:
    """The shipped demo FluxPipeline folder (load with `FluxPipeline.from_pretrained`, generate at 64x64
    with max_sequence_length = its tokenizer_2.model_max_length)."""
    path = Path(__file__).parent / "model"
    if not (path / "model_index.json").is_file():
        raise BitfluxError(f"the demo model is missing from this installation ({path})")
    return path


def calibrated_transformer_path() -> Path | None:
    """The demo transformer calibrated to ternary (a bitflux folder, see docs/DEMO_MODEL.md), if shipped."""
    path = Path(__file__).parent / "ternary"
    return path if (path / "config.json").is_file() else None


__all__ = ["calibrated_transformer_path", "demo_model_path"]
