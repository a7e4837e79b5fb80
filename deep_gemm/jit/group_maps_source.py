"""The translation unit of the kernel that writes a K-grouped GEMM's per-group tensor maps from group
sizes on the device (deep_gemm/kernels/group_maps.cuh). Two variants: K-major operands (fp8) and
MN-major ones (bf16); everything else is a run-time argument."""
from __future__ import annotations

from ..config import GROUP_MAPS_PARAMS
from .kernel_source import param_checks

THREADS = 256   # group_maps.cuh: kGroupMapsThreads


def group_maps_name(mn_major: bool) -> str:
    """The kernel's C++ name expression."""
    return f"deep_gemm::group_maps_kernel<{str(mn_major).lower()}>"


def group_maps_label(mn_major: bool) -> str:
    """A label for logs and cache folders."""
    return "group_maps_mn" if mn_major else "group_maps"


def group_maps_source(mn_major: bool) -> tuple:
    """(source, kernel name expression)."""
    name = group_maps_name(mn_major)
    source = (f"// deep_gemm {group_maps_label(mn_major)}\n#include \"group_maps.cuh\"\n"
              + param_checks("deep_gemm::GroupMapsParams", GROUP_MAPS_PARAMS)
              + f"\ntemplate __global__ void {name}(const __grid_constant__ deep_gemm::GroupMapsParams);\n")
    return source, name


def group_maps_job(mn_major: bool, arch: str) -> tuple:
    """The kernel as a deep_gemm.jit.precompile job (label, source, name expression, arch)."""
    source, name = group_maps_source(mn_major)
    return group_maps_label(mn_major), source, name, arch
