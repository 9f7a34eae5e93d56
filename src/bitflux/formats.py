"""Packed storage of ternary codes, bit-exact in both directions (docs/FORMAT.md describes the bytes).

Codes w in {-1, 0, +1} are stored as unsigned digits u = w + 1 in {0, 1, 2}, row by row; each row is
padded with u = 1 (w = 0) up to a whole number of bytes, so the true in_features must be kept beside.

tq2: 4 digits per byte, digit i of a byte at bits 2i..2i+1 (i = 0 the first), 2 bits per weight.
tq1: 5 digits per byte in base 3, byte = u0 + 3 u1 + 9 u2 + 27 u3 + 81 u4 (0..242), 1.6 bits per weight.
"""

from __future__ import annotations

import torch

CODES_PER_BYTE = {"tq2": 4, "tq1": 5}
ZERO_BYTE = {"tq2": 0x55, "tq1": 121}  # a byte of codes w = 0 (digits u = 1): 1 + 4 + 16 + 64, 1 + 3 + ... + 81
_POW3 = (1, 3, 9, 27, 81)


def packed_columns(in_features: int, fmt: str) -> int:
    """Bytes per row of a (out, in_features) code matrix."""
    return -(-in_features // CODES_PER_BYTE[fmt])


def packed_shape(out_features: int, in_features: int, fmt: str) -> tuple[int, int]:
    return (out_features, packed_columns(in_features, fmt))


def _digits(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """(out, in) int8 codes -> (out, bytes, codes_per_byte) uint8 digits u = w + 1, padded with 1."""
    per_byte = CODES_PER_BYTE[fmt]
    digits = (codes.to(torch.int16) + 1).to(torch.uint8)
    pad = -codes.shape[1] % per_byte
    digits = torch.nn.functional.pad(digits, (0, pad), value=1)
    return digits.reshape(codes.shape[0], -1, per_byte)


def pack(codes: torch.Tensor, fmt: str = "tq2") -> torch.Tensor:
    """(out, in) int8 codes in {-1, 0, 1} -> (out, packed_columns(in)) uint8."""
    if codes.ndim != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    if fmt not in CODES_PER_BYTE:
        raise ValueError(f"unknown format {fmt!r}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes must be -1, 0 or +1")  # a 2 would be stored as some other weight
    # uint8 throughout: the largest byte, 2 * (1 + 3 + 9 + 27 + 81) = 242, cannot overflow, and a
    # full-width FLUX layer then needs no wider temporaries.
    digits = _digits(codes, fmt)
    packed = digits[..., 0].clone()
    multipliers = (4, 16, 64) if fmt == "tq2" else _POW3[1:]
    for i, multiplier in enumerate(multipliers, 1):
        packed += digits[..., i] * multiplier
    return packed


def unpack(packed: torch.Tensor, in_features: int, fmt: str = "tq2") -> torch.Tensor:
    """(out, bytes) uint8 -> (out, in_features) int8 codes in {-1, 0, 1}."""
    if fmt in CODES_PER_BYTE and packed.shape[-1] < packed_columns(in_features, fmt):
        raise ValueError(f"{packed.shape[-1]} bytes a row hold fewer than {in_features} {fmt} codes")
    values = packed.unsqueeze(-1)
    if fmt == "tq2":
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
        digits = (values >> shifts) & 3
    elif fmt == "tq1":
        powers = torch.tensor(_POW3, dtype=torch.uint8, device=packed.device)
        digits = torch.div(values, powers, rounding_mode="floor") % 3
    else:
        raise ValueError(f"unknown format {fmt!r}")
    codes = digits.reshape(packed.shape[0], -1)[:, :in_features]
    return codes.to(torch.int8) - 1


def invalid_bytes(packed: torch.Tensor, fmt: str) -> int:
    """How many bytes hold no valid codes: a tq2 digit 3 (both bits set), a tq1 byte past 3^5 - 1 = 242.
    Such bytes decode to some weight (2, or a wrong digit) rather than fail: files are checked on load."""
    if fmt == "tq2":
        return int(torch.count_nonzero(packed & (packed >> 1) & 0x55))
    return int(torch.count_nonzero(packed > 242))


def convert(packed: torch.Tensor, in_features: int, src: str, dst: str) -> torch.Tensor:
    """Repack between formats without going through floating point."""
    if src == dst:
        return packed
    return pack(unpack(packed, in_features, src), dst)


def packed_nbytes(out_features: int, in_features: int, fmt: str) -> int:
    rows, cols = packed_shape(out_features, in_features, fmt)
    return rows * cols
