"""Run-time compilation of CUDA C++ kernels to cubins, with a disk cache.

    kernel = compile_kernel(source, "my_kernel", arch="sm_90a", name="gemm_n4096")
    kernel.cubin       # bytes for cuModuleLoadData
    kernel.resources   # registers / spills / stack / static smem from ptxas

Environment:
    DG_JIT_CACHE_DIR      cache folder (default ~/.deep_gemm)
    DG_JIT_USE_NVCC=1     compile with nvcc instead of NVRTC
    DG_JIT_NVCC_COMPILER  path of nvcc (else PATH, else $CUDA_HOME/bin/nvcc)
    DG_JIT_WITH_LINEINFO=1  add -lineinfo (source lines in profilers/sanitizers)
    DG_JIT_DEBUG=1        print compile and cache-load times and paths to stderr
"""
from .build import CompiledKernel, clear_memory_cache, compile_kernel, find_cached
from .compiler import CompilationError
from .precompile import precompile
from .resources import KernelResources

__all__ = [
    "compile_kernel", "precompile", "find_cached", "clear_memory_cache",
    "CompiledKernel", "KernelResources", "CompilationError",
]
