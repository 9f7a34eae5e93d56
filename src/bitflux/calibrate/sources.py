"""Where full-precision weights come from, one submodule at a time, so calibration never needs the
whole full-precision transformer beside the student."""

from __future__ import annotations

import copy
import hashlib
import math
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .. import checkpoint
from ..flux import build_transformer, check_flux_config


def weights_fingerprint(first_values) -> str:
    """Which weights these are, whoever holds them (a calibration workdir belongs to them): a hash of every
    tensor's name and first 64 values in fp32. Another checkpoint of the same architecture (a fine-tune, a merge)
    differs there; reading every value would take a minute for FLUX.1-dev's 24 GB."""
    digest = hashlib.sha256()
    for name, values in sorted(first_values, key=lambda item: item[0]):
        digest.update(name.encode() + values.float().cpu().numpy().tobytes())
    return digest.hexdigest()


class ModelSource:
    """Copies of the submodules of a full-precision transformer held in memory (the caller's, untouched)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = dict(model.config)

    def load(self, name: str, device) -> nn.Module:
        return copy.deepcopy(self.model.get_submodule(name)).to(device)

    def fingerprint(self) -> str:
        """weights_fingerprint of the parameters held in memory."""
        with torch.no_grad():
            return weights_fingerprint((name, p.detach().reshape(-1)[:64]) for name, p in self.model.named_parameters())


class FolderSource:
    """Submodules read from a diffusers transformer folder (safetensors), tensor by tensor, floating-point
    tensors cast to `dtype` when given."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None):
        self.dtype = dtype
        folder = Path(folder)
        if (folder / "model_index.json").exists():
            folder = folder / "transformer"
        self.config = checkpoint.read_config(folder)
        check_flux_config(self.config, str(folder))
        self.file_of = {name: file for file in checkpoint.weight_files(folder)
                        for name in checkpoint.read_safetensors_header(file) if name != "__metadata__"}
        self.skeleton = build_transformer(self.config, "meta")

    def fingerprint(self) -> str:
        """weights_fingerprint of the folder's tensors, read as their first rows only."""
        by_file = defaultdict(list)
        for name, file in self.file_of.items():
            by_file[file].append(name)

        def first_values():
            for file, names in by_file.items():
                with safe_open(file, "pt") as f:
                    for name in names:
                        part = f.get_slice(name)
                        shape = part.get_shape()
                        row = max(1, math.prod(shape[1:]))
                        tensor = part[: -(-64 // row)] if shape else f.get_tensor(name)
                        yield name, tensor.reshape(-1)[:64]

        return weights_fingerprint(first_values())

    def load(self, name: str, device) -> nn.Module:
        module = copy.deepcopy(self.skeleton.get_submodule(name))
        prefix = f"{name}."
        by_file = defaultdict(list)
        for key, file in self.file_of.items():
            if key.startswith(prefix):
                by_file[file].append(key)
        state = {}
        for file, keys in by_file.items():
            with safe_open(str(file), "pt", device="cpu") as f:
                for key in keys:
                    # A copy of its own: safetensors >= 0.8 gives views of the mapped file, placed as the file
                    # lays them out (8-byte aligned), and some CPUs' BLAS sums in another order at such addresses.
                    tensor = f.get_tensor(key)
                    dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
                    state[key[len(prefix):]] = tensor.to(device, dtype, copy=True)
        module.load_state_dict(state, assign=True, strict=True)
        return module.to(device)  # nothing left on the skeleton's meta device (it would fail here)
