"""Argument checks for the public GEMMs, run on every call before anything touches the GPU.

Every bad input raises TypeError (wrong kind or dtype) or ValueError (wrong shape, layout,
device or alignment) naming the argument (`lhs[0]`, `rhs[1]`, `out`, ...) and what was
expected; nothing relies on `assert`, so `python -O` behaves the same.

The checks sit on the per-call hot path: they read each tensor's shape/stride/pointer once,
build no tensors on the happy path and keep arithmetic inline (a few microseconds in all).
The tensors handed back are the ones the kernels may use as they are: A and B with 16-byte
aligned rows, sa in the column-major TMA-aligned layout, out allocated when None.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .utils import get_col_major_tma_aligned_tensor, get_tma_aligned_size, is_col_major_tma_aligned

_FP8 = torch.float8_e4m3fn
_F32 = torch.float32
_BF16 = torch.bfloat16
_I32 = torch.int32
_Tensor = torch.Tensor


class DenseArgs(NamedTuple):
    a: torch.Tensor          # e4m3 [M, K], rows 16-byte aligned
    sa: torch.Tensor         # float32 [M, KB], column-major TMA-aligned
    b: torch.Tensor          # e4m3 [N, K], rows 16-byte aligned
    sb: torch.Tensor         # float32 [NB, KB], contiguous
    out: torch.Tensor        # bf16 [M, N], rows 16-byte aligned
    m: int
    n: int
    k: int


class ContiguousArgs(NamedTuple):
    a: torch.Tensor          # e4m3 [M, K]
    sa: torch.Tensor         # float32 [M, KB], column-major TMA-aligned
    b: torch.Tensor          # e4m3 [G, N, K]
    sb: torch.Tensor         # float32 [G, NB, KB], contiguous
    out: torch.Tensor        # bf16 [M, N]
    m_indices: torch.Tensor  # int32 [M], contiguous
    m: int
    n: int
    k: int
    num_groups: int


class MaskedArgs(NamedTuple):
    a: torch.Tensor          # e4m3 [G, max_m, K]
    sa: torch.Tensor         # float32 [G, max_m, KB], column-major TMA-aligned per group
    b: torch.Tensor          # e4m3 [G, N, K]
    sb: torch.Tensor         # float32 [G, NB, KB], contiguous
    out: torch.Tensor        # bf16 [G, max_m, N]
    masked_m: torch.Tensor   # int32 [G], contiguous, on the GPU
    expected_m: int
    num_groups: int
    max_m: int
    n: int
    k: int


# ---------------------------------------------------------------------------------------------
# Building blocks (each reads what it needs from one tensor once).
# ---------------------------------------------------------------------------------------------
_KB_CACHE: dict = {}


def _num_blocks(x: int) -> int:
    """ceil(x / 128), memoised: the same K and N come back on every call."""
    v = _KB_CACHE.get(x)
    if v is None:
        v = _KB_CACHE[x] = (x + 127) // 128
    return v


def _unpack(pair, name: str):
    if not isinstance(pair, (tuple, list)):
        raise TypeError(f"{name} must be a (tensor, scales) pair, got {type(pair).__name__}")
    if len(pair) != 2:
        raise TypeError(f"{name} must be a (tensor, scales) pair, got {len(pair)} items")
    x, s = pair
    if not isinstance(x, _Tensor):
        raise TypeError(f"{name}[0] must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(s, _Tensor):
        raise TypeError(f"{name}[1] must be a torch.Tensor, got {type(s).__name__}")
    if x.dtype != _FP8:
        raise TypeError(f"{name}[0] must be torch.float8_e4m3fn, got {x.dtype}")
    if s.dtype != _F32:
        raise TypeError(f"{name}[1] must be torch.float32 scales, got {s.dtype}")
    return x, s


def _shape(x: torch.Tensor, ndim: int, name: str, what: str):
    shape = x.shape
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(shape)}")
    return shape


def _check_ptr(x: torch.Tensor, name: str) -> None:
    if x.data_ptr() & 15:
        raise ValueError(f"{name} must start at a 16-byte aligned address (TMA requirement), got "
                         f"0x{x.data_ptr():x} ({x.storage_offset()} elements into its storage): "
                         f"pass a .clone()")


def _rows_ok(x: torch.Tensor, elem_bytes: int, name: str) -> torch.Tensor:
    """Check x's innermost dimension is dense and every outer stride is a positive multiple of
    16 bytes: TMA addresses rows (and groups) through such strides.

    A dimension of size <= 1 never uses its stride, but torch may report any value for it
    (e.g. a [1, K] slice keeps stride K); such strides are rewritten to the values of a dense,
    aligned tensor (as_strided on the same storage, no copy) so that the kernel may trust them all.
    """
    stride = x.stride()
    ndim = len(stride)
    # Fast path: the common dense, aligned layouts.
    if ndim == 2:
        s0, s1 = stride
        if s1 == 1 and s0 > 0 and not (s0 * elem_bytes) & 15:
            return x
    elif ndim == 3:
        s0, s1, s2 = stride
        if s2 == 1 and s1 > 0 and s0 > 0 and not (s1 * elem_bytes) & 15 and not (s0 * elem_bytes) & 15:
            return x
    shape = x.shape
    if stride[-1] != 1 and shape[-1] > 1:
        raise ValueError(f"{name} must have contiguous rows (stride(-1) == 1), got strides {stride}")
    fixed = None
    for d in range(ndim - 2, -1, -1):
        s = stride[d]
        if s > 0 and (s * elem_bytes) % 16 == 0:
            continue
        if shape[d] > 1:
            raise ValueError(
                f"{name} has stride {s} on dimension {d} ({s * elem_bytes} bytes) but TMA needs "
                f"16-byte aligned rows: every stride but the last must be a positive multiple of "
                f"16 bytes ({16 // elem_bytes} elements); pass a contiguous tensor whose last "
                f"dimension is a multiple of {16 // elem_bytes}, or pad it")
        if fixed is None:
            fixed = list(stride)
        if d == ndim - 2:
            fixed[d] = max(1, -(-shape[-1] * elem_bytes // 16)) * 16 // elem_bytes
        else:
            fixed[d] = fixed[d + 1] * max(1, shape[d + 1])
    if stride[-1] != 1:
        fixed = fixed or list(stride)
    if fixed is not None:
        fixed[-1] = 1
        x = x.as_strided(tuple(shape), tuple(fixed))
    return x


def _scales_a(sa: torch.Tensor, lead: tuple, kb: int, name: str) -> torch.Tensor:
    """sa: [*lead, M, KB], row-major contiguous or column-major TMA-aligned -> the latter."""
    shape = sa.shape
    if shape != lead + (kb,):
        raise ValueError(f"{name} must have shape {lead + (kb,)} (one scale per row and 128-wide "
                         f"K block), got {tuple(shape)}")
    if is_col_major_tma_aligned(sa):
        _check_ptr(sa, name)
        return sa
    if not sa.is_contiguous():
        stride = sa.stride()
        aligned_m = get_tma_aligned_size(lead[-1], 4)
        if len(shape) == 2:
            want = f"(1, {aligned_m})"
        else:
            want = f"({aligned_m * kb}, 1, {aligned_m})"
        raise ValueError(
            f"{name} has strides {stride}; accepted layouts are row-major contiguous, or "
            f"column-major TMA-aligned with strides {want} "
            f"(deep_gemm.get_col_major_tma_aligned_tensor builds it)")
    # Row-major: transpose once into the layout the kernel loads (one small copy kernel).
    return get_col_major_tma_aligned_tensor(sa)


def _scales_b(sb: torch.Tensor, want: tuple, name: str) -> None:
    if sb.shape != want:
        raise ValueError(f"{name} must have shape {want} (one scale per 128x128 block), got {tuple(sb.shape)}")
    if not sb.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {sb.stride()}")
    _check_ptr(sb, name)


def _same_device(device: torch.device, tensors, names) -> None:
    for t, name in zip(tensors, names):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but lhs[0] is on {device}: all tensors must share one device")


def _check_out(out, want: tuple, device: torch.device, staged_ok: bool = False) -> torch.Tensor:
    """Check a caller's output.  staged_ok: the op can write through an aligned
    staging buffer, so any row stride (and address) of a row-contiguous out is fine."""
    if not isinstance(out, _Tensor):
        raise TypeError(f"out must be a torch.Tensor (or None where allowed), got {type(out).__name__}")
    if out.dtype != _BF16:
        raise TypeError(f"out must be torch.bfloat16, got {out.dtype}")
    if out.shape != want:
        raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but lhs[0] is on {device}: all tensors must share one device")
    if staged_ok and len(want) == 2 and (out.stride(-1) == 1 or want[-1] <= 1) and out.stride(0) >= 0:
        return out
    out = _rows_ok(out, 2, "out")
    _check_ptr(out, "out")
    return out


def _check_k(k: int, n: int) -> None:
    if k < 1:
        raise ValueError(f"lhs[0] must have K >= 1 columns, got K = {k}")
    if n < 1:
        raise ValueError(f"rhs[0] must have N >= 1 rows, got N = {n}")


def _alloc_out(shape: tuple, device: torch.device) -> torch.Tensor:
    n = shape[-1]
    padded = -(-n // 8) * 8
    if padded == n:
        return torch.empty(shape, dtype=_BF16, device=device)
    # Rows of n bf16 would break TMA's 16-byte stride rule: pad the row, hand back a view.
    return torch.empty(shape[:-1] + (padded,), dtype=_BF16, device=device)[..., :n]


# ---------------------------------------------------------------------------------------------
# Public checks, one per GEMM family.
# ---------------------------------------------------------------------------------------------
def check_dense(lhs, rhs, out: Optional[torch.Tensor] = None) -> DenseArgs:
    """Validate gemm_fp8_fp8_bf16_nt's arguments; returns kernel-ready tensors and sizes."""
    fast = _dense_fast(lhs, rhs, out)
    if fast is not None:
        return fast
    return _dense_full(lhs, rhs, out)


def _plain_operands(lhs, rhs):
    """(a, sa, b, sb) when lhs and rhs are 2-tuples of plain tensors with the kernel's dtypes
    (e4m3 data, float32 scales); None otherwise. The fast paths' common first step."""
    if type(lhs) is not tuple or type(rhs) is not tuple or len(lhs) != 2 or len(rhs) != 2:
        return None
    a, sa = lhs
    b, sb = rhs
    T = _Tensor
    if type(a) is not T or type(sa) is not T or type(b) is not T or type(sb) is not T:
        return None
    if a.dtype is not _FP8 or b.dtype is not _FP8 or sa.dtype is not _F32 or sb.dtype is not _F32:
        return None
    return a, sa, b, sb


def _plain_out_and_index(out, index) -> bool:
    """The grouped fast paths' out (bf16) and index tensor (int32) are plain tensors."""
    T = _Tensor
    return type(out) is T and type(index) is T and out.dtype is _BF16 and index.dtype is _I32


def _dense_fast(lhs, rhs, out):
    """The steady-state call in one pass: plain tensors, dense aligned layouts, sa already
    column-major. Returns None at the first doubt; _dense_full then decides (and names the
    culprit). It accepts only a subset of what _dense_full accepts, so it can never let
    through an input the full check would reject.
    """
    operands = _plain_operands(lhs, rhs)
    if operands is None:
        return None
    a, sa, b, sb = operands
    a_shape = a.shape
    b_shape = b.shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        return None
    m, k = a_shape
    n, k_b = b_shape
    if k_b != k or k < 1 or n < 1 or m < 2:
        return None
    kb = _KB_CACHE.get(k) or _num_blocks(k)
    nb = _KB_CACHE.get(n) or _num_blocks(n)
    device = a.device
    if sa.device != device or b.device != device or sb.device != device:
        return None
    # Shapes before strides: unpacking the strides of a tensor of another rank would raise.
    if sa.shape != (m, kb) or sb.shape != (nb, kb):
        return None
    a0, a1 = a.stride()
    b0, b1 = b.stride()
    s0, s1 = sa.stride()
    if (a1 != 1 or b1 != 1 or a0 <= 0 or b0 <= 0 or (a0 | b0) & 15
            or s0 != 1 or (s1 != ((m + 3) & ~3) and kb > 1) or not sb.is_contiguous()
            or (a.data_ptr() | b.data_ptr() | sa.data_ptr() | sb.data_ptr()) & 15):
        return None
    if out is None:
        if n & 7:
            return None
        out = torch.empty((m, n), dtype=_BF16, device=device)
    else:
        if type(out) is not _Tensor or out.dtype is not _BF16 or out.shape != (m, n) or out.device != device:
            return None
        o0, o1 = out.stride()
        if o1 != 1 or o0 <= 0 or (o0 * 2) & 15 or out.data_ptr() & 15:
            return None
    return DenseArgs(a, sa, b, sb, out, m, n, k)


def _dense_full(lhs, rhs, out) -> DenseArgs:
    a, sa = _unpack(lhs, "lhs")
    b, sb = _unpack(rhs, "rhs")
    m, k = _shape(a, 2, "lhs[0]", "[M, K]")
    n, kb_ = _shape(b, 2, "rhs[0]", "[N, K]")
    if kb_ != k:
        raise ValueError(f"rhs[0] must have K = {k} columns like lhs[0], got shape {tuple(b.shape)}")
    _check_k(k, n)
    kb = _num_blocks(k)
    device = a.device
    _same_device(device, (sa, b, sb), ("lhs[1]", "rhs[0]", "rhs[1]"))
    a = _rows_ok(a, 1, "lhs[0]")
    b = _rows_ok(b, 1, "rhs[0]")
    _check_ptr(a, "lhs[0]")
    _check_ptr(b, "rhs[0]")
    sa = _scales_a(sa, (m,), kb, "lhs[1]")
    _scales_b(sb, (_num_blocks(n), kb), "rhs[1]")
    if out is None:
        out = _alloc_out((m, n), device)
    else:
        out = _check_out(out, (m, n), device, staged_ok=True)
    return DenseArgs(a, sa, b, sb, out, m, n, k)


def _check_index(t, name: str, want_len: int, device: torch.device, what: str) -> None:
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != _I32:
        raise TypeError(f"{name} must be torch.int32, got {t.dtype}")
    if t.shape != (want_len,):
        raise ValueError(f"{name} must have shape ({want_len},) ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but lhs[0] is on {device}: all tensors must share one device")
    if want_len > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _check_grouped_b(b: torch.Tensor, sb: torch.Tensor, k: int, kb: int, device):
    g, n, kb_ = _shape(b, 3, "rhs[0]", "[G, N, K]")
    if kb_ != k:
        raise ValueError(f"rhs[0] must have K = {k} columns like lhs[0], got shape {tuple(b.shape)}")
    if g < 1:
        raise ValueError(f"rhs[0] must hold at least one group, got shape {tuple(b.shape)}")
    _check_k(k, n)
    _same_device(device, (b, sb), ("rhs[0]", "rhs[1]"))
    b = _rows_ok(b, 1, "rhs[0]")
    _check_ptr(b, "rhs[0]")
    _scales_b(sb, (g, _num_blocks(n), kb), "rhs[1]")
    return b, g, n


def check_contiguous(lhs, rhs, out, m_indices) -> ContiguousArgs:
    """Validate m_grouped_gemm_fp8_fp8_bf16_nt_contiguous's arguments (out is required)."""
    fast = _contiguous_fast(lhs, rhs, out, m_indices)
    if fast is not None:
        return fast
    return _contiguous_full(lhs, rhs, out, m_indices)


def _contiguous_fast(lhs, rhs, out, m_indices):
    """check_contiguous's steady-state call in one pass, like _dense_fast: plain tensors, dense
    aligned layouts, sa already column-major, M >= 2 (so that no stride of a size-1 dimension
    needs rewriting). None at the first doubt; it accepts a subset of what _contiguous_full
    accepts and then returns exactly what _contiguous_full would.
    """
    operands = _plain_operands(lhs, rhs)
    if operands is None or not _plain_out_and_index(out, m_indices):
        return None
    a, sa, b, sb = operands
    a_shape = a.shape
    b_shape = b.shape
    if len(a_shape) != 2 or len(b_shape) != 3:
        return None
    m, k = a_shape
    g, n, k_b = b_shape
    if k_b != k or k < 1 or n < 1 or g < 1 or m < 2:
        return None
    kb = _KB_CACHE.get(k) or _num_blocks(k)
    nb = _KB_CACHE.get(n) or _num_blocks(n)
    device = a.device
    if (sa.device != device or b.device != device or sb.device != device or out.device != device
            or m_indices.device != device):
        return None
    # Shapes before strides: unpacking the strides of a tensor of another rank would raise.
    if sa.shape != (m, kb) or sb.shape != (g, nb, kb) or out.shape != (m, n) or m_indices.shape != (m,):
        return None
    a0, a1 = a.stride()
    b0, b1, b2 = b.stride()
    s0, s1 = sa.stride()
    o0, o1 = out.stride()
    if (a1 != 1 or a0 <= 0 or a0 & 15
            or b2 != 1 or b1 <= 0 or b0 <= 0 or (b1 | b0) & 15
            or s0 != 1 or (s1 != ((m + 3) & ~3) and kb > 1) or not sb.is_contiguous()
            or o1 != 1 or o0 <= 0 or (o0 * 2) & 15 or m_indices.stride(0) != 1
            or (a.data_ptr() | b.data_ptr() | sa.data_ptr() | sb.data_ptr() | out.data_ptr()) & 15):
        return None
    return ContiguousArgs(a, sa, b, sb, out, m_indices, m, n, k, g)


def _contiguous_full(lhs, rhs, out, m_indices) -> ContiguousArgs:
    a, sa = _unpack(lhs, "lhs")
    b, sb = _unpack(rhs, "rhs")
    m, k = _shape(a, 2, "lhs[0]", "[M, K]")
    kb = _num_blocks(max(k, 1))
    device = a.device
    b, g, n = _check_grouped_b(b, sb, k, kb, device)
    _same_device(device, (sa,), ("lhs[1]",))
    a = _rows_ok(a, 1, "lhs[0]")
    _check_ptr(a, "lhs[0]")
    sa = _scales_a(sa, (m,), kb, "lhs[1]")
    _check_index(m_indices, "m_indices", m, device, "the group of each row of lhs[0], -1 for padding")
    out = _check_out(out, (m, n), device)
    return ContiguousArgs(a, sa, b, sb, out, m_indices, m, n, k, g)


def check_masked(lhs, rhs, out, masked_m, expected_m) -> MaskedArgs:
    """Validate m_grouped_gemm_fp8_fp8_bf16_nt_masked's arguments (out is required)."""
    fast = _masked_fast(lhs, rhs, out, masked_m, expected_m)
    if fast is not None:
        return fast
    return _masked_full(lhs, rhs, out, masked_m, expected_m)


def _masked_fast(lhs, rhs, out, masked_m, expected_m):
    """check_masked's steady-state call in one pass (see _contiguous_fast): plain tensors, dense
    aligned layouts, sa column-major per group, max_m >= 2, expected_m a positive int. None at
    the first doubt; otherwise exactly what _masked_full returns.
    """
    if type(expected_m) is not int or expected_m < 1:
        return None
    operands = _plain_operands(lhs, rhs)
    if operands is None or not _plain_out_and_index(out, masked_m):
        return None
    a, sa, b, sb = operands
    a_shape = a.shape
    b_shape = b.shape
    if len(a_shape) != 3 or len(b_shape) != 3:
        return None
    g, max_m, k = a_shape
    g_b, n, k_b = b_shape
    if g_b != g or k_b != k or k < 1 or n < 1 or g < 1 or max_m < 2:
        return None
    kb = _KB_CACHE.get(k) or _num_blocks(k)
    nb = _KB_CACHE.get(n) or _num_blocks(n)
    device = a.device
    if (sa.device != device or b.device != device or sb.device != device or out.device != device
            or masked_m.device != device):
        return None
    # Shapes before strides: unpacking the strides of a tensor of another rank would raise.
    if (sa.shape != (g, max_m, kb) or sb.shape != (g, nb, kb) or out.shape != (g, max_m, n)
            or masked_m.shape != (g,)):
        return None
    a0, a1, a2 = a.stride()
    b0, b1, b2 = b.stride()
    s0, s1, s2 = sa.stride()
    o0, o1, o2 = out.stride()
    aligned_m = (max_m + 3) & ~3
    if (a2 != 1 or a1 <= 0 or a0 <= 0 or (a1 | a0) & 15
            or b2 != 1 or b1 <= 0 or b0 <= 0 or (b1 | b0) & 15
            or s1 != 1 or (s2 != aligned_m and kb > 1) or (s0 != aligned_m * kb and g > 1)
            or not sb.is_contiguous()
            or o2 != 1 or o1 <= 0 or o0 <= 0 or ((o1 | o0) * 2) & 15
            or (g > 1 and masked_m.stride(0) != 1)
            or (a.data_ptr() | b.data_ptr() | sa.data_ptr() | sb.data_ptr() | out.data_ptr()) & 15):
        return None
    return MaskedArgs(a, sa, b, sb, out, masked_m, expected_m, g, max_m, n, k)


def _masked_full(lhs, rhs, out, masked_m, expected_m) -> MaskedArgs:
    a, sa = _unpack(lhs, "lhs")
    b, sb = _unpack(rhs, "rhs")
    g_a, max_m, k = _shape(a, 3, "lhs[0]", "[G, max_m, K]")
    kb = _num_blocks(max(k, 1))
    device = a.device
    b, g, n = _check_grouped_b(b, sb, k, kb, device)
    if g_a != g:
        raise ValueError(f"lhs[0] must have G = {g} groups like rhs[0], got shape {tuple(a.shape)}")
    _same_device(device, (sa,), ("lhs[1]",))
    a = _rows_ok(a, 1, "lhs[0]")
    _check_ptr(a, "lhs[0]")
    sa = _scales_a(sa, (g, max_m), kb, "lhs[1]")
    _check_index(masked_m, "masked_m", g, device, "valid rows of each group")
    if isinstance(expected_m, bool) or not isinstance(expected_m, int):
        raise TypeError(f"expected_m must be a Python int (a host-side hint), got {type(expected_m).__name__}")
    if expected_m < 1:
        raise ValueError(f"expected_m must be a positive int, got {expected_m}")
    out = _check_out(out, (g, max_m, n), device)
    return MaskedArgs(a, sa, b, sb, out, masked_m, expected_m, g, max_m, n, k)
