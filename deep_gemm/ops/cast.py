"""FP8 casts: cached launch, or validate -> allocate -> load the kernel -> launch -> cache.

On a Hopper GPU the kernels of kernels/cast.cuh run, bit-identical to deep_gemm.reference run on the
same CUDA tensor; anywhere else the reference runs. A cast of the same x into outputs at the same
addresses on the same stream is one lookup, one layout guard and one launch, as for the GEMMs; a
cast of tensors at other addresses with a layout cast before binds that launch's template to them
(runtime/launch.LaunchCache).
"""
from __future__ import annotations

import struct
from functools import lru_cache

import torch

from .. import reference
from ..jit.cast_source import (PER_BLOCK, PER_TOKEN, PER_TOKEN_THREADS, CastConfig, TransposedCastConfig, cast_source,
                               transposed_cast_source)
from ..runtime.kernels import load_once
from ..config import PTR
from ..runtime.launch import LaunchCache, PreparedLaunch, current_raw_stream
from .device import runs_on_hopper

BLOCK = 128
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FP8 = torch.float8_e4m3fn
_INT32_MAX = 2**31 - 1
# The kernels' parameters (kernels/cast.cuh): x, q, scales, x's row stride, then per-token
# (m, aligned_m, CTAs per group) or per-block (n, N blocks).
_PARAMS = {PER_TOKEN: struct.Struct("<QQQqiii"), PER_BLOCK: struct.Struct("<QQQqii")}
_OFFSETS = {PER_TOKEN: (0, 8, 16, 24, 32, 36, 40), PER_BLOCK: (0, 8, 16, 24, 32, 36)}
# Every cast kernel's first three parameters: the addresses of x, q and the scales, numbered as the
# launch cache's tensors (x, q, scales); a launch of other tensors of the same layout rewrites them.
_RELOCATIONS = ((0, 0, 0, PTR), (8, 1, 0, PTR), (16, 2, 0, PTR))

_launches = LaunchCache()
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_on_cuda = torch.Tensor.is_cuda.__get__   # x.is_cuda, as a function the CPU tests can replace
_loaded: dict = {}          # (kind, K, dtype name, vec, device index) -> LoadedKernel
launch_count = 0            # kernels launched by this module (tests check the GPU path ran)


def cast_kernel(config, device_index: int):
    """The loaded kernel for `config` (a CastConfig or TransposedCastConfig) on a device, compiled and
    loaded on first use."""
    kernel = _loaded.get((config, device_index))
    if kernel is not None:   # the per-call path: no closure or message strings built
        return kernel
    transposed = isinstance(config, TransposedCastConfig)
    source = transposed_cast_source if transposed else cast_source
    return load_once(_loaded, (config, device_index), device_index,
                     build=lambda: (source(config), config.kernel_name, config.name),
                     what=f"cast kernel {config.name}",
                     preload_hint="Run the same cast once before capture (warm-up), or compile it ahead with "
                                  f"deep_gemm.ops.cast.{'precompile_transposed_casts' if transposed else 'precompile_casts'}.",
                     num_threads=config.num_threads)


def precompile_casts(ks, dtypes=(torch.bfloat16,), device=None) -> None:
    """Compile and load both casts for every K in `ks` (16-byte and element-wise variants), so that
    later casts never compile, e.g. before CUDA-graph capture."""
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    for k in ks:
        for dtype in dtypes:
            for kind in (PER_TOKEN, PER_BLOCK):
                for vec in ((True, False) if k % 16 == 0 else (False,)):
                    cast_kernel(CastConfig(kind, k, _DTYPE_NAMES[dtype], vec), index)


def _rows(x: torch.Tensor):
    """(x or a contiguous copy, row stride in elements): row r of the flattened [rows, K] view
    starts at element r * stride and its columns are adjacent."""
    k = x.shape[-1]
    if x.is_contiguous():
        return x, k
    stride = x.stride()
    if k == 1 or stride[-1] == 1:
        if x.dim() == 2:
            return x, stride[0]
        groups, m = x.shape[0], x.shape[1]
        if m == 1:                                   # one row per group: rows step by groups
            return x, stride[0]
        if groups == 1 or stride[0] == m * stride[1]:
            return x, stride[1]
    return x.contiguous(), k


def _geometry(kind: str, x: torch.Tensor):
    """(grid, the kernel's trailing parameters, scales' shape, scales' strides or None)."""
    return _geometry_of(kind, x.shape)


@lru_cache(maxsize=1024)
def _geometry_of(kind: str, shape: torch.Size):
    groups = shape[0] if len(shape) == 3 else 1
    lead = (groups,) if len(shape) == 3 else ()
    rows, k = shape[-2], shape[-1]
    kb, nb = (k + BLOCK - 1) // BLOCK, (rows + BLOCK - 1) // BLOCK
    if kind == PER_TOKEN:   # 8 lanes per (row, K block) unit; scales column-major TMA-aligned
        units = PER_TOKEN_THREADS // 8
        ctas = (rows * kb + units - 1) // units
        aligned = (rows + 3) // 4 * 4
        strides = (1, aligned) if len(shape) == 2 else (kb * aligned, 1, aligned)
        return groups * ctas, (rows, aligned, ctas), lead + (rows, kb), strides
    return groups * nb * kb, (rows, nb), lead + (nb, kb), None


def _launch(kind: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, key, flat) -> None:
    """Validated tensors on a Hopper GPU: launch, and cache the launch under `key` unless it is None."""
    global launch_count
    grid, tail, _, _ = _geometry(kind, x)
    if grid > _INT32_MAX or max(tail) > _INT32_MAX:
        raise ValueError(f"x is too large for one cast launch: shape {tuple(x.shape)}")
    rows, row_stride = _rows(x)
    k = rows.shape[-1]
    # 16-byte accesses need every row of x (and of q, K bytes long) to start 16-byte aligned.
    vec = (k % 16 == 0 and rows.data_ptr() % 16 == 0
           and (rows.numel() <= k or row_stride * rows.element_size() % 16 == 0))
    index = rows.device.index
    config = CastConfig(kind, k, _DTYPE_NAMES[rows.dtype], vec)
    kernel = cast_kernel(config, index)
    params = _PARAMS[kind].pack(rows.data_ptr(), q.data_ptr(), scales.data_ptr(), row_stride, *tail)
    with torch.cuda.device(index):   # the module lives in that device's context
        launch = PreparedLaunch(kernel, grid, params, _OFFSETS[kind], current_raw_stream(index), index, _RELOCATIONS)
        launch.fire()
    launch_count += 1
    # Cached only when x's device was current (a cached launch fires without switching devices)
    # and x was read in place.
    if key is not None and key[-1] == index and rows is x:
        _launches.put(key, flat, launch)


def _cached(kind: str, x, q, scales):
    """(hit, key, tensors): fires the launch cached for these tensors if there is one (hit)."""
    global launch_count
    flat = (x, q, scales)
    if not (isinstance(x, torch.Tensor) and _on_cuda(x)):   # (the current device is asked of CUDA only)
        return False, None, flat
    fired, key = _launches.try_fire(flat, (kind, _current_device()))
    launch_count += fired
    return fired, key, flat


def _cast(kind: str, x, q=None, scales=None):
    """The cast of x into q and scales (allocated when None, with x validated first); returns them."""
    into = q is not None
    if into:
        hit, key, flat = _cached(kind, x, q, scales)
        if hit:
            return q, scales
    reference.check_cast_input(x, "x")
    device = x.device   # (a new torch.device per read)
    if not (_on_cuda(x) and runs_on_hopper(device)):
        if into:
            raise ValueError(f"x must be a CUDA tensor on a Hopper GPU for the cast into given outputs, got {device}")
        return (reference.per_token_cast_to_fp8 if kind == PER_TOKEN else reference.per_block_cast_to_fp8)(x)
    _, _, shape, strides = _geometry(kind, x)
    if into:
        _check_output("q", q, _FP8, x.shape, None, device)
        _check_output("scales", scales, torch.float32, shape, strides, device)
    else:
        q = torch.empty(x.shape, dtype=_FP8, device=device)
        scales = (torch.empty_strided(shape, strides, dtype=torch.float32, device=device) if strides
                  else torch.empty(shape, dtype=torch.float32, device=device))
        hit, key, flat = _cached(kind, x, q, scales)   # torch's allocator tends to hand back the same blocks
        if hit:
            return q, scales
    if x.numel():
        _launch(kind, x, q, scales, key, flat)
    return q, scales


def _check_output(name: str, t, dtype, shape, strides, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if strides is None and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if strides is not None and any(size > 1 and st != want for size, st, want in zip(t.shape, t.stride(), strides)):
        raise ValueError(f"{name} must have strides {tuple(strides)} (the column-major TMA-aligned layout), "
                         f"got {t.stride()}")


def per_token_cast_to_fp8(x: torch.Tensor):
    """[M, K] or [G, M, K] -> (e4m3 values, float32 scales per 1x128 block, column-major TMA-aligned)."""
    return _cast(PER_TOKEN, x)


def per_block_cast_to_fp8(x: torch.Tensor):
    """[N, K] or [G, N, K] -> (e4m3 values, float32 scales per 128x128 block, row-major)."""
    return _cast(PER_BLOCK, x)


def per_token_cast_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """per_token_cast_to_fp8 into preallocated q (e4m3, x's shape, contiguous) and scales (float32
    [..., M, ceil(K/128)] in the column-major TMA-aligned layout), on a Hopper GPU."""
    _cast(PER_TOKEN, x, q, scales)


def per_block_cast_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """per_block_cast_to_fp8 into preallocated q (e4m3, x's shape, contiguous) and scales (float32
    [..., ceil(N/128), ceil(K/128)], contiguous), on a Hopper GPU."""
    _cast(PER_BLOCK, x, q, scales)


# ---- transposed per-token casts (kernels/cast_transposed.cuh) ------------------------------------
# x [T, H] -> e4m3 x^T [H, T] per 1x128 block along T: the K-major operands (K = tokens) of weight-gradient
# GEMMs, dense or K-grouped, without x^T ever being materialised. Same launch machinery as the casts above.
_TRANSPOSED = "transposed"
_K_GROUPED_TRANSPOSED = "k_grouped_transposed"


def precompile_transposed_casts(hs, dtypes=(torch.bfloat16,), device=None) -> None:
    """Compile and load the dense and K-grouped transposed casts for every H in `hs` (16-byte and element-wise
    loads), so that later casts never compile, e.g. before CUDA-graph capture."""
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    for h in hs:
        for dtype in dtypes:
            name = _DTYPE_NAMES[dtype]
            vecs = (True, False) if h * dtype.itemsize % 16 == 0 else (False,)
            for vec in vecs:
                for grouped in (False, True):
                    cast_kernel(TransposedCastConfig(h, name, vec, grouped), index)


def dense_transposed_outputs(x: torch.Tensor):
    """Fresh (q [H, T] contiguous, scales [H, ceil(T/128)] column-major TMA-aligned) for x [T, H] (also what the
    custom op's fake kernel returns)."""
    t, h = x.shape
    scales = x.new_empty((-(-t // BLOCK), (h + 3) // 4 * 4), dtype=torch.float32).t()[:h]
    return x.new_empty((h, t), dtype=_FP8), scales


def k_grouped_transposed_outputs(x: torch.Tensor, sizes):
    """Fresh (q [T * H], scales [sum of ceil(k_g/128), H]), both contiguous."""
    t, h = x.shape
    blocks = sum(-(-k // BLOCK) for k in sizes)
    return x.new_empty((t * h,), dtype=_FP8), x.new_empty((blocks, h), dtype=torch.float32)


def _into_layout(fresh, got) -> tuple:
    """`got`'s tensors in the layout of `fresh`'s (the reference may stride a size-1 dimension otherwise), so that
    every path returns what the custom op's fake kernel promises."""
    out = []
    for f, g in zip(fresh, got):
        if f.stride() != g.stride():
            if f.dtype == _FP8:   # (copies of float8 go through bytes: not every torch build has float8 copy kernels)
                f.view(torch.uint8).copy_(g.view(torch.uint8))
            else:
                f.copy_(g)
            g = f
        out.append(g)
    return tuple(out)


def _transposed_launches(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, sizes, grouped: bool):
    """(config, [(grid, params)]) of the kernel launches that cast x into q and scales: one launch per
    TRANSPOSED_MAX_GROUPS groups (dense: one), each with its pointers moved to its first group."""
    t, h = x.shape
    esize = x.element_size()
    row_stride = x.stride(0) if t > 1 else h
    # 16-byte loads need every row of x to start 16-byte aligned and whole 16-byte chunks per row.
    vec = h * esize % 16 == 0 and x.data_ptr() % 16 == 0 and row_stride * esize % 16 == 0
    config = TransposedCastConfig(h, _DTYPE_NAMES[x.dtype], vec, grouped)
    # 16-byte stores need every output row to start 16-byte aligned.
    q_vec = int(q.data_ptr() % 16 == 0 and all(k % 16 == 0 for k in sizes))
    s_ld = h if grouped else (h + 3) // 4 * 4
    max_groups = config.max_groups
    params = struct.Struct(f"<QQQq4i{max_groups + 1}i{max_groups + 1}i")
    col_tiles = -(-h // config.tile_cols)
    token_start, block_start = [0], [0]
    for k in sizes:
        token_start.append(token_start[-1] + k)
        block_start.append(block_start[-1] + -(-k // BLOCK))
    launches = []
    for first in range(0, len(sizes), max_groups):
        last = min(first + max_groups, len(sizes))
        tok0, blk0 = token_start[first], block_start[first]
        num_blocks = block_start[last] - blk0
        if num_blocks == 0:
            continue
        grid = num_blocks * col_tiles
        if grid > _INT32_MAX:
            raise ValueError(f"x is too large for one cast launch: shape {tuple(x.shape)}")
        pad = [0] * (max_groups - (last - first))
        launches.append((grid, params.pack(
            x.data_ptr() + tok0 * row_stride * esize, q.data_ptr() + tok0 * h, scales.data_ptr() + blk0 * s_ld * 4,
            row_stride, s_ld, last - first, num_blocks, q_vec,
            *[s - tok0 for s in token_start[first:last + 1]], *pad,
            *[b - blk0 for b in block_start[first:last + 1]], *pad)))
    return config, launches


def _launch_transposed(x, q, scales, sizes, grouped: bool, key, flat) -> None:
    """Validated tensors on a Hopper GPU: launch; cache the launch under `key` when it is one launch."""
    global launch_count
    config, launches = _transposed_launches(x, q, scales, sizes, grouped)
    index = x.device.index
    kernel = cast_kernel(config, index)
    with torch.cuda.device(index):   # the module lives in that device's context
        stream = current_raw_stream(index)
        # (The relocations hold for the first launch, whose pointers start at the first group: the only
        # one cached, when it is the only one.)
        prepared = [PreparedLaunch(kernel, grid, params, (0,), stream, index, _RELOCATIONS) for grid, params in launches]
        for launch in prepared:
            launch.fire()
    launch_count += len(prepared)
    if key is not None and key[-1] == index and len(prepared) == 1:
        _launches.put(key, flat, prepared[0])


def _check_transposed_outputs(x, q, scales, sizes, grouped: bool) -> None:
    t, h = x.shape
    if grouped:
        blocks = sum(-(-k // BLOCK) for k in sizes)
        _check_output("q", q, _FP8, (t * h,), None, x.device)
        _check_output("scales", scales, torch.float32, (blocks, h), None, x.device)
    else:
        _check_output("q", q, _FP8, (h, t), None, x.device)
        _check_output("scales", scales, torch.float32, (h, -(-t // BLOCK)), (1, (h + 3) // 4 * 4), x.device)


def _transposed_key_extra(x, grouped: bool, k_sizes):
    """What a cached launch of this call depends on besides its pointers and stream (None: not cacheable). The
    group sizes are part of it; only plain ints, so that a bool never passes for a size through the cache."""
    if not (isinstance(x, torch.Tensor) and _on_cuda(x)):
        return None
    if not grouped:
        return (_TRANSPOSED, _current_device())
    if type(k_sizes) in (list, tuple) and all(type(k) is int for k in k_sizes):
        return (_K_GROUPED_TRANSPOSED, tuple(k_sizes), _current_device())
    return None


def _cast_transposed(x, grouped: bool, k_sizes=None, q=None, scales=None):
    """The transposed cast of x (dense, or K-grouped by k_sizes) into q and scales (allocated when None); returns
    them."""
    global launch_count
    into = q is not None
    extra = _transposed_key_extra(x, grouped, k_sizes)
    key = None
    if into and extra is not None:
        fired, key = _launches.try_fire((x, q, scales), extra)
        if fired:
            launch_count += 1
            return q, scales
    reference.check_transposed_cast_input(x, "x")
    sizes = reference.check_k_sizes(k_sizes, x.shape[0]) if grouped else [x.shape[0]]
    device = x.device
    if not (_on_cuda(x) and runs_on_hopper(device)):
        if into:
            raise ValueError(f"x must be a CUDA tensor on a Hopper GPU for the cast into given outputs, got {device}")
        fresh = k_grouped_transposed_outputs(x, sizes) if grouped else dense_transposed_outputs(x)
        got = (reference.k_grouped_per_token_cast_to_fp8_transposed(x, sizes) if grouped
               else reference.per_token_cast_to_fp8_transposed(x))
        return _into_layout(fresh, got)
    if x.shape[0] > _INT32_MAX:
        raise ValueError(f"x must have at most {_INT32_MAX} rows (tokens) on the GPU, got {x.shape[0]}")
    if into:
        _check_transposed_outputs(x, q, scales, sizes, grouped)
    else:
        q, scales = k_grouped_transposed_outputs(x, sizes) if grouped else dense_transposed_outputs(x)
    if not into and extra is not None:   # torch's allocator tends to hand back the same blocks
        fired, key = _launches.try_fire((x, q, scales), extra)
        if fired:
            launch_count += 1
            return q, scales
    if x.numel():
        _launch_transposed(x, q, scales, sizes, grouped, key, (x, q, scales))
    return q, scales


def per_token_cast_to_fp8_transposed(x: torch.Tensor):
    """x [T, H] -> per_token_cast_to_fp8(x.T) without materialising x.T: (q e4m3 [H, T] contiguous, scales float32
    [H, ceil(T/128)] in the column-major TMA-aligned layout)."""
    return _cast_transposed(x, False)


def k_grouped_per_token_cast_to_fp8_transposed(x: torch.Tensor, k_sizes):
    """x [T, H] of G groups of k_sizes[g] rows (multiples of 16) -> (q e4m3 [T * H]: group after group x_g.T
    [H, k_g] row-major, per 1x128 along its tokens; scales float32 [sum of ceil(k_g/128), H] row-major)."""
    return _cast_transposed(x, True, k_sizes)


def per_token_cast_transposed_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """per_token_cast_to_fp8_transposed into preallocated q (e4m3 [H, T], contiguous) and scales (float32
    [H, ceil(T/128)] in the column-major TMA-aligned layout), on a Hopper GPU."""
    _cast_transposed(x, False, None, q, scales)


def k_grouped_per_token_cast_transposed_into(x: torch.Tensor, k_sizes, q: torch.Tensor,
                                             scales: torch.Tensor) -> None:
    """k_grouped_per_token_cast_to_fp8_transposed into preallocated q (e4m3 [T * H]) and scales (float32
    [sum of ceil(k_g/128), H], contiguous), on a Hopper GPU."""
    _cast_transposed(x, True, k_sizes, q, scales)
