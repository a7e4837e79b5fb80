"""The translation unit of one GEMM kernel: kernels/gemm.cuh and one explicit instantiation.

    source, name = gemm_source(config)   # name: the C++ name of the instantiated kernel

Everything else is in the headers (deep_gemm/kernels/*.cuh), which compile on their own.
"""
from __future__ import annotations

from ..config import (GEMM_PARAMS, K_GROUPED_DEVICE_PARAMS, PARAM_SIZE_ALIGN, KernelConfig, Layout, k_grouped_params,
                      param_layout)

_GROUPS = "deep_gemm::KGroupedParams<{}>"


def gemm_kernel_name(config: KernelConfig) -> str:
    """The kernel's C++ name expression (the JIT looks its symbol up by it)."""
    kernel = "gemm_kernel"
    if config.layout == Layout.K_GROUPED:
        kernel = "k_grouped_device_gemm_kernel" if config.device_sizes else "k_grouped_gemm_kernel"
    return f"deep_gemm::{kernel}<deep_gemm::GemmConfig<{config.template_args()}>>"


def param_checks(struct: str, params) -> str:
    """static_asserts that a parameter struct is laid out as `params` (config.GEMM_PARAMS, ...) says:
    every field's size, the total size and, where the compiler has __builtin_offsetof (NVRTC 13.0
    has not), every offset (the member order is also checked on the CPU, tests/test_structure.py)."""
    offsets, size = param_layout(params)
    sizes = [f"static_assert(sizeof({struct}::{name}) == {PARAM_SIZE_ALIGN[kind][0] * (count[0] if count else 1)}, "
             f"\"{struct}.{name}: config disagrees\");" for name, kind, *count in params]
    places = [f"static_assert(__builtin_offsetof({struct}, {name}) == {offsets[name]}, "
              f"\"{struct}.{name}: config disagrees\");" for name, *_ in params]
    short = struct.split("::")[-1].split("<")[0]
    return "\n".join([*sizes, f"static_assert(sizeof({struct}) == {size}, \"{short}' size\");",
                      "#if defined(__has_builtin)", "#if __has_builtin(__builtin_offsetof)", *places, "#endif", "#endif"])


def gemm_source(config: KernelConfig) -> tuple:
    """(source, kernel name expression) of the kernel for `config`."""
    name = gemm_kernel_name(config)
    checks = [param_checks("deep_gemm::GemmParams", GEMM_PARAMS)]
    args = "const __grid_constant__ deep_gemm::GemmParams"
    if config.device_sizes:
        checks.append(param_checks("deep_gemm::KGroupedDeviceParams", K_GROUPED_DEVICE_PARAMS))
        args += ", const __grid_constant__ deep_gemm::KGroupedDeviceParams"
    elif config.layout == Layout.K_GROUPED:
        groups = _GROUPS.format(config.num_groups)
        checks.append(param_checks(groups, k_grouped_params(config.num_groups)))
        args += f", const __grid_constant__ {groups}"
    source = (f"// deep_gemm kernel {config.name}\n#include \"gemm.cuh\"\n" + "\n".join(checks) +
              f"\ntemplate __global__ void {name}({args});\n")
    return source, name


def gemm_job(config: KernelConfig, arch: str) -> tuple:
    """The kernel as a deep_gemm.jit.precompile job (label, source, name expression, arch)."""
    source, name = gemm_source(config)
    return config.name, source, name, arch
