"""TernaryLinear: an nn.Linear replacement holding packed ternary codes and scales as buffers."""

from __future__ import annotations

import torch
from torch import nn

from . import formats
from .config import TernaryConfig
from .errors import BitfluxError
from .kernels import (TernaryWeight, forget_prepared, needs_gradient, reference, ternary_linear,
                      ternary_linear_op)
from .ternary import ternarize


class TernaryLinear(nn.Module):
    """y = x W^T + b with W = codes * scales, codes in {-1, 0, +1} packed in `packing` (formats.py): tq2,
    4 per byte, or tq1, 5 per byte. The layer keeps the model's packing in memory; the kernels read either.

    Buffers: `weight_packed` (out, ceil(in / codes per byte)) uint8, `weight_scale` (1 | out, 1 | groups),
    `bias`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        scale_shape: tuple[int, int] = (1, 1),
        scale_dtype: torch.dtype = torch.float32,
        activations: str = "a16",
        device=None,
        dtype=None,
        packing: str = "tq2",
    ):
        super().__init__()
        if packing not in formats.CODES_PER_BYTE:
            raise BitfluxError(f"unknown packing {packing!r}; choose one of {', '.join(formats.CODES_PER_BYTE)}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.activations = activations
        self.packing = packing
        self.register_buffer(
            "weight_packed",
            torch.full(formats.packed_shape(out_features, in_features, packing), formats.ZERO_BYTE[packing],
                       dtype=torch.uint8, device=device),
        )
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: TernaryConfig | None = None) -> "TernaryLinear":
        config = config or TernaryConfig()
        weight = linear.weight.detach()
        group_size = config.group_size_or_none
        if weight.device.type == "meta":
            shape = scale_shape(linear.out_features, linear.in_features, config.granularity, group_size)
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, shape,
                         config.scale_torch_dtype, config.activations, "meta", linear.weight.dtype,
                         packing=config.format)
            return module
        codes, scales = ternarize(weight, config.method, config.granularity, group_size)
        return cls.from_codes(codes, scales, linear.bias, group_size, config)

    @classmethod
    def from_codes(cls, codes, scales, bias=None, group_size=None, config: TernaryConfig | None = None):
        config = config or TernaryConfig()
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bias is not None, group_size, tuple(scales.shape),
                     config.scale_torch_dtype, config.activations, "meta", packing=config.format)
        module.weight_packed = formats.pack(codes, config.format)
        module.weight_scale = scales.detach().to(config.scale_torch_dtype).clone()
        module.bias = None if bias is None else bias.detach().clone()
        return module

    @property
    def ternary_weight(self) -> TernaryWeight:
        return TernaryWeight(self.weight_packed, self.weight_scale, self.in_features, self.out_features,
                             self.group_size, self.packing)

    @property
    def granularity(self) -> str:
        """'tensor' | 'channel' | 'group', read off the scales (the layer keeps no config)."""
        if self.group_size:
            return "group"
        return "tensor" if self.weight_scale.numel() == 1 else "channel"

    def codes(self) -> torch.Tensor:
        return formats.unpack(self.weight_packed, self.in_features, self.packing)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight this layer computes with (for tests and LoRA fusing)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return reference.dequantize(self.ternary_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not needs_gradient(x, self.weight_scale, self.bias):
            # torch.compile: one opaque operator. It has no backward, so inputs that need a gradient are traced
            # through ternary_linear instead (on a CPU the reference backend takes them).
            return ternary_linear_op(x, self.weight_packed, self.weight_scale, self.bias, self.in_features,
                                     self.out_features, self.group_size or 0, self.activations, self.packing)
        return ternary_linear(x, self.ternary_weight, self.bias, self.activations)

    def _apply(self, fn, recurse=True):
        # A cast of the model (.to(torch.bfloat16), .half()) is for what it computes in; the scales keep their own
        # dtype (the config's scale_dtype, which a saved folder's config.json states): rounding them would move
        # every layer's output, and save_pretrained would write scales of another dtype than the config says.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = state_dict.get(prefix + "weight_packed")
        expected = formats.packed_shape(self.out_features, self.in_features, self.packing)
        if packed is not None and tuple(packed.shape) != expected:
            # The packing is not in the state dict: bytes of the other one show by their shape (except for
            # in_features <= 4, where tq2 and tq1 rows are both one byte).
            raise BitfluxError(f"{prefix}weight_packed has shape {tuple(packed.shape)}; this {self.packing} layer "
                               f"({self.in_features} inputs) takes {expected}: repack the codes with formats.convert")
        # The buffers are written in place: what a backend prepared from them must go (kernels.tensor_version sees
        # in-place writes, except to tensors made under inference_mode).
        forget_prepared(self.weight_packed)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        scales = f"group:{self.group_size}" if self.group_size else self.granularity
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scales={scales}, activations={self.activations}, "
                f"packing={self.packing}")


def scale_shape(out_features: int, in_features: int, granularity: str, group_size: int | None) -> tuple[int, int]:
    """Shape of the scales tensor ternarize() returns for this granularity."""
    if granularity == "tensor":
        return (1, 1)
    if granularity == "channel":
        return (out_features, 1)
    return (out_features, -(-in_features // group_size))
