"""Builds the cpu backend's C library (plain C + OpenMP, loaded with ctypes; no Python C-API).

Metadata lives in pyproject.toml. The extension is optional: if it fails to compile, installation goes on
and bitflux runs on the reference backend, saying so once.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, LinkError


class BuildExtWithFallbacks(build_ext):
    """Where the whole file fails to build, it is built again without what may have failed, rather than the
    library not at all: without the AVX-VNNI path (a compiler that knows it with an assembler that does not:
    binutils < 2.36), else without OpenMP (Apple's clang has none; the kernel then runs on one thread), else
    without both."""

    def build_extension(self, ext):
        macros, compile_args, link_args = list(ext.define_macros), ext.extra_compile_args, ext.extra_link_args
        attempts = [(False, False), (True, False), (False, True), (True, True)]  # (without AVX-VNNI, without OpenMP)
        for without_avxvnni, without_openmp in attempts:
            ext.define_macros = macros + ([("BF_NO_AVXVNNI", "1")] if without_avxvnni else [])
            ext.extra_compile_args, ext.extra_link_args = (
                [a for a in args if not (without_openmp and a == "-fopenmp")] for args in (compile_args, link_args))
            try:
                return super().build_extension(ext)
            except (CompileError, LinkError):
                if (without_avxvnni, without_openmp) == attempts[-1]:
                    raise


setup(
    cmdclass={"build_ext": BuildExtWithFallbacks},
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
