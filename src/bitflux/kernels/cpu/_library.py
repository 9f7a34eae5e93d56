"""Finds the compiled kernel library that setup.py builds beside this file and binds it with ctypes."""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

_STEM = "_ternary_gemm"
ABI_VERSION = 3  # ternary_gemm.c's BF_ABI_VERSION: the signatures bound below
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = Path(__file__).with_name(_STEM + suffix)
        if candidate.exists():
            return candidate
    return None


def load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why it cannot be used)."""
    path = _path()
    if path is None:
        return None, f"compiled library {_STEM} not found beside {Path(__file__).name} (reinstall bitflux with gcc)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load {path.name}: {exc}"
    abi = lib.bf_abi_version() if hasattr(lib, "bf_abi_version") else 1
    if abi != ABI_VERSION:
        return None, (f"compiled library {path.name} is from another bitflux version (interface {abi}, this one "
                      f"needs {ABI_VERSION}): reinstall bitflux (pip install -e .) to rebuild it")
    for name in ("bf_isa_built", "bf_isa_supported"):
        getattr(lib, name).argtypes = [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.bf_linear.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, ctypes.c_int, _i64, _ptr, _i64, _i64, _ptr,
                              _ptr, ctypes.c_int, ctypes.c_int]
    lib.bf_linear.restype = ctypes.c_int
    lib.bf_tq1_to_tq2.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, ctypes.c_int, ctypes.c_int]
    lib.bf_tq1_to_tq2.restype = ctypes.c_int
    return lib, None
