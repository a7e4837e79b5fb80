"""CUDA driver API through cuda-bindings: module loading and kernel launch."""
from __future__ import annotations

import ctypes
import struct

from .. import utils

_driver = None
# The global that kernels/ptx.cuh's DG_PDL_READY defines in a module whose kernels wait for the
# previous grid (griddepcontrol.wait) before touching memory: only those are launched with PDL.
PDL_READY_SYMBOL = b"deep_gemm_pdl_ready"


def driver():
    """The cuda.bindings.driver module (imported lazily: CPU-only installs never need it)."""
    global _driver
    if _driver is None:
        try:
            from cuda.bindings import driver as cu
        except ImportError:  # cuda-python < 12.6 layout
            from cuda import cuda as cu  # type: ignore
        _driver = cu
    return _driver


class CudaError(RuntimeError):
    pass


def check(result):
    """Raise CudaError for a failed driver call; return its values otherwise."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cu = driver()
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        _, text = cu.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else name
        text = text.decode() if isinstance(text, bytes) else text
        raise CudaError(f"CUDA driver error {name}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def param_buffer(params: bytes, offsets) -> tuple:
    """(buffer, address): the kernel's parameters back to back in one ctypes buffer, then (8-byte aligned) the array
    of pointers to each that the driver reads at `address`. The buffer must live as long as the address is used."""
    size = (len(params) + 7) // 8 * 8
    buffer = (ctypes.c_char * (size + 8 * len(offsets))).from_buffer_copy(params.ljust(size + 8 * len(offsets), b"\0"))
    base = ctypes.addressof(buffer)
    struct.pack_into(f"<{len(offsets)}Q", buffer, size, *[base + off for off in offsets])
    return buffer, base + size


class LoadedKernel:
    """One cubin loaded on one device (the current one), with its launch geometry. `pdl_ready`:
    the module defines PDL_READY_SYMBOL, so its kernels may be launched with PDL."""

    def __init__(self, cubin: bytes, symbol: str, num_threads: int, smem_bytes: int = 0):
        cu = driver()
        self.module = check(cu.cuModuleLoadData(cubin))
        self.function = check(cu.cuModuleGetFunction(self.module, symbol.encode()))
        check(cu.cuFuncSetAttribute(
            self.function, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes))
        self.num_threads = num_threads
        self.smem_bytes = smem_bytes
        # A missing global is CUDA_ERROR_NOT_FOUND: a kernel that does not wait, launched plainly.
        self.pdl_ready = cu.cuModuleGetGlobal(self.module, PDL_READY_SYMBOL)[0] == cu.CUresult.CUDA_SUCCESS

    def launch_config(self, grid: int, stream: int, pdl: bool = False):
        """A new CUlaunchConfig (cuLaunchKernelEx) of `grid` blocks on `stream`, with the
        programmatic-stream-serialization attribute when `pdl`; nothing shared is written at launch."""
        cu = driver()
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = self.num_threads, 1, 1
        config.sharedMemBytes = self.smem_bytes
        config.hStream = cu.CUstream(stream)
        if pdl:
            attr = cu.CUlaunchAttribute()
            attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            config.attrs = [attr]   # copied into the config
            config.numAttrs = 1
        else:
            config.numAttrs = 0
        return config

    def launch(self, grid: int, stream: int, params: bytes, offsets) -> None:
        """One launch with parameters packed as for param_buffer (kernels launched once per call,
        such as the K-padding kernel; repeated launches go through runtime/launch.PreparedLaunch).
        With set_pdl(True) and a PDL-ready module, through cuLaunchKernelEx and a config made here."""
        _, address = buffer = param_buffer(params, offsets)
        cu = driver()
        if utils._pdl_enabled and self.pdl_ready:
            err, = cu.cuLaunchKernelEx(self.launch_config(grid, stream, pdl=True), self.function, address, 0)
        else:
            err, = cu.cuLaunchKernel(self.function, grid, 1, 1, self.num_threads, 1, 1, self.smem_bytes, stream,
                                     address, 0)
        del buffer   # the driver has copied the parameters
        if err:
            check((err,))
