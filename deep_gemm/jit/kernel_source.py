"""The translation unit of one GEMM kernel: kernels/gemm.cuh and one explicit instantiation.

    source, name = gemm_source(config)   # name: the C++ name of the instantiated kernel

Everything else is in the headers (deep_gemm/kernels/*.cuh), which compile on their own.
"""
from __future__ import annotations

from ..config import GEMM_PARAMS, PARAM_SIZE_ALIGN, KernelConfig, param_layout


def gemm_kernel_name(config: KernelConfig) -> str:
    """The kernel's C++ name expression (the JIT looks its symbol up by it)."""
    return f"deep_gemm::gemm_kernel<deep_gemm::GemmConfig<{config.template_args()}>>"


def _param_checks() -> str:
    """static_asserts that deep_gemm::GemmParams is laid out as config.GEMM_PARAMS says: every field's
    size, the total size and, where the compiler has __builtin_offsetof (NVRTC 13.0 has not), every
    offset (the member order is also checked on the CPU, tests/test_structure.py)."""
    offsets, size = param_layout(GEMM_PARAMS)
    sizes = [f"static_assert(sizeof(deep_gemm::GemmParams::{name}) == {PARAM_SIZE_ALIGN[kind][0]}, "
             f"\"GemmParams.{name}: config.GEMM_PARAMS disagrees\");" for name, kind in GEMM_PARAMS]
    places = [f"static_assert(__builtin_offsetof(deep_gemm::GemmParams, {name}) == {offsets[name]}, "
              f"\"GemmParams.{name}: config.GEMM_PARAMS disagrees\");" for name, _ in GEMM_PARAMS]
    return "\n".join([*sizes, f"static_assert(sizeof(deep_gemm::GemmParams) == {size}, \"GemmParams' size\");",
                      "#if defined(__has_builtin)", "#if __has_builtin(__builtin_offsetof)", *places, "#endif", "#endif"])


def gemm_source(config: KernelConfig) -> tuple:
    """(source, kernel name expression) of the kernel for `config`."""
    name = gemm_kernel_name(config)
    source = (f"// deep_gemm kernel {config.name}\n#include \"gemm.cuh\"\n{_param_checks()}\n"
              f"template __global__ void {name}(const __grid_constant__ deep_gemm::GemmParams);\n")
    return source, name


def gemm_job(config: KernelConfig, arch: str) -> tuple:
    """The kernel as a deep_gemm.jit.precompile job (label, source, name expression, arch)."""
    source, name = gemm_source(config)
    return config.name, source, name, arch
