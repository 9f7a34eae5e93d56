"""The one dispatch point for ternary matrix multiplication: `ternary_linear` (and `ternary_linear_op`, the same
as the torch operator that torch.compile sees); `ternary_linear_rows` (`ternary_linear_rows_op`) runs layers
whose codes are rows of one tensor (q/k/v fused by bitflux.fusion) through it as one.

A backend is a module with:
    NAME: str
    available() -> str | None          None when usable here, else why not (said once, then reference)
    supports(x, weight, activations) -> bool
                                       activations: "a16" (in x's dtype), "a8" (int8 per token), "fp8" (e4m3)
    prepare(weight) -> object          the backend's view of the weight (its codes, read in place; scales),
                                       made once per weight and cached
    linear(x, prepared, bias, activations) -> Tensor

`auto` picks, among the backends registered for the input's device type, the first that is available
and supports the call, else reference. Calls that need a gradient (of x, the scales or the bias) always take
the reference: the kernels have no backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import formats
from ..errors import BitfluxError
from . import reference

# Backends live in their own modules and are imported on first use, so a missing compiler or Triton
# costs nothing until it is asked for.
_BACKEND_MODULES = {"reference": "bitflux.kernels.reference"}
AUTO_ORDER: dict[str, list[str]] = {}  # device type -> backend names, best first
_loaded: dict[str, object] = {}
_unavailable: dict[str, str] = {}  # backend -> why it cannot run here
# use_backend's choice, for its own thread (or asyncio task) alone: a service's threads choose apart
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitflux_backend", default=None)


@dataclass(frozen=True)
class TernaryWeight:
    """What a backend needs of a ternary linear layer. `packed`: (out, ceil(in / codes per byte)) uint8 in the
    layer's `packing`, tq2 or tq1 (formats.py)."""

    packed: torch.Tensor
    scales: torch.Tensor
    in_features: int
    out_features: int
    group_size: int | None
    packing: str = "tq2"


_BACKEND_DEVICE: dict[str, str] = {}


def register(name: str, module_path: str, device_type: str) -> None:
    _BACKEND_MODULES[name] = module_path
    _BACKEND_DEVICE[name] = device_type
    AUTO_ORDER.setdefault(device_type, []).append(name)


def backend_names() -> list[str]:
    return list(_BACKEND_MODULES)


def get_backend(name: str):
    """The backend module, or None (with one warning per process) when it cannot run here."""
    if name not in _BACKEND_MODULES:
        raise BitfluxError(f"unknown backend {name!r}; choose one of auto, {', '.join(_BACKEND_MODULES)}")
    if name not in _loaded:
        try:
            module = importlib.import_module(_BACKEND_MODULES[name])
            reason = module.available() if hasattr(module, "available") else None
        except Exception as exc:  # an import failure (no Triton, no compiled library) means "not here"
            module, reason = None, f"{type(exc).__name__}: {exc}"
        if reason is not None:
            _unavailable[name] = reason
            warnings.warn(f"bitflux: backend {name!r} unavailable ({reason}); using the reference backend",
                          stacklevel=2)
            module = None
        _loaded[name] = module
    return _loaded[name]


def unavailable_reason(name: str, device_type: str = "cpu") -> str | None:
    """None if the backend runs here on `device_type` tensors, else a short reason (for the CLI's --backend)."""
    if name in ("auto", "reference"):
        return None
    with warnings.catch_warnings():  # said here instead, and not again (get_backend says it once)
        warnings.simplefilter("ignore")
        get_backend(name)
    if name in _BACKEND_DEVICE and _BACKEND_DEVICE[name] != device_type:
        return f"backend {name!r} runs on {_BACKEND_DEVICE[name]} tensors, not {device_type}"
    return None if _loaded[name] is not None else f"backend {name!r} is not available here ({_unavailable[name]})"


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend ("auto", "reference", "cpu", "triton", ...) inside the block, in the calling thread
    (or asyncio task) only, as torch.no_grad holds in its thread: not in threads or executors it starts, nor
    in a generator's steps that a thread pool resumes."""
    if name != "auto":
        get_backend(name)  # an unknown name fails here, an unavailable backend warns once
    with _forcing(_forced, name):
        yield


@contextlib.contextmanager
def _forcing(variable: contextvars.ContextVar, value):
    """variable = value inside the block, as it was after it."""
    previous, token = variable.get(), variable.set(value)
    try:
        yield
    finally:
        try:
            variable.reset(token)
        except ValueError:  # the block ends in another context than it began (a generator resumed elsewhere)
            variable.set(previous)


# torch.compile cannot trace a ContextVar: a graph traced through ternary_linear (inputs that need a gradient,
# which only the reference computes) takes the choice of the time it was traced
@torch.compiler.assume_constant_result
def _requested() -> str:
    return _forced.get() or os.environ.get("BITFLUX_BACKEND") or "auto"  # set but empty: unset, as BITFLUX_CPU_ISA


def select_backend(x: torch.Tensor, weight: TernaryWeight, activations: str, bias: torch.Tensor | None = None):
    if needs_gradient(x, weight.scales, bias):
        return reference
    requested = _requested()
    if requested != "auto":
        backend = get_backend(requested)
        if backend is not None and backend.supports(x, weight, activations):
            return backend
        return reference
    for name in AUTO_ORDER.get(x.device.type, []):
        backend = get_backend(name)
        if backend is not None and backend.supports(x, weight, activations):
            return backend
    return reference


register("triton", "bitflux.kernels.triton", "cuda")
register("cpu", "bitflux.kernels.cpu", "cpu")


def needs_gradient(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors (None: absent) must be differentiable: the kernels have no backward, so
    such calls are computed by the reference (differentiable torch ops)."""
    return torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)


def tensor_version(tensor: torch.Tensor) -> int:
    # Tensors made under torch.inference_mode() keep no version counter: in-place writes to them are not seen
    # here (TernaryLinear's load_state_dict calls forget_prepared itself).
    return 0 if tensor.is_inference() else tensor._version


# Each layer's prepared weights, keyed (weakly) by its packed bytes: freed with them. No backend's prepared weight
# holds the bytes strongly (the Triton one refers to them weakly), or the entry would keep its own key alive.
_prepared = WeakIdKeyDictionary()


def _cached(cache: WeakIdKeyDictionary, owner: torch.Tensor, sources: tuple[torch.Tensor, ...], make, tag=None):
    """make(), kept in cache under owner (weakly: freed with it) and made again when one of `sources` is
    replaced, swapped (`.data =`: data_ptr) or written in place (tensor_version), or `tag` changes. Identity is checked
    as well as the address, as a new tensor can take a freed one's address. Writes that bump no version (to
    inference tensors, through `.data`) are not seen: forget_prepared."""
    key = (tag, *((t.data_ptr(), tensor_version(t)) for t in sources))
    entry = cache.get(owner)
    if entry is None or entry[0] != key or any(ref() is not t for ref, t in zip(entry[1], sources)):
        entry = (key, [weakref.ref(t) for t in sources], make())
        cache[owner] = entry
    return entry[2]


def forget_prepared(packed: torch.Tensor) -> None:
    """Drop what was prepared from these bytes (before they are written in place, where tensor_version cannot see
    it: tensors made under inference_mode)."""
    _prepared.pop(packed, None)
    if packed._base is not None:  # rows of a concatenation (ternary_linear_rows): its entries go too
        _prepared.pop(packed._base, None)
        _joined_scales_cache.pop(packed._base, None)


def ternary_linear(
    x: torch.Tensor,
    weight: TernaryWeight,
    bias: torch.Tensor | None = None,
    activations: str = "a16",
) -> torch.Tensor:
    """y = x @ (codes * scales)^T + bias through the chosen backend.

    A backend's prepared weight is made once per layer and kept with its bytes: it is made again
    if either the bytes or the scales are replaced, swapped (`.data =`) or written in place (load_state_dict
    copies into them).
    """
    if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise BitfluxError(f"a ternary linear layer of {weight.in_features} inputs takes floating-point inputs "
                           f"whose last dimension is {weight.in_features}, got {str(x.dtype)[6:]} {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.out_features,):  # the kernels read out_features values
        raise BitfluxError(f"a ternary linear layer of {weight.out_features} outputs takes a bias of shape "
                           f"({weight.out_features},), got {tuple(bias.shape)}")
    backend = select_backend(x, weight, activations, bias)
    if backend is reference:
        return reference.linear(x, weight, bias, activations)
    prepared = _cached(_prepared, weight.packed, (weight.packed, weight.scales), lambda: _prepare(backend, weight),
                       tag=(backend.NAME, weight.packing))
    return backend.linear(x, prepared, bias, activations)


def _prepare(backend, weight: TernaryWeight):
    # Bytes of another packing (a layer read while set_packing changes it in another thread) would have the
    # kernels read past each row: refused.
    expected = formats.packed_shape(weight.out_features, weight.in_features, weight.packing)
    if tuple(weight.packed.shape) != expected:
        raise BitfluxError(f"a {weight.packing} layer of {weight.out_features} x {weight.in_features} holds codes of "
                           f"shape {tuple(weight.packed.shape)}, not {expected} (repacked while it ran?)")
    return backend.prepare(weight)


def consecutive_rows(packed: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive rows these codes are, in this order and all of it (views that
    bitflux.fusion makes), or None."""
    base = packed[0]._base
    if base is None or base.dim() != 2 or not base.is_contiguous():
        return None
    storage, offset = base.untyped_storage().data_ptr(), base.storage_offset()
    for rows in packed:
        if (rows._base is not base or rows.untyped_storage().data_ptr() != storage  # `.data =` swaps the storage
                or rows.storage_offset() != offset or not rows.is_contiguous() or rows.shape[1] != base.shape[1]):
            return None
        offset += rows.numel()
    return base if offset == base.storage_offset() + base.numel() else None


# Per concatenation of codes (keyed weakly by it): its layers' scales concatenated, one row per output (a
# per-tensor scale repeated over its layer's rows).
_joined_scales_cache = WeakIdKeyDictionary()


def _joined_scales(base: torch.Tensor, scales: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    return _cached(_joined_scales_cache, base, tuple(scales),
                   lambda: torch.cat([t.expand(n, t.shape[1]) for t, n in zip(scales, counts)]))


def ternary_linear_rows(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor],
                        biases: list[torch.Tensor] | None, in_features: int, group_size: int | None, packing: str,
                        activations: str = "a16", rows: torch.Tensor | None = None) -> torch.Tensor:
    """cat([ternary_linear(x, layer) for each layer], -1) for layers (their codes, scales, biases or None for
    none) of the same inputs, packing and scale groups. Where the codes are consecutive rows of one tensor
    (`rows`: consecutive_rows(packed), when the caller has it), as one ternary_linear over it: one GEMM, one
    activation quantization."""
    rows = rows if rows is not None else consecutive_rows(packed)
    if rows is None:
        return torch.cat([ternary_linear(x, TernaryWeight(p, s, in_features, p.shape[0], group_size, packing), b,
                                         activations)
                          for p, s, b in zip(packed, scales, biases or [None] * len(packed))], dim=-1)
    weight = TernaryWeight(rows, _joined_scales(rows, scales, [p.shape[0] for p in packed]), in_features,
                           rows.shape[0], group_size, packing)
    # biases are small: joined at every call, so none is ever stale
    return ternary_linear(x, weight, None if biases is None else torch.cat(biases), activations)


# torch.compile sees each ternary linear as this one opaque operator (fused q/k/v: ternary_linear_rows_op):
# dynamo cannot trace the backends' host code (ctypes pointers, Triton's strategy timing), and a graph break at
# every layer would cut FLUX.1 into ~500 graphs with nothing fused between them.
@torch.library.custom_op("bitflux::ternary_linear", mutates_args=())
def ternary_linear_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                      in_features: int, out_features: int, group_size: int, activations: str,
                      packing: str) -> torch.Tensor:
    """ternary_linear as a torch operator (group_size 0: none)."""
    weight = TernaryWeight(packed, scales, in_features, out_features, group_size or None, packing)
    return ternary_linear(x, weight, bias, activations)


@ternary_linear_op.register_fake
def _(x, packed, scales, bias, in_features, out_features, group_size, activations, packing):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("bitflux::ternary_linear_rows", mutates_args=())
def ternary_linear_rows_op(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor],
                           biases: list[torch.Tensor], in_features: int, group_size: int, activations: str,
                           packing: str) -> torch.Tensor:
    """ternary_linear_rows as a torch operator (biases: [] for none; group_size 0: none). Opaque, so whether the
    codes are one tensor's rows is found when it runs, not when torch.compile traces."""
    return ternary_linear_rows(x, packed, scales, biases or None, in_features, group_size or None, packing,
                               activations)


@ternary_linear_rows_op.register_fake
def _(x, packed, scales, biases, in_features, group_size, activations, packing):
    return x.new_empty((*x.shape[:-1], sum(p.shape[0] for p in packed)))
