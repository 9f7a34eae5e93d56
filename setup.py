"""Builds the cpu backend's C library (plain C + OpenMP, loaded with ctypes; no Python C-API).

Metadata lives in pyproject.toml. The extension is optional: if it fails to compile, installation goes on
and bitflux runs on the reference backend, saying so once.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bitflux.kernels.cpu._ternary_gemm",
            sources=["src/bitflux/kernels/cpu/ternary_gemm.c"],
            # -ffp-contract=off keeps the fp32 epilogue bit-identical to the reference (no fused multiply-add);
            # ISA-specific code is compiled per function (#pragma GCC target) and chosen at run time.
            extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
