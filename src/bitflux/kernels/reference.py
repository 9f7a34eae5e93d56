"""The reference backend: unpack the codes and multiply in the input's dtype. Every other backend is
tested against it; it runs on any device, the meta device included."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import formats, ternary

NAME = "reference"
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def supports(x, weight, activations) -> bool:
    return True


def dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    codes = formats.unpack(weight.packed, weight.in_features, weight.packing)
    return ternary.dequantize(codes, weight.scales, weight.group_size, dtype)


def quantize_activations(x: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per token: x ~= q * s (s fp32, (..., 1)); int8 q in [-127, 127] with s = max|x| / 127, or
    (fp8) float8_e4m3fn q = e4m3(x / s) rounded to nearest even with s = max|x| / 448."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its rounded reciprocal,
    # one bit off for some rows; every backend must agree with this bit for bit.
    scale = amax / torch.full_like(amax, FP8_MAX if fp8 else 127.0)
    if fp8:
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    return torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8), scale


def integer_matmul(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 (M, K) int8 x (N, K) ternary -> (M, N); fp64 keeps every sum below 2^53 exact."""
    return (q.double() @ codes.double().t()).to(torch.int32)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None, activations: str = "a16") -> torch.Tensor:
    if activations == "a16":
        out = F.linear(x, dequantize(weight, x.dtype))
        return out if bias is None else out + bias.to(x.dtype)
    out = (linear_a8 if activations == "a8" else linear_fp8)(x, weight, bias)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return out
    # Straight-through: the quantized activations' value, and the gradient of x W^T (rounding's own is zero
    # almost everywhere, and int8 codes cut the graph but for the absmax).
    dense = F.linear(x, dequantize(weight, x.dtype))
    return out.detach() + (dense - dense.detach())


def linear_a8(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """W1.58A8 semantics shared by the int8 kernels: int8 activations x ternary codes in int32, then
    (activation scale) x (weight scale) in fp32. Per-group scales apply to partial sums per group."""
    shape = x.shape
    q, act_scale = quantize_activations(x.reshape(-1, shape[-1]))
    codes = formats.unpack(weight.packed, weight.in_features, weight.packing)
    scales = weight.scales.float()
    if scales.shape[1] == 1:
        out = integer_matmul(q, codes).float() * scales.t()
    else:
        out = torch.zeros(q.shape[0], codes.shape[0], dtype=torch.float32, device=x.device)
        for g in range(scales.shape[1]):
            cols = slice(g * weight.group_size, (g + 1) * weight.group_size)
            out += integer_matmul(q[:, cols], codes[:, cols]).float() * scales[:, g]
    out = out * act_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight.out_features)  # -1: not with 0 tokens


def linear_fp8(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """W1.58 x fp8 semantics: per token s = max|x| / 448, q = e4m3(x / s) rounded to nearest even, exact sums
    of q x codes (fp64), then x weight scale x s (+ bias) in fp32. Per-tensor and per-channel scales only."""
    if weight.scales.shape[1] > 1:  # one group a row (a group as wide as the rows) is per channel
        raise ValueError("fp8 activations support per-tensor and per-channel scales only")
    shape = x.shape
    q, scale = quantize_activations(x.reshape(-1, shape[-1]), fp8=True)
    codes = formats.unpack(weight.packed, weight.in_features, weight.packing)
    out = (q.double() @ codes.double().t()).float() * weight.scales.float().t() * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight.out_features)  # -1: not with 0 tokens
