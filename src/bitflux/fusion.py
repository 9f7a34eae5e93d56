"""Fused projections: an attention's q, k and v ternary layers run as one GEMM over one tensor of codes.

FLUX's attention projects the same hidden states three times (to_q, to_k, to_v; the double blocks again for
the text tokens: add_q_proj, add_k_proj, add_v_proj). One GEMM of 3 x 3072 outputs instead of three of 3072
is one layer call instead of three: one kernel launch (and one activation quantization in the 8-bit modes)
where there were three, and a shape that fills a GPU better (at 4096 tokens fp8 ran the 3072 x 3072 layers at
0.77-1.03x of bf16 and the 18432 x 3072 ones at 1.18-1.34x: BENCHMARKS.md).

Nothing is held twice: the three layers' codes are moved into one tensor and each layer's `weight_packed`
becomes a row view of it. The layers keep their names and buffers, so state_dict, saving, LoRA, GGUF export
and inspect see the model as before; diffusers' own fused path (`attn.fused_projections`, `attn.to_qkv`,
`attn.to_added_qkv`) calls a FusedProjection, which holds no tensor of its own that state_dict would list.
diffusers' `unfuse_qkv_projections()` undoes it (the views stay: they cost nothing).

A FusedProjection computes what its layers hold now: if one of them was given new codes (a fused LoRA, a move
to another device), the codes are gathered into one tensor again at the next call; new scales or biases
(replaced, or written in place) are concatenated again. While a CUDA graph is captured or torch.compile
traces, it cannot do that, and runs the layers one by one. Layers with forward hooks (LoRA side branches) or
a replaced forward (accelerate's sequential offloading) are run one by one as well, so that those run.
"""

from __future__ import annotations

import importlib
import weakref

import torch
from torch import nn

from .kernels import TernaryWeight, needs_gradient, ternary_linear, ternary_linear_op
from .linear import TernaryLinear

# diffusers attribute of the fused layer -> the layers it replaces, in diffusers' chunk order
GROUPS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _signature(layer: TernaryLinear) -> tuple:
    """What the fused tensors were made from: the layer's tensors (weakly: a model moved elsewhere must not be
    held here) and the in-place writes to its scales and bias. Its codes are views of the fused tensor, so
    writes to them are writes to it."""
    bias = layer.bias
    return (weakref.ref(layer.weight_packed), weakref.ref(layer.weight_scale), layer.weight_scale._version,
            None if bias is None else weakref.ref(bias), None if bias is None else bias._version,
            layer.state_loads)


def _unchanged(layer: TernaryLinear, signature: tuple) -> bool:
    packed, scales, scales_version, bias, bias_version, loads = signature
    return (packed() is layer.weight_packed and scales() is layer.weight_scale
            and scales_version == layer.weight_scale._version and loads == layer.state_loads
            and (layer.bias is None if bias is None else bias() is layer.bias and bias_version == layer.bias._version))


def _channel_scales(layer: TernaryLinear) -> torch.Tensor:
    """The layer's scales with one row per output (a per-tensor scale repeated): rows of the fused layer."""
    scales = layer.weight_scale
    return scales.expand(layer.out_features, scales.shape[1]) if scales.shape[0] == 1 else scales


def fusible(layers: list[nn.Module]) -> bool:
    """Ternary layers that one GEMM can compute together: same inputs, packing, activations, scale groups,
    device and dtypes, and all or none with a bias."""
    if not layers or not all(isinstance(layer, TernaryLinear) for layer in layers):
        return False
    first = layers[0]

    def kind(layer):
        return (layer.in_features, layer.packing, layer.activations, layer.group_size, layer.weight_packed.device,
                layer.weight_scale.dtype, layer.bias is None, None if layer.bias is None else layer.bias.dtype)

    return all(kind(layer) == kind(first) for layer in layers)


class FusedProjection(nn.Module):
    """y = cat([layer(x) for layer in layers], -1), as one ternary GEMM."""

    def __init__(self, layers: list[TernaryLinear]):
        super().__init__()
        # A tuple, not submodules: the layers stay where they are in the module tree, and in state_dict once.
        self._layers = tuple(layers)
        self.out_features = sum(layer.out_features for layer in layers)
        # The codes are held by the layers' views only: a model moved to another device frees them.
        self._packed: weakref.ref | None = None
        self._scales = self._bias = None
        self._signatures: tuple = ()
        self._refresh()

    # Not inference tensors even when called under inference_mode: the layers' buffers must stay writable in
    # place (load_state_dict) outside it.
    @torch.inference_mode(False)
    @torch.no_grad()
    def _refresh(self) -> None:
        layers = self._layers
        packed = self.packed()
        if packed is None or any(layer.weight_packed._base is not packed for layer in layers):
            packed = torch.cat([layer.weight_packed for layer in layers])
            start = 0
            for layer in layers:
                layer.weight_packed = packed[start:start + layer.out_features]
                start += layer.out_features
            self._packed = weakref.ref(packed)
        self._scales = torch.cat([_channel_scales(layer) for layer in layers])
        self._bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        self._signatures = tuple(_signature(layer) for layer in layers)

    def packed(self) -> torch.Tensor | None:
        """The fused codes (None once the layers no longer hold them)."""
        return self._packed() if self._packed is not None else None

    def _separately(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self._layers], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self._layers
        if any(layer._forward_hooks or layer._forward_pre_hooks or "forward" in layer.__dict__ for layer in layers):
            return self._separately(x)  # hooks, or a forward replaced (accelerate's offloading) must run
        if torch.compiler.is_compiling():
            packed = self.packed()
            if packed is None or needs_gradient(x):  # the operator has no backward (as in TernaryLinear)
                return self._separately(x)
            # traced once: the fused tensors as they were (a change to the layers needs a new compile)
            first = layers[0]
            return ternary_linear_op(x, packed, self._scales, self._bias, first.in_features, self.out_features,
                                     first.group_size or 0, first.activations, first.packing)
        if not fusible(list(layers)):
            return self._separately(x)
        if not all(_unchanged(layer, signature) for layer, signature in zip(layers, self._signatures)):
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return self._separately(x)  # no copies into a graph being captured
            self._refresh()
        first = layers[0]
        weight = TernaryWeight(self.packed(), self._scales, first.in_features, self.out_features, first.group_size,
                               first.packing)
        return ternary_linear(x, weight, self._bias, first.activations)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, fuses {len(self._layers)} ternary layers"


def _diffusers_reads_fused_flag() -> bool:
    """diffusers' FLUX attention runs attn.to_qkv when attn.fused_projections is set (newer diffusers; older
    ones switch processors instead, which this does not do)."""
    try:
        flux = importlib.import_module("diffusers.models.transformers.transformer_flux")
    except ImportError:
        return False
    return hasattr(flux, "_get_fused_projections")


def fuse_projections(model: nn.Module) -> int:
    """Run each attention's ternary q/k/v projections (and its added ones for the text tokens) as one GEMM.
    Returns how many attention modules were fused; 0 with a diffusers too old to read `fused_projections`.
    Numerics are those of the separate layers (the same codes, scales and activation quantization)."""
    if not _diffusers_reads_fused_flag():
        return 0
    fused = 0
    for module in model.modules():
        if getattr(module, "fused_projections", None) is not False:
            continue  # not a diffusers attention, or already fused
        groups = {name: [getattr(module, part, None) for part in parts] for name, parts in GROUPS.items()}
        present = {name: layers for name, layers in groups.items() if any(layer is not None for layer in layers)}
        if "to_qkv" not in present or not all(fusible(layers) for layers in present.values()):
            continue  # diffusers' fused path needs every group that exists fused
        for name, layers in present.items():
            setattr(module, name, FusedProjection(layers))
        module.fused_projections = True
        fused += 1
    return fused
