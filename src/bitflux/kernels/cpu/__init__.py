"""The `cpu` backend: W1.58A8 linear in C (generic, AVX2, AVX-512 VNNI), loaded with ctypes.

It always quantizes activations per token to int8 (reference.linear_a8's numerics, bit for bit), in both
activation modes: a16 has no fast CPU path, and `use_backend("reference")` keeps exact a16 available.
docs/CPU_KERNEL.md describes the weight layout, the numerics and the measured speed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import formats
from ...errors import BitfluxError
from .. import needs_gradient
from . import _library

NAME = "cpu"
ACTIVATIONS = ("a16", "a8")
ISAS = ("generic", "avx2", "avx512vnni")  # index = the C library's ISA number
PANEL = 16  # output features per block of the prepared layout
CHUNK = 16  # input features per block

_lib, _load_error = _library.load()
_SUPPORTED_ISAS = [name for i, name in enumerate(ISAS) if _lib is not None and _lib.bf_isa_supported(i)]
_forced_isa: list[str] = []


def available() -> str | None:
    return _load_error


def supported_isas() -> list[str]:
    return list(_SUPPORTED_ISAS)


def current_isa() -> str:
    """The forced ISA (use_isa, else $BITFLUX_CPU_ISA), else the best this CPU supports."""
    name = _forced_isa[-1] if _forced_isa else os.environ.get("BITFLUX_CPU_ISA") or _SUPPORTED_ISAS[-1]
    if name not in _SUPPORTED_ISAS:
        raise BitfluxError(f"cpu kernel ISA {name!r} is not supported here; choose one of {', '.join(supported_isas())}")
    return name


@contextlib.contextmanager
def use_isa(name: str):
    """Force one ISA path ("generic", "avx2", "avx512vnni") inside the block, e.g. to compare paths."""
    _forced_isa.append(name)
    try:
        current_isa()
        yield
    finally:
        _forced_isa.pop()


def supports(x: torch.Tensor, weight, activations: str) -> bool:
    # Per-group scales need whole blocks per group; other group sizes stay on the reference. So do inputs
    # that need a gradient: the C kernel has no backward.
    grouped = weight.scales.shape[1] > 1
    return (x.device.type == "cpu" and x.is_floating_point() and not needs_gradient(x)
            and (not grouped or weight.group_size % CHUNK == 0))


@dataclass(frozen=True)
class PreparedWeight:
    blocks: torch.Tensor  # (ceil(out / 16), ceil(in / 16) * 64) uint8, layout in ternary_gemm.c
    scales: torch.Tensor  # (ceil(out / 16) * 16, groups) float32, zero for padding rows
    in_features: int
    out_features: int
    group_chunks: int  # 16-input blocks per scale group


def prepare(weight) -> PreparedWeight:
    """Repack the tq2 codes once into 64-byte blocks of 16 outputs x 16 inputs (still 2 bits a weight).
    A tq1 layer's codes are converted to tq2 first, so the C kernel reads one layout whatever the packing
    (the blocks are a copy of the codes either way).

    In tq2, input 4 b + r is digit r of byte b. A block's byte 4 n + r holds, as its digit i, input
    16 chunk + 4 i + r of output n, i.e. digit r of tq2 byte 4 chunk + i: the 4 x 4 matrix of digits in
    every 4 tq2 bytes is transposed. As a little-endian int32 word holds digit (i, r) at bit 8 i + 2 r, two
    masked swaps do it (Hacker's Delight's bit-matrix transpose, with 2-bit elements).
    """
    out_features, in_features = weight.out_features, weight.in_features
    panels, chunks = -(-out_features // PANEL), -(-in_features // CHUNK)
    packed = formats.convert(weight.packed.cpu(), in_features, weight.packing, "tq2")
    # 0x55 = four digits u = 1 (w = 0): padding that adds nothing, as the padded activations are 0 too.
    packed = F.pad(packed, (0, 4 * chunks - packed.shape[1], 0, panels * PANEL - out_features), value=0x55)
    words = packed.view(torch.int32)  # (rows, chunks): tq2 bytes 4 chunk .. 4 chunk + 3
    swap = ((words >> 6) ^ words) & 0x00CC00CC  # (2a, 2b + 1) <-> (2a + 1, 2b)
    words = words ^ swap ^ (swap << 6)
    swap = ((words >> 12) ^ words) & 0x0000F0F0  # (i, r + 2) <-> (i + 2, r) for i, r in {0, 1}
    words = words ^ swap ^ (swap << 12)
    blocks = words.view(torch.uint8).reshape(panels, PANEL, chunks, 4).permute(0, 2, 1, 3)  # (panel, chunk, n, r)
    scales = weight.scales.float().cpu().expand(out_features, -1)
    scales = F.pad(scales, (0, 0, 0, panels * PANEL - out_features)).contiguous()
    group_chunks = weight.group_size // CHUNK if scales.shape[1] > 1 else chunks
    return PreparedWeight(blocks.reshape(panels, -1), scales, in_features, out_features, group_chunks)


def linear(x: torch.Tensor, prepared: PreparedWeight, bias: torch.Tensor | None, activations: str = "a8") -> torch.Tensor:
    rows = x.reshape(-1, prepared.in_features).float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], prepared.out_features, dtype=torch.float32)
    if rows.shape[0] > 0:
        bias = None if bias is None else bias.float().contiguous()
        status = _lib.bf_linear(
            rows.data_ptr(), rows.shape[0], prepared.in_features, rows.stride(0),
            prepared.blocks.data_ptr(), prepared.out_features, prepared.blocks.shape[1] // 64,
            prepared.scales.data_ptr(), prepared.scales.shape[1], prepared.group_chunks,
            None if bias is None else bias.data_ptr(), out.data_ptr(),
            torch.get_num_threads(), ISAS.index(current_isa()))
        if status:
            raise BitfluxError(f"cpu kernel failed (status {status}: {'out of memory' if status == -2 else 'ISA'})")
    return out.to(x.dtype).reshape(*x.shape[:-1], prepared.out_features)
