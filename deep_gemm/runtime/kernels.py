"""Loaded GEMM kernels per (config, device), and the one launch routine all layouts share."""
from __future__ import annotations

import ctypes
import threading

import torch

from ..jit import compile_kernel
from ..jit.kernel_source import GEMM_KERNEL_NAME, gemm_source
from ..plan import SMEM_CAPACITY, KernelConfig, store_chunk_cols, ceil_div, LAYOUT_DENSE, LAYOUT_MASKED
from .driver import TMA_DESCRIPTOR, LoadedKernel
from .launch import GEMM_PARAM_OFFSETS, PreparedLaunch, current_raw_stream, pack_gemm_params
from .tma import SWIZZLE_128B, tensor_map, tensor_map_2d
from .workspace import split_k_workspace

# Kernel parameters, in order (kernels/gemm.cuh: deep_gemm_fp8_gemm).
GEMM_PARAM_TYPES = (TMA_DESCRIPTOR, TMA_DESCRIPTOR, TMA_DESCRIPTOR, TMA_DESCRIPTOR, TMA_DESCRIPTOR, TMA_DESCRIPTOR,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

_NO_MAP = bytes(128)   # an unused tensor-map parameter
_loaded: dict = {}
_lock = threading.Lock()


class KernelNotReadyError(RuntimeError):
    pass


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}a" if major == 9 else f"sm_{major}{minor}"


def load_once(cache: dict, key, device_index: int, *, source: str, kernel_name: str, label: str, what: str,
              preload_hint: str, num_threads: int, param_types, smem_bytes: int = 0,
              cluster_size: int = 1) -> LoadedKernel:
    """cache[key]: the kernel compiled from `source` and loaded on a device on first use (one
    lock for every kernel family: loading is rare). Loading a module is not permitted while
    the current stream captures a CUDA graph, so a kernel first needed then is an error that
    names it (`what`) and says how to load it before capture (`preload_hint`)."""
    kernel = cache.get(key)
    if kernel is not None:
        return kernel
    if torch.cuda.is_current_stream_capturing():
        raise KernelNotReadyError(
            f"deep_gemm: {what} is not loaded yet and the current stream is capturing a CUDA graph, where "
            f"loading a module is not permitted. {preload_hint}")
    with _lock:
        kernel = cache.get(key)
        if kernel is None:
            compiled = compile_kernel(source, kernel_name, arch=device_arch(torch.device("cuda", device_index)),
                                      name=label)
            with torch.cuda.device(device_index):
                kernel = LoadedKernel(compiled.cubin, kernel_name, num_threads, smem_bytes, param_types,
                                      cluster_size)
            cache[key] = kernel
    return kernel


def gemm_kernel(config: KernelConfig, device_index: int) -> LoadedKernel:
    """The loaded kernel for `config` on a device, compiling and loading it on first use."""
    if config.smem_bytes > SMEM_CAPACITY:   # the driver would only say "invalid argument"
        raise ValueError(f"deep_gemm: kernel {config.name} needs {config.smem_bytes} bytes of shared memory, more "
                         f"than the {SMEM_CAPACITY} a block can have: fewer stages (num_stages) or smaller tiles")
    return load_once(_loaded, (config, device_index), device_index, source=gemm_source(config),
                     kernel_name=GEMM_KERNEL_NAME, label=config.name, what=f"kernel {config.name}",
                     preload_hint="Run the same call once before capture (warm-up), or precompile with "
                                  "`python -m deep_gemm precompile`.",
                     num_threads=config.num_threads, param_types=GEMM_PARAM_TYPES,
                     smem_bytes=config.smem_bytes, cluster_size=config.cluster_size)


def a_tail_rows(config: KernelConfig, shape_m: int) -> int:
    """Rows of the boxes through which the kernel loads A and A's scales for a dense M's last
    block when it is partial (0 when it is whole, or for grouped layouts and clusters): the
    block's rows, rounded up to 8 with several K blocks a stage (each block's slot of the box
    must start 1024-byte aligned for the swizzle). TMA fills a box's rows past the tensor's end
    with zeros, and that cost the tiles of a partial block up to 1.6x (docs/perf-notes.md,
    section 24)."""
    if config.layout != LAYOUT_DENSE or config.cluster_n != 1:
        return 0
    rows = shape_m % config.block_m
    if config.stage_k_blocks > 1:
        rows = ceil_div(rows, 8) * 8
    return rows if rows < config.block_m else 0


def prepare_gemm(config: KernelConfig, a: torch.Tensor, a_rows: int, sa: torch.Tensor, sa_rows: int,
                 b: torch.Tensor, b_rows: int, sb: torch.Tensor, out: torch.Tensor, out_rows: int,
                 shape_m: int, group_info, num_sms: int) -> PreparedLaunch:
    """The GEMM over 2-D views, packed and ready to fire (see launch_gemm for the arguments).

    The result depends only on `config`, the device, num_sms, shape_m, the row counts, the
    tensors' data pointers, shapes and strides, and the current stream (which it launches on, and
    whose split-K workspace it uses), which is what lets the public functions cache it per call
    site (runtime/launch.py).
    """
    device_index = a.device.index
    kernel = gemm_kernel(config, device_index)
    k, n = config.k, config.n
    chunk = store_chunk_cols(config.block_n)
    # With one K block the scales' K stride is meaningless to torch; the kernel needs the real one.
    sa_stride = sa.stride(-1) if sa.shape[-1] > 1 else (sa_rows + 3) // 4 * 4
    tail_rows = a_tail_rows(config, shape_m)

    def map_k_major(t, rows, box_rows):
        # Rows of K fp8. Several K blocks a stage: a 3-D view [K / 128][rows][128] (K blocks
        # 128 bytes apart), whose box of stage_k_blocks blocks lands as consecutive slots.
        if config.stage_k_blocks == 1:
            return tensor_map_2d(t.data_ptr(), "u8", k, rows, t.stride(-2), config.block_k, box_rows, SWIZZLE_128B)
        return tensor_map(t.data_ptr(), "u8", (config.block_k, rows, k // config.block_k),
                          (t.stride(-2), config.block_k), (config.block_k, box_rows, config.stage_k_blocks),
                          SWIZZLE_128B)

    def map_a(rows):
        return map_k_major(a, a_rows, rows)

    def map_sa(rows):
        # A's scales as rows of sa_rows, one per K block (and group): read by TMA unless a
        # loader warp copies them from the pointer (config.sa_loader_warp); 16-byte boxes.
        if config.sa_loader_warp:
            return _NO_MAP
        return tensor_map_2d(sa.data_ptr(), "f32", sa_rows, sa.shape[-1] * (sa.shape[0] if sa.dim() == 3 else 1),
                             sa_stride * 4, ceil_div(rows, 4) * 4, config.stage_k_blocks, 0)

    maps = (
        map_a(config.block_m // config.cluster_n),
        map_k_major(b, b_rows, config.block_n),
        map_sa(config.block_m),
        tensor_map_2d(out.data_ptr(), "bf16", n, out_rows, out.stride(-2) * 2, chunk, 64, chunk * 2),
        map_a(tail_rows) if tail_rows else _NO_MAP,
        map_sa(tail_rows) if tail_rows else _NO_MAP,
    )
    # Persistent grid: one block per SM at most, whole clusters only.
    clusters = num_sms // config.cluster_size
    if kernel.max_active_clusters:
        clusters = min(clusters, kernel.max_active_clusters)
    if config.layout != LAYOUT_MASKED:
        units = ceil_div(shape_m, config.block_m) * ceil_div(ceil_div(n, config.block_n), config.cluster_n)
        clusters = max(1, min(clusters, units * config.split_k))   # split-K: tail tiles may be split
    grid = clusters * config.cluster_size
    stream = current_raw_stream(device_index)
    counters_ptr = partials_ptr = 0
    if config.split_k > 1:   # split tail tiles: at most one counter and one partial tile per block
        counters_ptr, partials_ptr = split_k_workspace(a.device, stream, grid, config.split_k_workspace_floats(grid))
    params = pack_gemm_params(maps, sa.data_ptr(), sb.data_ptr(), out.data_ptr(), out.stride(-2) * 2, shape_m,
                              sa_rows, sa_stride, tail_rows, group_info.data_ptr() if group_info is not None else 0,
                              partials_ptr, counters_ptr)
    return PreparedLaunch(kernel, grid, params, GEMM_PARAM_OFFSETS, stream, device_index)


def launch_gemm(config: KernelConfig, *, a: torch.Tensor, a_rows: int, sa: torch.Tensor, sa_rows: int,
                b: torch.Tensor, b_rows: int, sb: torch.Tensor, out: torch.Tensor, out_rows: int,
                shape_m: int, group_info, num_sms: int) -> None:
    """Launch the GEMM over 2-D views on the current stream.

    a: rows of K fp8 (row stride a.stride(-2)); sa: fp32 rows of sa_rows scales, one row per K
    block (per group and K block, masked), sa.stride(-1) elements apart (the column-major
    scales; the kernel reads zeros past sa_rows); b: rows of K;
    out: bf16 rows of N.  `shape_m` is M (dense, contiguous) or max_m (masked).
    """
    prepare_gemm(config, a, a_rows, sa, sa_rows, b, b_rows, sb, out, out_rows, shape_m, group_info,
                 num_sms).fire()
