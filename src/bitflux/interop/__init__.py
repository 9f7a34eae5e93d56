"""Interoperability: GGUF files with ggml's ternary blocks (gguf.py), LoRA side branches (lora.py) and
diffusers' pipeline LoRA methods run by them (pipeline_lora.py), and diffusers' own from_pretrained of bitflux
folders (diffusers_quantizer.py)."""

from __future__ import annotations

import importlib

from ..after_import import after_import


def register_with_diffusers() -> None:
    """bitflux's quantizer put in diffusers' table once diffusers' quantizers are loaded (now if they are)."""
    after_import("diffusers.quantizers.auto", _import_quantizer)


def _import_quantizer() -> None:
    importlib.import_module(f"{__name__}.diffusers_quantizer")  # registers as it is imported
