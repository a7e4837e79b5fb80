"""FP8 casts: cached launch, or validate -> allocate -> load the kernel -> launch -> cache.

On a Hopper GPU the kernels of kernels/cast.cuh run, bit-identical to deep_gemm.reference run on the
same CUDA tensor; anywhere else the reference runs. A cast of the same x into outputs at the same
addresses on the same stream is one lookup, one layout guard and one launch, as for the GEMMs; a
cast of tensors at other addresses with a layout cast before binds that launch's template to them
(runtime/launch.LaunchCache).

The casts that allocate their outputs make both in one allocation (FreshOutputs): the CUDA caching
allocator's malloc and free cost a call far more than cutting two views from one block. An x whose
layout (shape, dtype, device; strides and group sizes for the transposed casts) passed validation
before has its outputs' layout looked up instead of validated and worked out again.
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
from ..runtime.launch import PLAIN_TENSOR_TYPES, LaunchCache, PreparedLaunch, current_raw_stream
from ..utils import ints_only
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


def _fire_cached(x, q, scales, extra) -> tuple:
    """(fired, key): the launch cached for these tensors, or their layout's template, fired."""
    global launch_count
    fired, key = _launches.try_fire((x, q, scales), extra)
    launch_count += fired
    return fired, key


def _cached(kind: str, x, q, scales):
    """(hit, key, tensors): fires the launch cached for these tensors if there is one (hit)."""
    flat = (x, q, scales)
    if not (isinstance(x, torch.Tensor) and _on_cuda(x)):   # (the current device is asked of CUDA only)
        return False, None, flat
    fired, key = _fire_cached(x, q, scales, (kind, _current_device()))
    return fired, key, flat


# ---- outputs of the allocating casts ------------------------------------------------------------
# The scales start at the first multiple of this many bytes past q (TMA reads them 16-byte aligned).
SCALES_ALIGNMENT = 256
MAX_FRESH_LAYOUTS = 1024


class FreshOutputs:
    """The outputs of an allocating cast of one layout of x: q's and the scales' shapes and strides,
    exactly those the cast documents (and gave when it allocated each apart), and where each sits in
    one float32 allocation: q at its start, the scales' block (every TMA-aligned column whole, as
    get_col_major_tma_aligned_tensor allocates it) at the next SCALES_ALIGNMENT-byte boundary. The
    two never overlap."""

    __slots__ = ("device", "sizes", "empty", "words", "q_shape", "q_strides", "s_shape", "s_strides", "s_words",
                 "s_start", "s_offset")

    def __init__(self, q_meta: torch.Tensor, s_meta: torch.Tensor, device: torch.device, sizes=None):
        self.device = device
        self.sizes = sizes                 # the transposed casts' validated group sizes
        self.empty = q_meta.numel() == 0   # nothing to launch
        # (tuples: as_strided parses them faster than a torch.Size)
        self.q_shape, self.q_strides = tuple(q_meta.shape), q_meta.stride()
        self.s_shape, self.s_strides = tuple(s_meta.shape), s_meta.stride()
        # The block: the outermost dimension's reach (the padding of the last column included).
        block = max([size * stride for size, stride in zip(s_meta.shape, s_meta.stride())], default=1)
        s_bytes = max(s_meta.untyped_storage().nbytes(), 4 * block)
        start = -(-q_meta.untyped_storage().nbytes() // SCALES_ALIGNMENT) * SCALES_ALIGNMENT
        self.s_words, self.s_start = s_bytes // 4, s_meta.storage_offset()
        self.s_offset = start // 4 + self.s_start
        self.words = (start + s_bytes + 3) // 4

    def with_sizes(self, sizes) -> "FreshOutputs":
        """These outputs for other group sizes of the same layout."""
        other = FreshOutputs.__new__(FreshOutputs)
        for name in FreshOutputs.__slots__:
            setattr(other, name, getattr(self, name))
        other.sizes = sizes
        return other

    def one_allocation(self):
        """(q, scales) as two views of one new allocation."""
        buffer = torch.empty(self.words, dtype=torch.float32, device=self.device)
        return (buffer.view(_FP8).as_strided(self.q_shape, self.q_strides),
                buffer.as_strided(self.s_shape, self.s_strides, self.s_offset))

    def apart(self):
        """(q, scales) in allocations of their own (a custom op's outputs may share no storage)."""
        q = torch.empty_strided(self.q_shape, self.q_strides, dtype=_FP8, device=self.device)
        storage = torch.empty(self.s_words, dtype=torch.float32, device=self.device)
        return q, storage.as_strided(self.s_shape, self.s_strides, self.s_start)


_fresh_layouts: dict = {}   # layout key of x (_fresh_key) -> FreshOutputs


def _fresh_key(kind: str, x, k_sizes=None):
    """What an allocating cast's validation and outputs depend on, for a plain CUDA tensor x (None
    for anything else, which is validated every call): x's shape, dtype and device, and for the
    transposed casts its strides (columns must be adjacent) and the group sizes (plain ints only,
    so that a bool never passes for a size)."""
    if type(x) not in PLAIN_TENSOR_TYPES or not _on_cuda(x):
        return None
    if kind == PER_TOKEN or kind == PER_BLOCK:
        return kind, x.shape, x.dtype, x.device
    if kind == _TRANSPOSED:
        return kind, x.shape, x.stride(), x.dtype, x.device
    if ints_only(k_sizes):
        return kind, x.shape, x.stride(), x.dtype, x.device, tuple(k_sizes)
    return None


def _remember_fresh(key, outputs: FreshOutputs) -> None:
    if key is None:
        return
    if len(_fresh_layouts) >= MAX_FRESH_LAYOUTS:
        _fresh_layouts.clear()   # forgetting costs each layout one more validation
    _fresh_layouts[key] = outputs


# ---- per-token and per-block casts ---------------------------------------------------------------
def _cast(kind: str, x, separate: bool = False):
    """The cast of x into new outputs (one allocation unless `separate`); returns them."""
    key = _fresh_key(kind, x)
    outputs = _fresh_layouts.get(key) if key is not None else None
    if outputs is None:
        outputs = _validated_outputs(kind, x)
        if outputs is None:
            return (reference.per_token_cast_to_fp8 if kind == PER_TOKEN else reference.per_block_cast_to_fp8)(x)
        _remember_fresh(key, outputs)
    q, scales = outputs.apart() if separate else outputs.one_allocation()
    if outputs.empty:
        return q, scales
    # torch's allocator tends to hand back the same block: then the launch cache hits.
    fired, launch_key = _fire_cached(x, q, scales, (kind, _current_device()))
    if not fired:
        _launch(kind, x, q, scales, launch_key, (x, q, scales))
    return q, scales


def _validated_outputs(kind: str, x):
    """x checked; the FreshOutputs of its cast on a Hopper GPU, None for the reference path."""
    reference.check_cast_input(x, "x")
    device = x.device   # (a new torch.device per read)
    if not (_on_cuda(x) and runs_on_hopper(device)):
        return None
    _, _, shape, strides = _geometry(kind, x)
    scales = (torch.empty_strided(shape, strides, dtype=torch.float32, device="meta") if strides
              else torch.empty(shape, dtype=torch.float32, device="meta"))
    return FreshOutputs(torch.empty(x.shape, dtype=_FP8, device="meta"), scales, device)


def _cast_into(kind: str, x, q, scales) -> None:
    """The cast of x into the given q and scales, on a Hopper GPU."""
    hit, key, flat = _cached(kind, x, q, scales)
    if hit:
        return
    reference.check_cast_input(x, "x")
    device = x.device   # (a new torch.device per read)
    if not (_on_cuda(x) and runs_on_hopper(device)):
        raise ValueError(f"x must be a CUDA tensor on a Hopper GPU for the cast into given outputs, got {device}")
    _, _, shape, strides = _geometry(kind, x)
    _check_output("q", q, _FP8, x.shape, None, device)
    _check_output("scales", scales, torch.float32, shape, strides, device)
    if x.numel():
        _launch(kind, x, q, scales, key, flat)


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


def per_token_cast_to_fp8(x: torch.Tensor, separate_outputs: bool = False):
    """[M, K] or [G, M, K] -> (e4m3 values, float32 scales per 1x128 block, column-major TMA-aligned).
    On a Hopper GPU the two are disjoint views of one allocation (freed once both are);
    separate_outputs=True gives each an allocation of its own (a custom op's outputs may share no
    storage)."""
    return _cast(PER_TOKEN, x, separate_outputs)


def per_block_cast_to_fp8(x: torch.Tensor, separate_outputs: bool = False):
    """[N, K] or [G, N, K] -> (e4m3 values, float32 scales per 128x128 block, row-major); one
    allocation or two as in per_token_cast_to_fp8."""
    return _cast(PER_BLOCK, x, separate_outputs)


def per_token_cast_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """per_token_cast_to_fp8 into preallocated q (e4m3, x's shape, contiguous) and scales (float32
    [..., M, ceil(K/128)] in the column-major TMA-aligned layout), on a Hopper GPU."""
    _cast_into(PER_TOKEN, x, q, scales)


def per_block_cast_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """per_block_cast_to_fp8 into preallocated q (e4m3, x's shape, contiguous) and scales (float32
    [..., ceil(N/128), ceil(K/128)], contiguous), on a Hopper GPU."""
    _cast_into(PER_BLOCK, x, q, scales)


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


def _scale_blocks(sizes) -> int:
    """Rows of a K-grouped cast's scales: each group's ceil(k_g / 128) 128-token blocks."""
    return sum(-(-k // BLOCK) for k in sizes)


def k_grouped_transposed_outputs(x: torch.Tensor, sizes):
    """Fresh (q [T * H], scales [sum of ceil(k_g/128), H]), both contiguous."""
    return _k_grouped_outputs(x, _scale_blocks(sizes))


def _k_grouped_outputs(x: torch.Tensor, blocks: int):
    t, h = x.shape
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
        blocks = _scale_blocks(sizes)
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
        return _transposed_extra(None)
    return _transposed_extra(tuple(k_sizes)) if ints_only(k_sizes) else None


def _transposed_extra(sizes) -> tuple:
    """The launch cache's extra values of a transposed cast: dense (sizes None) or K-grouped by `sizes`
    (a tuple of plain ints), on the current device."""
    if sizes is None:
        return (_TRANSPOSED, _current_device())
    return (_K_GROUPED_TRANSPOSED, sizes, _current_device())


def _cast_transposed(x, grouped: bool, k_sizes=None, separate: bool = False):
    """The transposed cast of x (dense, or K-grouped by k_sizes) into new outputs (one allocation unless
    `separate`); returns them."""
    kind = _K_GROUPED_TRANSPOSED if grouped else _TRANSPOSED
    key = _fresh_key(kind, x, k_sizes)
    outputs = _fresh_layouts.get(key) if key is not None else None
    if outputs is None:
        sizes = _checked_transposed(x, grouped, k_sizes)
        if not (_on_cuda(x) and runs_on_hopper(x.device)):
            return _transposed_reference(x, grouped, sizes)
        outputs = _transposed_outputs(x, grouped, sizes)
        _remember_fresh(key, outputs)
    q, scales = outputs.apart() if separate else outputs.one_allocation()
    if outputs.empty:
        return q, scales
    launch_key = None
    if key is not None:   # (the sizes in the layout key are plain ints)
        fired, launch_key = _fire_cached(x, q, scales, _transposed_extra(key[-1] if grouped else None))
        if fired:
            return q, scales
    _launch_transposed(x, q, scales, outputs.sizes, grouped, launch_key, (x, q, scales))
    return q, scales


def _checked_transposed(x, grouped: bool, k_sizes) -> list:
    """x and k_sizes checked; the groups' sizes (dense: one group of every row)."""
    reference.check_transposed_cast_input(x, "x")
    return reference.check_k_sizes(k_sizes, x.shape[0]) if grouped else [x.shape[0]]


def _check_gpu_rows(x) -> None:
    """The transposed kernels index tokens with 32-bit ints."""
    if x.shape[0] > _INT32_MAX:
        raise ValueError(f"x must have at most {_INT32_MAX} rows (tokens) on the GPU, got {x.shape[0]}")


def _transposed_reference(x, grouped: bool, sizes):
    fresh = k_grouped_transposed_outputs(x, sizes) if grouped else dense_transposed_outputs(x)
    got = (reference.k_grouped_per_token_cast_to_fp8_transposed(x, sizes) if grouped
           else reference.per_token_cast_to_fp8_transposed(x))
    return _into_layout(fresh, got)


def _transposed_outputs(x, grouped: bool, sizes) -> FreshOutputs:
    """The FreshOutputs of a checked x on a Hopper GPU."""
    _check_gpu_rows(x)
    blocks = _scale_blocks(sizes) if grouped else 0
    return _transposed_layout(grouped, x.shape[0], x.shape[1], blocks, x.device).with_sizes(sizes)


@lru_cache(maxsize=256)
def _transposed_layout(grouped: bool, t: int, h: int, blocks: int, device: torch.device) -> FreshOutputs:
    """The outputs' layout of a transposed cast of x [t, h] (K-grouped: into `blocks` K blocks), worked
    out on meta tensors once: a training step with new routing meets new group sizes every step, but
    few block counts."""
    meta = torch.empty((t, h), device="meta")
    q, scales = _k_grouped_outputs(meta, blocks) if grouped else dense_transposed_outputs(meta)
    return FreshOutputs(q, scales, device)


def _cast_transposed_into(x, grouped: bool, k_sizes, q, scales) -> None:
    """The transposed cast of x (dense, or K-grouped by k_sizes) into the given q and scales, on a Hopper GPU."""
    extra = _transposed_key_extra(x, grouped, k_sizes)
    key = None
    if extra is not None:
        fired, key = _fire_cached(x, q, scales, extra)
        if fired:
            return
    sizes = _checked_transposed(x, grouped, k_sizes)
    device = x.device
    if not (_on_cuda(x) and runs_on_hopper(device)):
        raise ValueError(f"x must be a CUDA tensor on a Hopper GPU for the cast into given outputs, got {device}")
    _check_gpu_rows(x)
    _check_transposed_outputs(x, q, scales, sizes, grouped)
    if x.numel():
        _launch_transposed(x, q, scales, sizes, grouped, key, (x, q, scales))


def per_token_cast_to_fp8_transposed(x: torch.Tensor, separate_outputs: bool = False):
    """x [T, H] -> per_token_cast_to_fp8(x.T) without materialising x.T: (q e4m3 [H, T] contiguous, scales float32
    [H, ceil(T/128)] in the column-major TMA-aligned layout); one allocation or two as in per_token_cast_to_fp8."""
    return _cast_transposed(x, False, None, separate_outputs)


def k_grouped_per_token_cast_to_fp8_transposed(x: torch.Tensor, k_sizes, separate_outputs: bool = False):
    """x [T, H] of G groups of k_sizes[g] rows (multiples of 16) -> (q e4m3 [T * H]: group after group x_g.T
    [H, k_g] row-major, per 1x128 along its tokens; scales float32 [sum of ceil(k_g/128), H] row-major); one
    allocation or two as in per_token_cast_to_fp8."""
    return _cast_transposed(x, True, k_sizes, separate_outputs)


def per_token_cast_transposed_into(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """per_token_cast_to_fp8_transposed into preallocated q (e4m3 [H, T], contiguous) and scales (float32
    [H, ceil(T/128)] in the column-major TMA-aligned layout), on a Hopper GPU."""
    _cast_transposed_into(x, False, None, q, scales)


def k_grouped_per_token_cast_transposed_into(x: torch.Tensor, k_sizes, q: torch.Tensor,
                                             scales: torch.Tensor) -> None:
    """k_grouped_per_token_cast_to_fp8_transposed into preallocated q (e4m3 [T * H]) and scales (float32
    [sum of ceil(k_g/128), H], contiguous), on a Hopper GPU."""
    _cast_transposed_into(x, True, k_sizes, q, scales)
