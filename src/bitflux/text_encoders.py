"""The text encoders held in their checkpoint's 16-bit dtype and computed in a wider one.

FLUX.1 ships its text encoders in bf16 (T5-XXL: 9.5 GB), and a CPU runs them in fp32, whose matmuls are
several times faster there than bf16's. Loaded in fp32 they take twice the memory for no extra precision:
T5-XXL alone 19 GB, the whole FLUX.1-dev pipeline with the ternary transformer more than a 24 GiB machine.
Here each linear layer keeps its stored weight and widens it for its own use only (a transient the size of one
layer), and the small rest (embeddings, norms, biases) is widened once. Every widened value is the stored
one exactly, so the outputs are those of the encoder loaded in the wide dtype.
"""

from __future__ import annotations

import importlib
import json
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import _TORCH_DTYPES, read_safetensors_header, weight_files
from .errors import BitfluxError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # FluxPipeline's: CLIP-L and T5-XXL


class _Widened(nn.Module):
    """A parametrization: the stored weight, read in `dtype`. The latest widening, of any layer, is kept until
    the next: a weight read again before another one is not widened again (T5 reads its `wo` weight's dtype
    twice before calling it), and no more than one layer's wide copy outlives its use."""

    latest: tuple = (None, None, None)  # (weakref to the stored weight, its version, the widened weight)

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and stored.requires_grad:
            return stored.to(self.dtype)  # a widening in an autograd graph is not shared between calls
        ref, version, widened = _Widened.latest  # one read: another thread may replace it
        if ref is None or ref() is not stored or version != stored._version or widened.dtype != self.dtype:
            widened = stored.to(self.dtype)
            _Widened.latest = (weakref.ref(stored), stored._version, widened)
        return widened


def widen_on_use(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> nn.Module:
    """The module's linear weights stored in `storage` and read in `compute` at each use; its other floating
    parameters and buffers converted to `compute`. Exact only for weights whose values `storage` holds (what
    a checkpoint in `storage` loads)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and not parametrize.is_parametrized(layer, "weight"):
            layer.weight.data = layer.weight.data.to(storage)  # transformers keeps some (T5's wo) wider
            # unsafe: the parametrization changes the dtype, which torch checks against by default
            parametrize.register_parametrization(layer, "weight", _Widened(compute), unsafe=True)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not name.endswith("parametrizations.weight.original"):
            tensor.data = tensor.data.to(compute)
    return module


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    """The one floating dtype of a model folder's safetensors weights, or None (none, or several)."""
    dtypes = {info["dtype"] for file in weight_files(folder)
              for name, info in read_safetensors_header(file).items() if name != "__metadata__"}
    floating = {_TORCH_DTYPES.get(name) for name in dtypes} - {None}
    floating = {dtype for dtype in floating if dtype.is_floating_point}
    return floating.pop() if len(floating) == 1 else None


def narrow_text_encoders(root: Path, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The pipeline folder's text encoders whose checkpoints are narrower than `dtype` (bf16 or fp16 ones, for
    fp32), loaded in their own dtype and computed in `dtype` (widen_on_use); the others are left to diffusers."""
    index = json.loads((root / "model_index.json").read_text())
    loaded = {}
    for name in TEXT_ENCODERS:
        folder = root / name
        library, class_name = (index.get(name) or [None, None])[:2]
        if library != "transformers" or not folder.is_dir():
            continue
        try:
            storage = checkpoint_dtype(folder)
        except BitfluxError:
            continue  # no safetensors (pickle weights): diffusers loads it as it can
        if storage is None or storage.itemsize >= dtype.itemsize:
            continue
        model_class = getattr(importlib.import_module(library), class_name)
        model = widen_on_use(model_class.from_pretrained(str(folder), torch_dtype=storage, local_files_only=True),
                             storage, dtype)
        # FluxPipeline casts an encoder's outputs to the dtype it reports, its first parameter's: the token
        # embedding, widened, in CLIP and T5; one whose first parameter is a stored weight is widened whole
        loaded[name] = model if model.dtype == dtype else model.to(dtype)
    return loaded
