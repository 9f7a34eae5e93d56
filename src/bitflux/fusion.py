"""Fused projections: an attention's q, k and v ternary layers run as one GEMM over one tensor of codes.

FLUX's attention projects the same hidden states three times (to_q, to_k, to_v; the double blocks again for
the text tokens: add_q_proj, add_k_proj, add_v_proj). One GEMM of 3 x 3072 outputs instead of three of 3072
is one layer call instead of three: one call's kernel launches (and one activation quantization in the 8-bit
modes) where there were three, and a shape that fills a GPU better (at 4096 tokens fp8 ran the 3072 x 3072
layers at 0.77-1.03x of bf16 and the 18432 x 3072 ones at 1.18-1.34x: BENCHMARKS.md).

Nothing is held twice: the three layers' codes are moved into one tensor and each layer's `weight_packed`
becomes a row view of it. The layers keep their names and buffers, so state_dict, saving, LoRA, GGUF export
and inspect see the model as before; diffusers' own fused path (`attn.fused_projections`, `attn.to_qkv`,
`attn.to_added_qkv`) calls a FusedProjection, which holds no tensor: it looks its layers up on the attention
at every call and runs kernels.ternary_linear_rows over their codes. diffusers' `unfuse_qkv_projections()`
undoes it (the views stay: they cost nothing).

It computes what the layers hold at the time. Codes that are no longer views of one tensor (new codes from a
fused LoRA or set_packing, a model moved to another device with .to()) are gathered into one again at the
next eager call, or by gather_fused (set_packing and accelerate_transformer call it: while a CUDA graph is
captured or torch.compile traces, such layers run one by one). New or rewritten scales and biases are joined
again. A layer's forward hooks (LoRA side branches) run on its slice of the fused output; a replaced layer, or
one with other hooks or a replaced forward (accelerate's sequential offloading), makes its attention run the
layers one by one, so that those run.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .errors import BitfluxError
from .kernels import (
    consecutive_rows,
    needs_gradient,
    ternary_linear_rows,
    ternary_linear_rows_op,
)
from .linear import TernaryLinear

# diffusers attribute of the fused layer -> the layers it replaces, in diffusers' chunk order
GROUPS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fusible(layers: list[nn.Module]) -> bool:
    """Ternary layers that one GEMM can compute together: the same _settings, on one device."""
    if not layers or not all(isinstance(layer, TernaryLinear) for layer in layers):
        return False
    first = (_settings(layers[0]), layers[0].weight_packed.device)
    return all((_settings(layer), layer.weight_packed.device) == first for layer in layers[1:])


def _needs_own_call(layer: nn.Module) -> bool:
    """A layer whose call does more than forward + plain forward hooks (which run on its slice of the fused
    output): pre-hooks, hooks taking kwargs or always called, backward hooks, a replaced forward (accelerate's
    sequential offloading), global hooks."""
    hooks = nn.modules.module
    return bool(layer._forward_pre_hooks or layer._forward_hooks_with_kwargs or layer._forward_hooks_always_called
                or layer._backward_hooks or layer._backward_pre_hooks or "forward" in layer.__dict__
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def _settings(layer: TernaryLinear) -> tuple:
    """What layers computed as one must share besides a device: inputs, packing, activations, scale groups,
    dtypes, and all or none a bias."""
    return (layer.in_features, layer.packing, layer.activations, layer.group_size, layer.weight_scale.dtype,
            None if layer.bias is None else layer.bias.dtype)


def _run_forward_hooks(layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each layer's forward hooks (LoRA side branches) on its own (contiguous) slice of y, as its call would."""
    outputs = [part.contiguous() for part in y.split([layer.out_features for layer in layers], dim=-1)]
    for i, layer in enumerate(layers):
        for hook in tuple(layer._forward_hooks.values()):  # another thread may add or remove one meanwhile
            result = hook(layer, (x,), outputs[i])
            if result is not None:
                outputs[i] = result
    return torch.cat(outputs, dim=-1)


def _gatherable(packed: list[torch.Tensor]) -> bool:
    """Codes to gather again: some layer holds new ones (not a view), or views of another tensor (a fused
    LoRA's unfuse() puts back the view it took). Views of one tensor whose storage was swapped under them
    (`.data =`: diffusers' group offloading moves buffers so, and finds them again by identity) are left as
    they are, and run one by one."""
    return any(codes._base is None or codes._base is not packed[0]._base for codes in packed)


# Not inference tensors even when called under inference_mode: the layers' buffers must stay writable in place
# (load_state_dict) outside it.
@torch.inference_mode(False)
@torch.no_grad()
def gather_codes(layers: list[TernaryLinear]) -> None:
    """Move the layers' codes into one tensor, each layer's `weight_packed` a view of its rows."""
    packed = torch.cat([layer.weight_packed for layer in layers])
    start = 0
    for layer in layers:
        layer.weight_packed = packed[start:start + layer.out_features]
        start += layer.out_features


def weak_reference(obj: object | None):
    """weakref.ref(obj); for None (what a copy or pickle of a dead reference holds) a callable that answers None,
    as the dead reference did."""
    return _dead_reference if obj is None else weakref.ref(obj)


def _dead_reference() -> None:
    """A dead weak reference's answer, for a copy of one."""


class FusedProjection(nn.Module):
    """y = cat([layer(x) for layer in the attention's `names`], -1), as one ternary GEMM."""

    def __init__(self, attention: nn.Module, names: tuple[str, ...]):
        super().__init__()
        # Its parent, held weakly: not registered as a submodule, and no reference cycle, which would keep a deleted
        # model's codes (on a GPU too) until Python's garbage collector runs.
        self._attention = weakref.ref(attention)
        self.names = names

    def layers(self) -> list[nn.Module]:
        attention = self._attention()
        if attention is None:
            raise BitfluxError(f"this fused projection ({', '.join(self.names)}) outlived its attention module, "
                               "whose layers it runs: copy or save the attention (or the model) with it")
        return [getattr(attention, name) for name in self.names]

    # A copy or a pickle holds the attention it copies along (a deep copy: the copied attention); one that is gone
    # stays gone.
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_attention": self._attention()}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "_attention": weak_reference(state["_attention"])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers()
        compiling = torch.compiler.is_compiling()
        if (not all(isinstance(layer, TernaryLinear) for layer in layers)
                or any(_needs_own_call(layer) for layer in layers)
                or (compiling and needs_gradient(x, *(tensor for layer in layers
                                                      for tensor in (layer.weight_scale, layer.bias))))):
            return self._separately(layers, x)  # the operator has no backward
        first = layers[0]
        packed = [layer.weight_packed for layer in layers]
        scales = [layer.weight_scale for layer in layers]
        biases = None if first.bias is None else [layer.bias for layer in layers]
        if compiling:
            if not fusible(layers):
                return self._separately(layers, x)
            y = ternary_linear_rows_op(x, packed, scales, biases or [], first.in_features, first.group_size or 0,
                                       first.activations, first.packing)
        else:
            rows = consecutive_rows(packed)
            if rows is None or not fusible(layers):
                capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()  # no copies into a graph
                if capturing or not gather_again(layers):
                    return self._separately(layers, x)
                packed = [layer.weight_packed for layer in layers]
                rows = consecutive_rows(packed)
            y = ternary_linear_rows(x, packed, scales, biases, first.in_features, first.group_size, first.packing,
                                    first.activations, rows)
        return _run_forward_hooks(layers, x, y) if any(layer._forward_hooks for layer in layers) else y

    @staticmethod
    def _separately(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in layers], dim=-1)

    def extra_repr(self) -> str:
        return f"fuses {', '.join(self.names)}"


def gather_again(layers: list[nn.Module]) -> bool:
    """Gather fusible layers' codes into one tensor again where they are no longer one tensor's rows (new codes
    from set_packing or a fused LoRA, a move to another device) and can be (_gatherable). Returns whether it
    did."""
    if not fusible(layers):
        return False
    packed = [layer.weight_packed for layer in layers]
    if consecutive_rows(packed) is not None or not _gatherable(packed):
        return False
    gather_codes(layers)
    return True


def gather_fused(model: nn.Module) -> int:
    """gather_again for every fused projection, as their next eager call would: for a model about to be
    compiled, which cannot. Returns how many were gathered."""
    return sum(gather_again(module.layers()) for module in model.modules() if isinstance(module, FusedProjection))


def fuse_projections(model: nn.Module) -> int:
    """Run each attention's ternary q/k/v projections (and its added ones for the text tokens) as one GEMM.
    Returns how many attention modules were fused (diffusers' FLUX attention runs attn.to_qkv when
    attn.fused_projections is set).
    The same codes, scales and per-token activation quantization as the separate layers: on the reference and
    cpu backends the same results (exactly, in the 8-bit modes); on a GPU the joined shape may take another
    strategy, whose sums round in another order."""
    fused = 0
    for module in model.modules():
        if getattr(module, "fused_projections", None) is not False:
            continue  # not a diffusers attention, or already fused
        groups = {name: [getattr(module, part, None) for part in parts] for name, parts in GROUPS.items()}
        present = {name: layers for name, layers in groups.items() if any(layer is not None for layer in layers)}
        if "to_qkv" not in present or not all(fusible(layers) for layers in present.values()):
            continue  # diffusers' fused path needs every group that exists fused
        for name, layers in present.items():
            gather_codes(layers)
            setattr(module, name, FusedProjection(module, GROUPS[name]))
        module.fused_projections = True
        fused += 1
    return fused
