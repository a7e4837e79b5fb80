"""Loaded kernels per (configuration, device), and the GEMM launch every layout prepares."""
from __future__ import annotations

import struct
import threading
from typing import Optional

import torch

from ..config import (BLOCK_K, GEMM_PARAMS, GROUP_MAPS_PARAMS, K_GROUPED_DEVICE_PARAMS, MAP, PTR, KernelConfig,
                      Layout, ceil_div, k_grouped_params, param_layout, store_chunk_cols)
from ..jit import compile_kernel
from ..jit.group_maps_source import THREADS as GROUP_MAPS_THREADS
from ..jit.group_maps_source import group_maps_label, group_maps_source
from ..jit.kernel_source import gemm_source
from .driver import LoadedKernel
from .launch import GEMM_PARAM_OFFSETS, LaunchChain, PreparedLaunch, current_raw_stream, pack_gemm_params, params_struct
from .tma import SWIZZLE_128B, tensor_map, tensor_map_2d
from .workspace import group_maps_workspace, split_k_workspace

_NO_MAP = bytes(128)   # an unused tensor-map parameter
# The tensors whose addresses a GEMM launch holds, numbered as ops/gemm.run lists a call's tensors
# (the launch cache's pointers): a, sa, b, sb, out, then the index tensor (m_indices or masked_m).
A, SA, B, SB, OUT, INDEX = range(6)
# Each address field of GemmParams and the tensor whose address it holds.
_FIELD_SOURCES = (("tma_a", A), ("tma_b", B), ("tma_sa", SA), ("tma_out", OUT), ("tma_a_tail", A),
                  ("tma_sa_tail", SA), ("tma_sb", SB), ("sa", SA), ("sb", SB), ("out", OUT), ("group_info", INDEX))
# BF16 operands have no scales: a call's tensors are a, b, out and, masked, masked_m (ops/bf16.py), numbered 0-3.
_BF16_SOURCES = {A: 0, B: 1, OUT: 2, INDEX: 3}


def _numbering(bf16: bool):
    """A tensor's number among the call's tensors, from its FP8 number (A .. INDEX)."""
    return _BF16_SOURCES.get if bf16 else (lambda source: source)


_PARAM_OFFSETS = param_layout()[0]
_PARAM_KINDS = dict(GEMM_PARAMS)
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


def group_maps_kernel(mn_major: bool, device_index: int) -> LoadedKernel:
    """The loaded kernel that writes a K-grouped GEMM's tensor maps from sizes on the device."""
    key = ("group_maps", mn_major, device_index)
    kernel = _loaded.get(key)
    if kernel is not None:
        return kernel
    label = group_maps_label(mn_major)
    return load_once(_loaded, key, device_index, build=lambda: (*group_maps_source(mn_major), label),
                     what=f"kernel {label}",
                     preload_hint="Run the same call once before capture (warm-up).", num_threads=GROUP_MAPS_THREADS)


def a_tail_rows(config: KernelConfig, shape_m: int) -> int:
    """Rows of the boxes through which a dense M's last, partial block loads A and A's scales (0
    when it is whole, for grouped layouts and MN-major A): the block's rows, rounded up to 8 with
    several K blocks a stage (each slot of the box must start 1024-byte aligned for the swizzle)."""
    if config.layout != Layout.DENSE or config.a_mn_major:
        return 0
    rows = shape_m % config.block_m
    if config.stage_k_blocks > 1:
        rows = ceil_div(rows, 8) * 8
    return rows if rows < config.block_m else 0


def mn_major_map(address: int, cols: int, k: int, row_stride: int, config: KernelConfig) -> bytes:
    """The tensor map of an MN-major bf16 operand: `k` rows of `cols` (M or N) elements, row_stride
    elements apart, in boxes of 64 columns by one K block's rows (kernels/gemm.cuh, load_mn_boxes)."""
    return tensor_map_2d(address, "bf16", cols, k, row_stride * 2, 64, config.block_k, SWIZZLE_128B)


def k_grouped_param_block(config: KernelConfig, a: torch.Tensor, b: torch.Tensor, k_sizes, m: int) -> tuple:
    """(bytes, relocations) of the K-grouped kernel's second parameter: for each group g, tensor
    maps of its [M, K_g] block of the flat fp8 `a` and [N, K_g] block of the flat `b` (group after
    group; bf16: its rows [K_g, M] of a [sum K_g, M] and [K_g, N] of b, MN-major), its K blocks
    and the first row of its K blocks in the scale tensors. A group without K loads nothing: no
    maps. Relocations as PreparedLaunch's, offsets within this block."""
    g, n = config.num_groups, config.shape_n
    offsets, size = param_layout(k_grouped_params(g))
    block = bytearray(size)
    relocations = []
    k_blocks, kb_offset = [], []
    offset = first_kb = 0
    for i, k in enumerate(k_sizes):
        if k:
            at_a, at_b = offsets["tma_a"] + 128 * i, offsets["tma_b"] + 128 * i
            if config.bf16_operands:   # (MN-major: 64-column boxes of a K block's rows)
                delta_a, delta_b = offset * a.stride(0) * 2, offset * b.stride(0) * 2
                map_a = mn_major_map(a.data_ptr() + delta_a, m, k, a.stride(0), config)
                map_b = mn_major_map(b.data_ptr() + delta_b, n, k, b.stride(0), config)
            else:
                delta_a, delta_b = offset * m, offset * n
                map_a = tensor_map_2d(a.data_ptr() + delta_a, "u8", k, m, k, BLOCK_K, config.block_m, SWIZZLE_128B)
                map_b = tensor_map_2d(b.data_ptr() + delta_b, "u8", k, n, k, BLOCK_K, config.block_n, SWIZZLE_128B)
            block[at_a:at_a + 128], block[at_b:at_b + 128] = map_a, map_b
            relocations += [(at_a, A, delta_a, MAP), (at_b, B, delta_b, MAP)]
        k_blocks.append(ceil_div(k, config.block_k))
        kb_offset.append(first_kb)
        offset, first_kb = offset + k, first_kb + k_blocks[-1]
    struct.pack_into(f"<{g}i", block, offsets["k_blocks"], *k_blocks)
    struct.pack_into(f"<{g}i", block, offsets["kb_offset"], *kb_offset)
    return bytes(block), relocations


_GROUP_MAPS_STRUCT, _GROUP_MAPS_NAMES = params_struct(GROUP_MAPS_PARAMS)
_GROUP_MAPS_OFFSETS = param_layout(GROUP_MAPS_PARAMS)[0]
# The call's tensors in the map-writing kernel's parameter, by operand type: a template re-addresses
# them; the workspace's pointers belong to the stream.
_GROUP_MAPS_RELOCATIONS = {
    bf16: tuple((_GROUP_MAPS_OFFSETS[name], _numbering(bf16)(source), 0, kind)
                for name, source, kind in (("map_a", A, MAP), ("map_b", B, MAP), ("out", OUT, PTR),
                                           ("k_sizes", INDEX, PTR), ("a_base", A, PTR), ("b_base", B, PTR)))
    for bf16 in (False, True)}
_DEVICE_GROUPS_STRUCT, _ = params_struct(K_GROUPED_DEVICE_PARAMS)
_NO_SCALES = 2**31 - 1   # K blocks the scales of bf16 operands (none) hold


def prepare_group_maps(config: KernelConfig, a: torch.Tensor, b: torch.Tensor, sa: Optional[torch.Tensor],
                       out: torch.Tensor, k_sizes: torch.Tensor, m: int, stream: int) -> tuple:
    """(second kernel parameter of the GEMM, launch of the kernel that fills it): a K-grouped GEMM
    with its group sizes on the device (config.device_sizes). The kernel of kernels/group_maps.cuh
    writes each group's maps of A and B, from templates encoded here (only their start, K and
    stride differ), and its K blocks into the stream's workspace, where the GEMM reads them."""
    g, n = config.num_groups, config.shape_n
    maps_a = group_maps_workspace(a.device, stream, g * (2 * 128 + 2 * 4))
    maps_b, k_blocks = maps_a + 128 * g, maps_a + 256 * g
    if config.bf16_operands:   # rows [K_g][M] of a [sum K, M] tensor: any K (a K block) for the template
        template_a = mn_major_map(a.data_ptr(), m, config.block_k, a.stride(0), config)
        template_b = mn_major_map(b.data_ptr(), n, config.block_k, b.stride(0), config)
        per_k_a, per_k_b, capacity, kb_capacity = a.stride(0) * 2, b.stride(0) * 2, a.shape[0], _NO_SCALES
    else:   # [rows, K_g] row-major blocks of the flat fp8 tensors
        template_a = tensor_map_2d(a.data_ptr(), "u8", BLOCK_K, m, BLOCK_K, BLOCK_K, config.block_m, SWIZZLE_128B)
        template_b = tensor_map_2d(b.data_ptr(), "u8", BLOCK_K, n, BLOCK_K, BLOCK_K, config.block_n, SWIZZLE_128B)
        per_k_a, per_k_b, capacity, kb_capacity = m, n, a.numel() // m, sa.shape[-1]
    fields = dict(map_a=template_a, map_b=template_b, maps_a=maps_a, maps_b=maps_b, k_blocks=k_blocks,
                  out=out.data_ptr(), k_sizes=k_sizes.data_ptr(), a_base=a.data_ptr(), b_base=b.data_ptr(),
                  a_bytes_per_k=per_k_a, b_bytes_per_k=per_k_b, k_capacity=capacity, out_group_floats=m * n,
                  kb_capacity=kb_capacity, num_groups=g, k_multiple=8 if config.bf16_operands else 16,
                  block_k=config.block_k)
    params = _GROUP_MAPS_STRUCT.pack(*(fields[name] for name in _GROUP_MAPS_NAMES))
    kernel = group_maps_kernel(config.bf16_operands, a.device.index)
    maps_launch = PreparedLaunch(kernel, 1, params, (0,), stream, a.device.index,
                                 _GROUP_MAPS_RELOCATIONS[config.bf16_operands])
    return _DEVICE_GROUPS_STRUCT.pack(maps_a, maps_b, k_blocks), maps_launch


def prepare_gemm(config: KernelConfig, *, a: torch.Tensor, a_rows: int, sa: Optional[torch.Tensor],
                 sa_rows: int, b: torch.Tensor, b_rows: int, sb: Optional[torch.Tensor], out: torch.Tensor,
                 out_rows: int, shape_m: int, group_info, num_sms: int, k_sizes=None) -> PreparedLaunch | LaunchChain:
    """The GEMM over 2-D views, packed and ready to fire on the current stream.

    a: rows of K fp8 (row stride a.stride(-2)); sa: fp32 rows of sa_rows scales, one row per K
    block (per group and K block, masked), sa.stride(-1) elements apart (column-major scales; the
    kernel reads zeros past sa_rows); b: rows of K; sb: B's block scales, or with row_scales_b
    [N, K blocks] in the same column-major layout as sa; out: bf16 or fp32 rows of N (K-grouped:
    [G, M, N]). BF16 operands (config.bf16_operands): a and b rows of K bf16 (a_mn_major /
    b_mn_major: views with stride(-2) == 1, the transpose of [K, rows] tensors; K-grouped: the
    flat [sum K_g, M] and [sum K_g, N] tensors), sa and sb None.
    `shape_m` is M (dense, contiguous, K-grouped) or max_m (masked). K-grouped: a and b are flat,
    k_sizes each group's K, sa [M, sum of K blocks] and sb likewise; with config.device_sizes,
    k_sizes is an int32 tensor on the device and the result a LaunchChain (prepare_group_maps).
    The result depends only on these arguments' values, pointers, shapes and strides, the device
    and the current stream (whose workspaces it uses), which lets callers cache it per call site;
    its relocations say where each tensor's address sits, which lets a call on tensors of the same
    layout elsewhere in memory reuse it (runtime/launch.LaunchTemplate).
    """
    device_index = a.device.index
    kernel = gemm_kernel(config, device_index)
    k, n = config.shape_k, config.shape_n
    chunk = store_chunk_cols(config.block_n, config.out_bytes)
    grouped = config.layout == Layout.K_GROUPED
    bf16 = config.bf16_operands   # (sa and sb are None)
    # With one K block the scales' K stride is meaningless to torch; the kernel needs the real one.
    sa_stride = 0 if bf16 else sa.stride(-1) if sa.shape[-1] > 1 else (sa_rows + 3) // 4 * 4
    tail_rows = a_tail_rows(config, shape_m)

    def map_operand(t, rows, box_rows, mn_major=False):
        # Rows of K fp8, or bf16 (a K block: 64 of them, the same 128 bytes). Several K blocks a
        # stage: a 3-D view [K / 128][rows][128] (K blocks 128 bytes apart), whose box of
        # stage_k_blocks blocks lands as consecutive slots. MN-major bf16: the [K, rows] tensor
        # in boxes of 64 columns by a K block's rows.
        if mn_major:
            return mn_major_map(t.data_ptr(), rows, k, t.stride(-1), config)
        if bf16:
            return tensor_map_2d(t.data_ptr(), "bf16", k, rows, t.stride(-2) * 2, config.block_k, box_rows,
                                 SWIZZLE_128B)
        if config.stage_k_blocks == 1:
            return tensor_map_2d(t.data_ptr(), "u8", k, rows, t.stride(-2), BLOCK_K, box_rows, SWIZZLE_128B)
        return tensor_map(t.data_ptr(), "u8", (BLOCK_K, rows, k // BLOCK_K), (t.stride(-2), BLOCK_K),
                          (BLOCK_K, box_rows, config.stage_k_blocks), SWIZZLE_128B)

    def map_sa(rows):
        # A's scales as rows of sa_rows, one per K block (and group), 16-byte boxes; the loader
        # warp reads them through the pointer instead.
        if config.scale_loader_warp or bf16:
            return _NO_MAP
        return tensor_map_2d(sa.data_ptr(), "f32", sa_rows, sa.shape[-1] * (sa.shape[0] if sa.dim() == 3 else 1),
                             sa_stride * 4, ceil_div(rows, 4) * 4, config.stage_k_blocks, 0)

    def map_sb():
        # B's per-row scales, as A's: rows of N, one per K block, a box of BLOCK_N.
        if not config.row_scales_b:
            return _NO_MAP
        sb_stride = sb.stride(-1) if sb.shape[-1] > 1 else (n + 3) // 4 * 4
        return tensor_map_2d(sb.data_ptr(), "f32", n, sb.shape[-1], sb_stride * 4, config.block_n,
                             config.stage_k_blocks, 0)

    def map_out():
        # D in chunks of 128-byte (or narrower) rows, swizzled like the shared-memory tile; K-grouped:
        # [G][M][N], so a box stops at its group's last row.
        kind, swizzle = ("f32" if config.out_fp32 else "bf16"), chunk * config.out_bytes
        if grouped:
            return tensor_map(out.data_ptr(), kind, (n, shape_m, config.num_groups),
                              (out.stride(-2) * 4, out.stride(0) * 4), (chunk, 64, 1), swizzle)
        return tensor_map_2d(out.data_ptr(), kind, n, out_rows, out.stride(-2) * config.out_bytes, chunk, 64, swizzle)

    # Persistent grid: one block per SM at most, no more blocks than units of work.
    grid = num_sms
    if config.layout != Layout.MASKED:
        units = ceil_div(shape_m, config.block_m) * ceil_div(n, config.block_n) * (config.num_groups if grouped else 1)
        grid = max(1, min(grid, units * config.split_k))   # split-K: tail tiles may be split
    stream = current_raw_stream(device_index)
    counters = partials = 0
    if config.split_k > 1:   # split tail tiles: at most one counter and one partial tile per block
        counters, partials = split_k_workspace(a.device, stream, grid, config.split_k_workspace_floats(grid))
    fields = dict(
        tma_a=_NO_MAP if grouped else map_operand(a, a_rows, config.block_m, config.a_mn_major),
        tma_b=_NO_MAP if grouped else map_operand(b, b_rows, config.block_n, config.b_mn_major),
        tma_sa=map_sa(config.block_m), tma_out=map_out(),
        tma_a_tail=map_operand(a, a_rows, tail_rows) if tail_rows else _NO_MAP,
        tma_sa_tail=map_sa(tail_rows) if tail_rows else _NO_MAP, tma_sb=map_sb(),
        sa=0 if bf16 else sa.data_ptr(), sb=0 if bf16 else sb.data_ptr(), out=out.data_ptr(),
        out_ld_bytes=out.stride(-2) * config.out_bytes,
        shape_m=shape_m, sa_rows=sa_rows, sa_ld=sa_stride, a_tail_rows=tail_rows,
        group_info=group_info.data_ptr() if group_info is not None else 0, workspace=partials,
        tile_counters=counters)
    params = pack_gemm_params(**fields)
    # Where the call's addresses sit (an unused map or a null pointer holds none).
    number = _numbering(bf16)
    relocations = [(_PARAM_OFFSETS[name], number(source), 0, _PARAM_KINDS[name]) for name, source in _FIELD_SOURCES
                   if fields[name] not in (0, _NO_MAP)]
    offsets = GEMM_PARAM_OFFSETS
    if config.device_sizes:   # the maps and K a first kernel writes: their addresses, a second parameter
        block, maps_launch = prepare_group_maps(config, a, b, sa, out, k_sizes, shape_m, stream)
        gemm = PreparedLaunch(kernel, grid, params + block, (0, len(params)), stream, device_index,
                              tuple(relocations))
        return LaunchChain(maps_launch, gemm)
    if grouped:   # the per-group maps and K: a second kernel parameter
        offsets = (0, len(params))
        block, block_relocations = k_grouped_param_block(config, a, b, k_sizes, shape_m)
        relocations += [(offsets[1] + at, number(source), delta, kind) for at, source, delta, kind in block_relocations]
        params += block
    return PreparedLaunch(kernel, grid, params, offsets, stream, device_index, tuple(relocations))
