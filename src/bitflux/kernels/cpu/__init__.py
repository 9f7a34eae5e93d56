"""The `cpu` backend: W1.58A8 linear in C (generic, AVX2, AVX-VNNI, AVX-512 VNNI), loaded with ctypes.

It always quantizes activations per token to int8 (reference.linear_a8's numerics, bit for bit), in both
activation modes: a16 has no fast CPU path, and `use_backend("reference")` keeps exact a16 available.
docs/CPU_KERNEL.md describes the weight layout, the numerics and the measured speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import BitfluxError
from .. import _forcing
from . import _library

NAME = "cpu"
ISAS = ("generic", "avx2", "avxvnni", "avx512vnni")  # index = the C library's ISA number, best last
PANEL = 16  # output features per block of the C kernel
CHUNK = 16  # input features per block (a 4-byte word of a tq2 row)

_lib, _load_error = _library.load()
_SUPPORTED_ISAS = [name for i, name in enumerate(ISAS) if _lib is not None and _lib.bf_isa_supported(i)]
_forced_isa: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitflux_cpu_isa", default=None)  # use_isa's


def available() -> str | None:
    return _load_error


def supported_isas() -> list[str]:
    return list(_SUPPORTED_ISAS)


def current_isa() -> str:
    """The forced ISA (use_isa, else $BITFLUX_CPU_ISA), else the best this CPU supports."""
    if _lib is None:
        raise BitfluxError(f"the cpu kernel is not available ({_load_error})")
    name = _forced_isa.get() or os.environ.get("BITFLUX_CPU_ISA") or _SUPPORTED_ISAS[-1]
    if name not in _SUPPORTED_ISAS:
        raise BitfluxError(f"cpu kernel ISA {name!r} is not supported here; choose one of {', '.join(supported_isas())}")
    return name


@contextlib.contextmanager
def use_isa(name: str):
    """Force one ISA path ("generic", "avx2", "avxvnni", "avx512vnni") inside the block, e.g. to compare paths, in
    the calling thread (or asyncio task) only."""
    with _forcing(_forced_isa, name):
        current_isa()
        yield


def supports(x: torch.Tensor, weight, activations: str) -> bool:
    # Per-group scales need whole blocks per group; other group sizes stay on the reference.
    grouped = weight.scales.shape[1] > 1
    return (activations != "fp8"  # fp8 has no int8 stand-in: the reference computes it
            and x.device.type == "cpu" and x.is_floating_point()
            and (not grouped or weight.group_size % CHUNK == 0))


@dataclass(frozen=True)
class PreparedWeight:
    """The kernel's view of one layer: its packed codes, read in place and held weakly (the layer owns them,
    and the cache of prepared weights keyed by them must not keep them alive); a contiguous CPU copy only
    where the layer's bytes cannot be read in place (another device, strided)."""

    codes_ref: weakref.ref | None  # to the layer's own (out, bytes) codes
    codes_copy: torch.Tensor | None  # else a copy of them
    packing: str  # tq2, or tq1, which the C kernel widens to tq2 as it reads it
    scales: torch.Tensor  # (ceil(out / 16) * 16, groups) float32, zero for padding rows
    in_features: int
    out_features: int
    group_chunks: int  # 16-input chunks per scale group

    @property
    def codes(self) -> torch.Tensor:
        if self.codes_copy is not None:
            return self.codes_copy
        codes = self.codes_ref()
        if codes is None:
            raise RuntimeError("the layer bytes this prepared weight was made from are gone: prepare() it again")
        return codes


def prepare(weight) -> PreparedWeight:
    """The layer's codes as they are: the C kernel reorders the activations, not the codes, so it needs no
    copy of them (docs/CPU_KERNEL.md). The scales are padded to whole 16-output panels."""
    out_features, in_features = weight.out_features, weight.in_features
    packed = weight.packed
    if packed.device.type == "cpu" and packed.is_contiguous():
        codes_ref, codes_copy = weakref.ref(packed), None
    else:
        codes_ref, codes_copy = None, packed.cpu().contiguous()
    panels, chunks = -(-out_features // PANEL), -(-in_features // CHUNK)
    scales = weight.scales.float().cpu().expand(out_features, -1)
    scales = F.pad(scales, (0, 0, 0, panels * PANEL - out_features)).contiguous()
    group_chunks = weight.group_size // CHUNK if scales.shape[1] > 1 else chunks
    return PreparedWeight(codes_ref, codes_copy, weight.packing, scales, in_features, out_features, group_chunks)


def linear(x: torch.Tensor, prepared: PreparedWeight, bias: torch.Tensor | None, activations: str = "a8") -> torch.Tensor:
    rows = x.reshape(-1, prepared.in_features).float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], prepared.out_features, dtype=torch.float32)
    if rows.shape[0] > 0:
        codes = prepared.codes
        bias = None if bias is None else bias.float().contiguous()
        status = _lib.bf_linear(
            rows.data_ptr(), rows.shape[0], prepared.in_features, rows.stride(0),
            codes.data_ptr(), codes.shape[1], prepared.packing == "tq1", prepared.out_features,
            prepared.scales.data_ptr(), prepared.scales.shape[1], prepared.group_chunks,
            None if bias is None else bias.data_ptr(), out.data_ptr(),
            torch.get_num_threads(), ISAS.index(current_isa()))
        if status:
            raise BitfluxError(f"cpu kernel failed (status {status}: {'out of memory' if status == -2 else 'ISA'})")
    return out.to(x.dtype).reshape(*x.shape[:-1], prepared.out_features)
