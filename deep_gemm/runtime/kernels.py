"""Loaded kernels per (configuration, device), and the GEMM launch every layout prepares."""
from __future__ import annotations

import threading

import torch

from ..config import BLOCK_K, KernelConfig, Layout, ceil_div, store_chunk_cols
from ..jit import compile_kernel
from ..jit.kernel_source import gemm_source
from .driver import LoadedKernel
from .launch import GEMM_PARAM_OFFSETS, PreparedLaunch, current_raw_stream, pack_gemm_params
from .tma import SWIZZLE_128B, tensor_map, tensor_map_2d
from .workspace import split_k_workspace

_NO_MAP = bytes(128)   # an unused tensor-map parameter
_loaded: dict = {}
_lock = threading.Lock()


class KernelNotReadyError(RuntimeError):
    pass


def device_arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}a" if major == 9 else f"sm_{major}{minor}"


def load_once(cache: dict, key, device_index: int, *, build, what: str, preload_hint: str, num_threads: int,
              smem_bytes: int = 0) -> LoadedKernel:
    """cache[key]: the kernel that build() -> (source, kernel name, label) describes, compiled and
    loaded on a device on first use (one lock for every kernel family: loading is rare). Loading a
    module is not permitted while the current stream captures a CUDA graph, so a kernel first
    needed then is an error that names it (`what`) and says how to load it before (`preload_hint`)."""
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
            source, kernel_name, label = build()
            compiled = compile_kernel(source, kernel_name, arch=device_arch(device_index), name=label)
            with torch.cuda.device(device_index):
                kernel = LoadedKernel(compiled.cubin, compiled.symbol or kernel_name, num_threads, smem_bytes)
            cache[key] = kernel
    return kernel


def gemm_kernel(config: KernelConfig, device_index: int) -> LoadedKernel:
    """The loaded kernel for `config` on a device, compiled and loaded on first use."""
    kernel = _loaded.get((config, device_index))
    if kernel is not None:   # the per-call path: no closure or message strings built
        return kernel
    return load_once(_loaded, (config, device_index), device_index,
                     build=lambda: (*gemm_source(config), config.name), what=f"kernel {config.name}",
                     preload_hint="Run the same call once before capture (warm-up), or precompile with "
                                  "`python -m deep_gemm precompile`.",
                     num_threads=config.num_threads, smem_bytes=config.smem_bytes)


def a_tail_rows(config: KernelConfig, shape_m: int) -> int:
    """Rows of the boxes through which a dense M's last, partial block loads A and A's scales (0
    when it is whole, or for grouped layouts): the block's rows, rounded up to 8 with several K
    blocks a stage (each slot of the box must start 1024-byte aligned for the swizzle)."""
    if config.layout != Layout.DENSE:
        return 0
    rows = shape_m % config.block_m
    if config.stage_k_blocks > 1:
        rows = ceil_div(rows, 8) * 8
    return rows if rows < config.block_m else 0


def prepare_gemm(config: KernelConfig, *, a: torch.Tensor, a_rows: int, sa: torch.Tensor, sa_rows: int,
                 b: torch.Tensor, b_rows: int, sb: torch.Tensor, out: torch.Tensor, out_rows: int, shape_m: int,
                 group_info, num_sms: int) -> PreparedLaunch:
    """The GEMM over 2-D views, packed and ready to fire on the current stream.

    a: rows of K fp8 (row stride a.stride(-2)); sa: fp32 rows of sa_rows scales, one row per K
    block (per group and K block, masked), sa.stride(-1) elements apart (column-major scales; the
    kernel reads zeros past sa_rows); b: rows of K; out: bf16 rows of N. `shape_m` is M (dense,
    contiguous) or max_m (masked). The result depends only on these arguments' values, pointers,
    shapes and strides, the device and the current stream (whose split-K workspace it uses), which
    lets callers cache it per call site.
    """
    device_index = a.device.index
    kernel = gemm_kernel(config, device_index)
    k, n = config.shape_k, config.shape_n
    chunk = store_chunk_cols(config.block_n)
    # With one K block the scales' K stride is meaningless to torch; the kernel needs the real one.
    sa_stride = sa.stride(-1) if sa.shape[-1] > 1 else (sa_rows + 3) // 4 * 4
    tail_rows = a_tail_rows(config, shape_m)

    def map_k_major(t, rows, box_rows):
        # Rows of K fp8. Several K blocks a stage: a 3-D view [K / 128][rows][128] (K blocks 128
        # bytes apart), whose box of stage_k_blocks blocks lands as consecutive slots.
        if config.stage_k_blocks == 1:
            return tensor_map_2d(t.data_ptr(), "u8", k, rows, t.stride(-2), BLOCK_K, box_rows, SWIZZLE_128B)
        return tensor_map(t.data_ptr(), "u8", (BLOCK_K, rows, k // BLOCK_K), (t.stride(-2), BLOCK_K),
                          (BLOCK_K, box_rows, config.stage_k_blocks), SWIZZLE_128B)

    def map_sa(rows):
        # A's scales as rows of sa_rows, one per K block (and group), 16-byte boxes; the loader
        # warp reads them through the pointer instead.
        if config.scale_loader_warp:
            return _NO_MAP
        return tensor_map_2d(sa.data_ptr(), "f32", sa_rows, sa.shape[-1] * (sa.shape[0] if sa.dim() == 3 else 1),
                             sa_stride * 4, ceil_div(rows, 4) * 4, config.stage_k_blocks, 0)

    # Persistent grid: one block per SM at most, no more blocks than units of work.
    grid = num_sms
    if config.layout != Layout.MASKED:
        units = ceil_div(shape_m, config.block_m) * ceil_div(n, config.block_n)
        grid = max(1, min(grid, units * config.split_k))   # split-K: tail tiles may be split
    stream = current_raw_stream(device_index)
    counters = partials = 0
    if config.split_k > 1:   # split tail tiles: at most one counter and one partial tile per block
        counters, partials = split_k_workspace(a.device, stream, grid, config.split_k_workspace_floats(grid))
    params = pack_gemm_params(
        tma_a=map_k_major(a, a_rows, config.block_m), tma_b=map_k_major(b, b_rows, config.block_n),
        tma_sa=map_sa(config.block_m),
        tma_out=tensor_map_2d(out.data_ptr(), "bf16", n, out_rows, out.stride(-2) * 2, chunk, 64, chunk * 2),
        tma_a_tail=map_k_major(a, a_rows, tail_rows) if tail_rows else _NO_MAP,
        tma_sa_tail=map_sa(tail_rows) if tail_rows else _NO_MAP,
        sa=sa.data_ptr(), sb=sb.data_ptr(), out=out.data_ptr(), out_ld_bytes=out.stride(-2) * 2, shape_m=shape_m,
        sa_rows=sa_rows, sa_ld=sa_stride, a_tail_rows=tail_rows,
        group_info=group_info.data_ptr() if group_info is not None else 0, workspace=partials,
        tile_counters=counters)
    return PreparedLaunch(kernel, grid, params, GEMM_PARAM_OFFSETS, stream, device_index)
