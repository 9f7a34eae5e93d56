"""Builds the cpu backend's C library (plain C + OpenMP, loaded with ctypes; no Python C-API).

Metadata lives in pyproject.toml. The extension is optional: if it fails to compile, installation goes on
and bitflux runs on the reference backend, saying so once.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError


class BuildExtWithoutAvxVnniIfNeeded(build_ext):
    """A compiler that knows AVX-VNNI with an assembler that does not (binutils < 2.36) fails the whole file:
    then it is built again without that path, rather than the library not at all."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except CompileError:
            ext.define_macros.append(("BF_NO_AVXVNNI", "1"))
            super().build_extension(ext)


setup(
    cmdclass={"build_ext": BuildExtWithoutAvxVnniIfNeeded},
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
