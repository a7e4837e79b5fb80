"""CUDA driver API through cuda-bindings: module loading and kernel launch.

Arguments are packed once per kernel and thread into a `void*[]` of ctypes
buffers, so a launch only overwrites a few buffers and calls cuLaunchKernel.
"""
from __future__ import annotations

import ctypes
import threading

_driver = None


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


class ArgPack:
    """A kernel's parameter buffers and the pointer array cuLaunchKernel reads."""

    def __init__(self, ctypes_types):
        self.buffers = [t() for t in ctypes_types]
        self.pointers = (ctypes.c_void_p * len(self.buffers))(*[ctypes.addressof(b) for b in self.buffers])
        self.address = ctypes.addressof(self.pointers)


TMA_DESCRIPTOR = ctypes.c_uint8 * 128


class LoadedKernel:
    """One cubin loaded on one device, with its launch geometry."""

    def __init__(self, cubin: bytes, kernel_name: str, num_threads: int, smem_bytes: int,
                 param_types, cluster_size: int = 1):
        cu = driver()
        self.module = check(cu.cuModuleLoadData(cubin))
        self.function = check(cu.cuModuleGetFunction(self.module, kernel_name.encode()))
        check(cu.cuFuncSetAttribute(
            self.function, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes))
        self.num_threads = num_threads
        self.smem_bytes = smem_bytes
        self._param_types = list(param_types)
        self._local = threading.local()
        self.cluster_size = cluster_size
        self._launch = cu.cuLaunchKernel
        # Clusters must fit in one GPC: fewer than SMs / cluster_size may be resident.
        self.max_active_clusters = (check(cu.cuOccupancyMaxActiveClusters(
            self.function, self.launch_config(cluster_size, 0))) if cluster_size > 1 else None)

    def launch_config(self, grid: int, stream: int):
        """A CUlaunchConfig for cuLaunchKernelEx: this kernel on `grid` blocks (and its thread-block
        clusters) on `stream`. A new object per call: nothing shared is written at launch time."""
        cu = driver()
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = self.num_threads, 1, 1
        config.sharedMemBytes = self.smem_bytes
        config.hStream = cu.CUstream(stream)
        if self.cluster_size > 1:
            attr = cu.CUlaunchAttribute()
            attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = self.cluster_size, 1, 1
            config.attrs = [attr]
            config.numAttrs = 1
        else:
            config.numAttrs = 0
        return config

    def args(self) -> ArgPack:
        pack = getattr(self._local, "pack", None)
        if pack is None:
            pack = self._local.pack = ArgPack(self._param_types)
        return pack

    def launch(self, grid: int, stream: int, pack: ArgPack) -> None:
        """Launch with parameters from `pack`: the cast kernels' path (no clusters). GEMM launches
        go through runtime/launch.py's PreparedLaunch, which builds its config with launch_config."""
        if self.cluster_size != 1:
            raise ValueError("LoadedKernel.launch has no thread-block clusters: use a PreparedLaunch")
        err, = self._launch(self.function, grid, 1, 1, self.num_threads, 1, 1, self.smem_bytes, stream,
                            pack.address, 0)
        if err != 0:
            check((err,))
