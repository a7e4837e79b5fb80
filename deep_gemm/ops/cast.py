"""FP8 casts: cached launch, or validate -> allocate -> load the kernel -> launch -> cache.

On a Hopper GPU the kernels of kernels/cast.cuh run, bit-identical to deep_gemm.reference run on the
same CUDA tensor; anywhere else the reference runs. A cast of the same x into outputs at the same
addresses on the same stream is one lookup, one layout guard and one launch, as for the GEMMs.
"""
from __future__ import annotations

import struct

import torch

from .. import reference
from ..jit.cast_source import PER_BLOCK, PER_TOKEN, PER_TOKEN_THREADS, CastConfig, cast_source
from ..runtime.kernels import load_once
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

_launches = LaunchCache()
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_loaded: dict = {}          # (kind, K, dtype name, vec, device index) -> LoadedKernel
launch_count = 0            # kernels launched by this module (tests check the GPU path ran)


def cast_kernel(config: CastConfig, device_index: int):
    """The loaded kernel for `config` on a device, compiled and loaded on first use."""
    kernel = _loaded.get((config, device_index))
    if kernel is not None:   # the per-call path: no closure or message strings built
        return kernel
    return load_once(_loaded, (config, device_index), device_index,
                     build=lambda: (cast_source(config), config.kernel_name, config.name),
                     what=f"cast kernel {config.name}",
                     preload_hint="Run the same cast once before capture (warm-up), or compile it ahead with "
                                  "deep_gemm.ops.cast.precompile_casts.",
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
    groups = x.shape[0] if x.dim() == 3 else 1
    lead = (groups,) if x.dim() == 3 else ()
    rows, k = x.shape[-2], x.shape[-1]
    kb, nb = (k + BLOCK - 1) // BLOCK, (rows + BLOCK - 1) // BLOCK
    if kind == PER_TOKEN:   # 8 lanes per (row, K block) unit; scales column-major TMA-aligned
        units = PER_TOKEN_THREADS // 8
        ctas = (rows * kb + units - 1) // units
        aligned = (rows + 3) // 4 * 4
        strides = (1, aligned) if x.dim() == 2 else (kb * aligned, 1, aligned)
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
        launch = PreparedLaunch(kernel, grid, params, _OFFSETS[kind], current_raw_stream(index), index)
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
    if not (isinstance(x, torch.Tensor) and x.is_cuda):   # (the current device is asked of CUDA only)
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
    if not (x.is_cuda and runs_on_hopper(x.device)):
        if into:
            raise ValueError(f"x must be a CUDA tensor on a Hopper GPU for the cast into given outputs, got {x.device}")
        return (reference.per_token_cast_to_fp8 if kind == PER_TOKEN else reference.per_block_cast_to_fp8)(x)
    _, _, shape, strides = _geometry(kind, x)
    if into:
        _check_output("q", q, _FP8, x.shape, None, x.device)
        _check_output("scales", scales, torch.float32, shape, strides, x.device)
    else:
        q = torch.empty(x.shape, dtype=_FP8, device=x.device)
        scales = (torch.empty_strided(shape, strides, dtype=torch.float32, device=x.device) if strides
                  else torch.empty(shape, dtype=torch.float32, device=x.device))
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
