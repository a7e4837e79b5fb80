"""FP8 casts on Hopper: validate -> allocate -> pick/compile/load the kernel -> launch.

The results are bit-identical to deep_gemm.reference run on the same CUDA tensor (see
kernels/cast.cuh for the arithmetic). utils._cast_impl routes CUDA tensors on Hopper here.
"""
from __future__ import annotations

import ctypes
import struct

import torch

from .. import reference
from ..jit.cast_source import PER_BLOCK, PER_TOKEN, PER_TOKEN_THREADS, CastConfig, cast_source
from ..runtime.driver import LoadedKernel
from ..runtime.kernels import load_once
from ..runtime.launch import LaunchCache, PreparedLaunch, current_raw_stream
from .gemm import _PLAIN

BLOCK = 128
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_FP8 = torch.float8_e4m3fn
_INT32_MAX = 2**31 - 1
# Kernel parameters, in order (kernels/cast.cuh).
_PARAM_TYPES = {
    PER_TOKEN: (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                ctypes.c_int32, ctypes.c_int32, ctypes.c_int32),
    PER_BLOCK: (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                ctypes.c_int32, ctypes.c_int32),
}

# The same parameters packed back to back for a PreparedLaunch, and where each one starts.
_PARAM_STRUCTS = {PER_TOKEN: struct.Struct("<QQQqiii"), PER_BLOCK: struct.Struct("<QQQqii")}
_PARAM_OFFSETS = {kind: tuple(sum(ctypes.sizeof(t) for t in types[:i]) for i in range(len(types)))
                  for kind, types in _PARAM_TYPES.items()}

# Launch cache, as for the GEMMs (runtime/launch.py): a cast of the same x into outputs at the same
# addresses (torch's caching allocator tends to hand the same blocks back call after call) on the
# same stream and device is, from the third such call on, one lookup, one layout guard and one
# launch (a CUDA graph from the fourth). The key's last element is the current device: only
# launches made with x's device current are cached.
_launches = LaunchCache()
_seen_once: dict = {}       # keys of casts launched once, without a cached launch yet
_SEEN_ONCE_SIZE = 4096     # when full it starts over: a forgotten key pays one more plain launch
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device

_loaded: dict = {}          # (kind, K, dtype name, vec, device index) -> LoadedKernel
launch_count = 0            # kernels launched by this module (tests check the GPU path ran)


def _key(config: CastConfig, device_index: int) -> tuple:
    # A plain tuple: the per-call lookup must not build (and validate) a CastConfig.
    return (config.kind, config.k, config.dtype, config.vec, device_index)


def cast_kernel(config: CastConfig, device_index: int) -> LoadedKernel:
    """The loaded kernel for `config` on a device, compiling and loading it on first use."""
    return load_once(_loaded, _key(config, device_index), device_index, source=cast_source(config),
                     kernel_name=config.kernel_name, label=config.name, what=f"cast kernel {config.name}",
                     preload_hint="Run the same cast once before capture (warm-up), or compile it ahead "
                                  "with deep_gemm.ops.cast.precompile_casts.",
                     num_threads=config.num_threads, param_types=_PARAM_TYPES[config.kind])


def precompile_casts(ks, dtypes=(torch.bfloat16,), device=None) -> None:
    """Compile and load both casts for every K in `ks` (16-byte and element-wise variants), so
    later casts never compile, e.g. before CUDA-graph capture."""
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    for k in ks:
        for dtype in dtypes:
            for kind in (PER_TOKEN, PER_BLOCK):
                for vec in ((True, False) if k % 16 == 0 else (False,)):
                    cast_kernel(CastConfig(kind, k, _DTYPE_NAMES[dtype], vec), index)


def _row_layout(x: torch.Tensor):
    """(x or a contiguous copy, row stride in elements) such that row r of the flattened
    [rows, K] view starts at element r * stride and its columns are adjacent."""
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


def _launch_key(kind: str, x, q, scales):
    """The launch-cache key of a cast, or None for a call that must take the long way (which
    validates everything and names the culprit)."""
    try:
        if type(x) not in _PLAIN or type(q) not in _PLAIN or type(scales) not in _PLAIN:
            return None
        index = x.get_device()
        if index < 0:   # not a CUDA tensor
            return None
        return (kind, x.data_ptr(), q.data_ptr(), scales.data_ptr(), current_raw_stream(index), _current_device())
    except Exception:   # exotic tensors whose pointers cannot be read
        return None


def _cached_launch(kind: str, x, q, scales) -> bool:
    """Launch the cached cast for exactly these tensors (pointers, layouts, stream, device);
    False when there is none."""
    global launch_count
    key = _launch_key(kind, x, q, scales)
    prepared = _launches.find(key, (x, q, scales)) if key is not None else None
    if prepared is None:
        return False
    prepared.fire()
    launch_count += 1
    return True


def _launch(kind: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, num_rows: int,
            grid: int, tail) -> None:
    global launch_count
    if grid > _INT32_MAX:
        raise ValueError(f"x is too large for one cast launch ({grid} thread blocks)")
    rows, row_stride = _row_layout(x)
    k = rows.shape[-1]
    ptr = rows.data_ptr()
    # 16-byte accesses need every row of x (and of q, K bytes long) to start 16-byte aligned.
    elem = rows.element_size()
    vec = k % 16 == 0 and ptr % 16 == 0 and (num_rows <= 1 or row_stride * elem % 16 == 0)
    device_index = rows.device.index
    kernel = _loaded.get((kind, k, _DTYPE_NAMES[rows.dtype], vec, device_index))
    if kernel is None:
        kernel = cast_kernel(CastConfig(kind, k, _DTYPE_NAMES[rows.dtype], vec), device_index)
    stream = current_raw_stream(device_index)
    on_device = _current_device() == device_index
    key = _launch_key(kind, x, q, scales) if rows is x and on_device else None
    # A cast seen for the second time gets a cached launch (building one costs ~7 µs more than
    # this plain launch, which a cast of never-repeating buffers would pay on every call).
    if key is not None and _seen_once.pop(key, False):
        params = _PARAM_STRUCTS[kind].pack(ptr, q.data_ptr(), scales.data_ptr(), row_stride, *tail)
        prepared = PreparedLaunch(kernel, grid, params, _PARAM_OFFSETS[kind], stream, device_index)
        prepared.fire()
        _launches.put(key, (x, q, scales), prepared)
    else:
        if key is not None:
            if len(_seen_once) >= _SEEN_ONCE_SIZE:
                _seen_once.clear()
            _seen_once[key] = True
        pack = kernel.args()
        buffers = pack.buffers
        buffers[0].value = ptr
        buffers[1].value = q.data_ptr()
        buffers[2].value = scales.data_ptr()
        buffers[3].value = row_stride
        for i, value in enumerate(tail):
            buffers[4 + i].value = value
        if on_device:
            kernel.launch(grid, stream, pack)
        else:   # the module lives in that device's context
            with torch.cuda.device(device_index):
                kernel.launch(grid, stream, pack)
    launch_count += 1


def _check_input(x) -> None:
    reference._check_cast_input(x, "x")      # the reference's own errors, word for word
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor for the GPU cast, got device {x.device}")


def _check_output(name: str, t, dtype, shape, strides=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if strides is None:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    elif any(size > 1 and st != want for size, st, want in zip(t.shape, t.stride(), strides)):
        raise ValueError(f"{name} must have strides {tuple(strides)} (the column-major TMA-aligned "
                         f"layout), got {t.stride()}")


def _new_q(x: torch.Tensor) -> torch.Tensor:
    # empty_like is about twice as fast as empty(shape); it copies x's layout, so only when x is
    # contiguous (q must be).
    if x.is_contiguous():
        return torch.empty_like(x, dtype=_FP8)
    return torch.empty(x.shape, dtype=_FP8, device=x.device)


# ---- per-token (1x128) ------------------------------------------------------------------------
def _token_geometry(x: torch.Tensor):
    groups = x.shape[0] if x.dim() == 3 else 1
    m, k = x.shape[-2], x.shape[-1]
    kb = (k + BLOCK - 1) // BLOCK
    aligned_m = (m + 3) // 4 * 4
    return groups, m, k, kb, aligned_m


def _token_scale_layout(x: torch.Tensor):
    """Shape and strides of x's per-token scales: [..., M, ceil(K/128)] float32, K-block columns
    aligned_m floats apart (the column-major TMA-aligned layout the GEMMs read)."""
    groups, m, k, kb, aligned_m = _token_geometry(x)
    if x.dim() == 2:
        return (m, kb), (1, aligned_m)
    return (groups, m, kb), (kb * aligned_m, 1, aligned_m)


def _check_into(x: torch.Tensor, q, scales, scale_shape, scale_strides=None) -> None:
    """The *_cast_into outputs: q e4m3 with x's shape (contiguous), scales float32 of
    scale_shape (contiguous, or with scale_strides), both on x's device."""
    _check_output("q", q, _FP8, x.shape)
    _check_output("scales", scales, torch.float32, scale_shape, scale_strides)
    for name, t in (("q", q), ("scales", scales)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")


def per_token_cast_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Cast x [M, K] / [G, M, K] into preallocated q (e4m3, x's shape, contiguous) and scales
    (float32 [..., M, ceil(K/128)] in the column-major TMA-aligned layout)."""
    if _cached_launch(PER_TOKEN, x, q, scales):   # the same tensors as a call that passed the checks
        return
    _check_input(x)
    _check_into(x, q, scales, *_token_scale_layout(x))
    _per_token_launch(x, q, scales)


def _per_token_launch(x, q, scales) -> None:
    groups, m, k, kb, aligned_m = _token_geometry(x)
    if x.numel() == 0:
        return
    units_per_cta = PER_TOKEN_THREADS // 8        # 8 lanes per (row, k-block) unit
    ctas_per_group = (m * kb + units_per_cta - 1) // units_per_cta
    if ctas_per_group * units_per_cta > _INT32_MAX:
        raise ValueError(f"x has too many rows for the cast kernel: shape {tuple(x.shape)}")
    _launch(PER_TOKEN, x, q, scales, groups * m, groups * ctas_per_group, (m, aligned_m, ctas_per_group))


def per_token_cast_to_fp8(x: torch.Tensor):
    """GPU per_token_cast_to_fp8 (see deep_gemm.reference for the semantics)."""
    _check_input(x)
    if x.numel() == 0:
        return reference.per_token_cast_to_fp8(x)
    # One allocation; the storage stops after row m of the last column: nothing reads past it.
    shape, strides = _token_scale_layout(x)
    scales = torch.empty_strided(shape, strides, dtype=torch.float32, device=x.device)
    q = _new_q(x)
    if not _cached_launch(PER_TOKEN, x, q, scales):
        _per_token_launch(x, q, scales)
    return q, scales


# ---- per-block (128x128) ----------------------------------------------------------------------
def _block_geometry(x: torch.Tensor):
    groups = x.shape[0] if x.dim() == 3 else 1
    n, k = x.shape[-2], x.shape[-1]
    return groups, n, k, (n + BLOCK - 1) // BLOCK, (k + BLOCK - 1) // BLOCK


def _block_scale_shape(x: torch.Tensor) -> tuple:
    """[..., ceil(N/128), ceil(K/128)]: one float32 scale per 128x128 block of x (contiguous)."""
    groups, n, k, nb, kb = _block_geometry(x)
    return ((groups,) if x.dim() == 3 else ()) + (nb, kb)


def per_block_cast_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Cast x [N, K] / [G, N, K] into preallocated q (e4m3, x's shape, contiguous) and scales
    (float32 [..., ceil(N/128), ceil(K/128)], contiguous)."""
    if _cached_launch(PER_BLOCK, x, q, scales):
        return
    _check_input(x)
    _check_into(x, q, scales, _block_scale_shape(x))
    _per_block_launch(x, q, scales)


def _per_block_launch(x, q, scales) -> None:
    groups, n, k, nb, kb = _block_geometry(x)
    if x.numel() == 0:
        return
    if n > _INT32_MAX or nb * kb > _INT32_MAX:
        raise ValueError(f"x is too large for the cast kernel: shape {tuple(x.shape)}")
    _launch(PER_BLOCK, x, q, scales, groups * n, groups * nb * kb, (n, nb))


def per_block_cast_to_fp8(x: torch.Tensor):
    """GPU per_block_cast_to_fp8 (see deep_gemm.reference for the semantics)."""
    _check_input(x)
    if x.numel() == 0:
        return reference.per_block_cast_to_fp8(x)
    q = _new_q(x)
    scales = torch.empty(_block_scale_shape(x), dtype=torch.float32, device=x.device)
    if not _cached_launch(PER_BLOCK, x, q, scales):
        _per_block_launch(x, q, scales)
    return q, scales
