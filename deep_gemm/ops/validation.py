"""Argument checks for the GEMMs, one rule per kind of operand, composed per layout by check_gemm.

Every bad input raises TypeError (wrong kind or dtype) or ValueError (wrong shape, layout, device
or alignment) naming the argument (`lhs[0]`, `rhs[1]`, `out`, ...) and what was expected; nothing
relies on `assert`, so `python -O` behaves the same. The tensors handed back are the ones the
kernels may use as they are: A and B with 16-byte aligned rows, A's scales in the column-major
TMA-aligned layout, out allocated when None.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..config import K_GROUPED_DEVICE_MAX_GROUPS, K_GROUPED_MAX_GROUPS, Layout
from ..utils import get_col_major_tma_aligned_tensor, get_tma_aligned_size, is_col_major_tma_aligned

_FP8 = torch.float8_e4m3fn


class GemmArgs(NamedTuple):
    """A validated GEMM call. m: rows of A (dense, contiguous, K-grouped) or max_m (masked)."""
    layout: Layout
    a: torch.Tensor                 # e4m3 [M, K] or [G, max_m, K], rows 16-byte aligned; K-grouped: flat
    sa: torch.Tensor                # float32 [..., M, KB], column-major TMA-aligned (K-grouped: [M, sum KB])
    b: torch.Tensor                 # e4m3 [N, K] or [G, N, K]; K-grouped: flat
    sb: torch.Tensor                # float32 [..., NB, KB], contiguous; per-row: [N, KB] as sa
    out: torch.Tensor               # bf16 or fp32 [..., M, N] (a view of a padded buffer when allocated here)
    index: Optional[torch.Tensor]   # int32 m_indices [M] (contiguous) or masked_m [G] (masked)
    m: int
    n: int
    k: int                          # K-grouped: the largest group's K
    num_groups: int
    expected_m: int                 # masked: the planning hint; else m
    row_scales_b: bool = False      # sb per row and 128-K block (recipe (1, 1, 128))
    accumulate: bool = False        # out += A B^T (fp32 out)
    k_sizes: tuple = ()             # K-grouped: each group's K (a tuple, or an int32 tensor on the GPU)


# ---- one rule per kind of operand ------------------------------------------------------------------
def fp8_operand(pair, name: str, dims: int, what: str):
    """(x, scales) of an FP8 operand given as a (tensor, scales) pair, x of rank `dims`."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        got = f"{len(pair)} items" if isinstance(pair, (tuple, list)) else type(pair).__name__
        raise TypeError(f"{name} must be a (tensor, scales) pair, got {got}")
    x, s = pair
    for suffix, t in (("[0]", x), ("[1]", s)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}{suffix} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype != _FP8:
        raise TypeError(f"{name}[0] must be torch.float8_e4m3fn, got {x.dtype}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name}[1] must be torch.float32 scales, got {s.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name}[0] must be {dims}-D {what}, got shape {tuple(x.shape)}")
    return x, s


def tma_rows(x: torch.Tensor, elem_bytes: int, name: str) -> torch.Tensor:
    """x with a dense innermost dimension, every outer stride a positive multiple of 16 bytes and a
    16-byte aligned start, as TMA addresses it. A dimension of size <= 1 never uses its stride,
    but torch may report any value for it: such strides are rewritten to those of a dense tensor
    (a view of the same storage, no copy)."""
    shape, stride = x.shape, x.stride()
    if stride[-1] != 1 and shape[-1] > 1:
        raise ValueError(f"{name} must have contiguous rows (stride(-1) == 1), got strides {stride}")
    fixed = list(stride)
    fixed[-1] = 1
    for d in range(x.dim() - 2, -1, -1):
        s = stride[d]
        if s > 0 and (s * elem_bytes) % 16 == 0:
            continue
        if shape[d] > 1:
            raise ValueError(
                f"{name} has stride {s} on dimension {d} ({s * elem_bytes} bytes) but TMA needs 16-byte aligned "
                f"rows: every stride but the last must be a positive multiple of 16 bytes ({16 // elem_bytes} "
                f"elements); pass a contiguous tensor whose last dimension is a multiple of {16 // elem_bytes}, "
                f"or pad it")
        fixed[d] = (get_tma_aligned_size(max(shape[-1], 1), elem_bytes) if d == x.dim() - 2
                    else fixed[d + 1] * max(1, shape[d + 1]))
    if tuple(fixed) != stride:
        x = x.as_strided(tuple(shape), tuple(fixed))
    aligned_start(x, name)
    return x


def aligned_start(x: torch.Tensor, name: str) -> None:
    if x.data_ptr() % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address (TMA requirement), got "
                         f"0x{x.data_ptr():x} ({x.storage_offset()} elements into its storage): pass a .clone()")


def token_scales(sa: torch.Tensor, lead: tuple, kb: int, name: str) -> torch.Tensor:
    """A's scales [*lead, KB], one per row and 128-wide K block, row-major or column-major
    TMA-aligned: returned in the latter layout (a copy only for the former)."""
    if sa.shape != lead + (kb,):
        raise ValueError(f"{name} must have shape {lead + (kb,)} (one scale per row and 128-wide K block), "
                         f"got {tuple(sa.shape)}")
    if is_col_major_tma_aligned(sa):
        aligned_start(sa, name)
        return sa
    if not sa.is_contiguous():
        aligned_m = get_tma_aligned_size(lead[-1], 4)
        want = f"(1, {aligned_m})" if len(lead) == 1 else f"({aligned_m * kb}, 1, {aligned_m})"
        raise ValueError(f"{name} has strides {sa.stride()}; accepted layouts are row-major contiguous, or "
                         f"column-major TMA-aligned with strides {want} "
                         f"(deep_gemm.get_col_major_tma_aligned_tensor builds it)")
    return get_col_major_tma_aligned_tensor(sa)


def block_scales(sb: torch.Tensor, want: tuple, name: str) -> None:
    """B's scales, one per 128 x 128 block, row-major contiguous."""
    if sb.shape != want:
        raise ValueError(f"{name} must have shape {want} (one scale per 128x128 block), got {tuple(sb.shape)}")
    if not sb.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {sb.stride()}")
    aligned_start(sb, name)


def same_device(device: torch.device, named, first: str = "lhs[0]") -> None:
    for name, t in named:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all tensors must share one device")


def gemm_output(out, want: tuple, device: torch.device, staged_ok: bool, name: str = "out",
                first: str = "lhs[0]", fp32_ok: bool = False) -> torch.Tensor:
    """A caller's output: bf16 (or fp32 where fp32_ok). staged_ok: a bf16 call can write through an
    aligned staging buffer, so any row stride (and address) of a row-contiguous 2-D out is fine."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or None where allowed), got {type(out).__name__}")
    if out.dtype != torch.bfloat16 and not (fp32_ok and out.dtype == torch.float32):
        raise TypeError(f"{name} must be torch.bfloat16{' or torch.float32' if fp32_ok else ''}, got {out.dtype}")
    if out.shape != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(out.shape)}")
    same_device(device, ((name, out),), first)
    if out.dtype == torch.bfloat16 and staged_ok and len(want) == 2 and (out.stride(-1) == 1 or want[-1] <= 1) \
            and out.stride(0) >= 0:
        return out
    return tma_rows(out, out.element_size(), name)


def new_bf16_output(shape: tuple, device: torch.device) -> torch.Tensor:
    """An output whose rows are padded to 16 bytes for TMA (a view of the first n columns)."""
    n = shape[-1]
    padded = get_tma_aligned_size(n, 2)
    buffer = torch.empty(shape[:-1] + (padded,), dtype=torch.bfloat16, device=device)
    return buffer if padded == n else buffer[..., :n]


def index_tensor(t, name: str, length: int, device: torch.device, what: str, first: str = "lhs[0]") -> None:
    """An index tensor (m_indices, masked_m, a psum grouped_layout): int32 [length], contiguous, on
    the device; `what` follows the expected shape in the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) {what}, got {tuple(t.shape)}")
    same_device(device, ((name, t),), first)
    if length > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def host_rows_hint(expected_m, name: str = "expected_m") -> int:
    if isinstance(expected_m, bool) or not isinstance(expected_m, int):
        raise TypeError(f"{name} must be a Python int (a host-side hint), got {type(expected_m).__name__}")
    if expected_m < 1:
        raise ValueError(f"{name} must be a positive int, got {expected_m}")
    return expected_m


# ---- the layouts, composed from the rules ---------------------------------------------------------
V1_NAMES = {"lhs": "lhs", "rhs": "rhs", "out": "out", "m_indices": "m_indices", "masked_m": "masked_m",
            "expected_m": "expected_m"}


def check_gemm(layout: Layout, lhs, rhs, out=None, index=None, expected_m=None, names=V1_NAMES,
               row_scales_b: bool = False, accumulate: bool = False, fp32_ok: bool = False) -> GemmArgs:
    """Validate one GEMM call of `layout` (out may be None for dense calls only). `names`: what the
    caller calls each argument, for the messages (the v1 names, or DeepGEMM 2.x's a, b, d, ...).
    row_scales_b: B's scales per row and 128-K block (dense); accumulate: out += A B^T (fp32 out);
    fp32_ok: a dense out may be fp32 (else bf16 only)."""
    grouped = layout != Layout.DENSE
    lhs_, rhs_ = names["lhs"], names["rhs"]
    a, sa = fp8_operand(lhs, lhs_, 3 if layout == Layout.MASKED else 2,
                        "[G, max_m, K]" if layout == Layout.MASKED else "[M, K]")
    b, sb = fp8_operand(rhs, rhs_, 3 if grouped else 2, "[G, N, K]" if grouped else "[N, K]")
    *lead, k = a.shape
    n, k_b = b.shape[-2], b.shape[-1]
    g = b.shape[0] if grouped else 1
    if k_b != k:
        raise ValueError(f"{rhs_}[0] must have K = {k} columns like {lhs_}[0], got shape {tuple(b.shape)}")
    if k < 1:
        raise ValueError(f"{lhs_}[0] must have K >= 1 columns, got K = {k}")
    if n < 1:
        raise ValueError(f"{rhs_}[0] must have N >= 1 rows, got N = {n}")
    if grouped and g < 1:
        raise ValueError(f"{rhs_}[0] must hold at least one group, got shape {tuple(b.shape)}")
    if layout == Layout.MASKED and lead[0] != g:
        raise ValueError(f"{lhs_}[0] must have G = {g} groups like {rhs_}[0], got shape {tuple(a.shape)}")
    device, first = a.device, f"{lhs_}[0]"
    same_device(device, ((f"{lhs_}[1]", sa), (f"{rhs_}[0]", b), (f"{rhs_}[1]", sb)), first)
    kb = (k + 127) // 128
    a = tma_rows(a, 1, first)
    b = tma_rows(b, 1, f"{rhs_}[0]")
    sa = token_scales(sa, tuple(lead), kb, f"{lhs_}[1]")
    if row_scales_b:
        sb = token_scales(sb, (n,), kb, f"{rhs_}[1]")
    else:
        block_scales(sb, ((g,) if grouped else ()) + ((n + 127) // 128, kb), f"{rhs_}[1]")
    out_shape = (*lead, n)
    if out is None and not grouped:
        out = new_bf16_output(out_shape, device)
    else:
        out = gemm_output(out, out_shape, device, not grouped, names["out"], first, fp32_ok=fp32_ok and not grouped)
    if accumulate and out.dtype != torch.float32:
        raise TypeError(f"{names['out']} must be torch.float32 to accumulate into, got {out.dtype}")
    m = lead[-1]
    if layout == Layout.CONTIGUOUS:
        index_tensor(index, names["m_indices"], m, device, f"(the group of each row of {first}, -1 for padding)", first)
    elif layout == Layout.MASKED:
        index_tensor(index, names["masked_m"], g, device, "(valid rows of each group)", first)
        expected_m = host_rows_hint(expected_m, names["expected_m"])
    return GemmArgs(layout, a, sa, b, sb, out, index, m, n, k, g, expected_m if layout == Layout.MASKED else m,
                    row_scales_b, accumulate)


K_GROUPED_NAMES = {"lhs": "lhs", "rhs": "rhs", "out": "out", "k_sizes": "k_sizes"}


def group_sizes(k_sizes, name: str, max_groups: int = K_GROUPED_MAX_GROUPS, multiple: int = 16) -> tuple:
    """Each group's K: Python ints >= 0, multiples of `multiple` (16 fp8, 8 bf16: each group's block
    starts 16-byte aligned for TMA; an fp8 K that is not a multiple of 128 ends in a partial,
    zero-padded scale block)."""
    if not isinstance(k_sizes, (list, tuple)):
        raise TypeError(f"{name} must be a list of Python ints (each group's K) or an int32 CUDA tensor of them, got "
                        f"{type(k_sizes).__name__}")
    for g, k in enumerate(k_sizes):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{name}[{g}] must be a Python int, got {type(k).__name__}")
        if k < 0 or k % multiple:
            raise ValueError(f"{name}[{g}] must be a non-negative multiple of {multiple} (TMA needs 16-byte aligned "
                             f"rows), got {k}")
    if not k_sizes:
        raise ValueError(f"{name} must name at least one group, got an empty list")
    if len(k_sizes) > max_groups:
        raise ValueError(f"{name} has {len(k_sizes)} groups; one K-grouped call takes at most {max_groups} "
                         f"with sizes on the host (their tensor maps are kernel parameters): pass the sizes as an "
                         f"int32 CUDA tensor (up to {K_GROUPED_DEVICE_MAX_GROUPS} groups) or split the groups over "
                         f"several calls")
    return tuple(k_sizes)


def sizes_tensor(k_sizes, name: str, max_groups: int = K_GROUPED_DEVICE_MAX_GROUPS) -> torch.Tensor:
    """Group sizes as a tensor: int32 [G], 1 <= G <= max_groups, contiguous (its values are checked
    where they are read: on the host for a CPU tensor, by the kernels for a CUDA one)."""
    if k_sizes.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32 (each group's K), got {k_sizes.dtype}")
    if k_sizes.dim() != 1 or not 1 <= k_sizes.shape[0] <= max_groups:
        raise ValueError(f"{name} must have shape (G,) with 1 <= G <= {max_groups}, got {tuple(k_sizes.shape)}")
    if k_sizes.shape[0] > 1 and k_sizes.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {k_sizes.stride()}")
    return k_sizes


def sizes_values(args: GemmArgs, name: str) -> tuple:
    """The values of a validated call's sizes tensor, read on the host (the reference path): the
    rules of a list's, and the groups must fit in the K and the scale rows the operands hold."""
    ks = group_sizes(args.k_sizes.tolist(), name, K_GROUPED_DEVICE_MAX_GROUPS)
    total_k, total_kb = sum(ks), sum((k + 127) // 128 for k in ks)
    if total_k > args.k or total_kb > args.sa.shape[-1]:
        raise ValueError(f"{name} adds up to K = {total_k} in {total_kb} blocks of 128, more than the operands hold "
                         f"(K = {args.k}, {args.sa.shape[-1]} rows of scales)")
    return ks


def check_k_grouped(lhs, rhs, out, k_sizes, accumulate: bool, names=K_GROUPED_NAMES) -> GemmArgs:
    """Validate a K-grouped call: lhs = (A flat e4m3 holding each group's [M, k_g] block in turn,
    sa float32 [sum ceil(k_g/128), M]), rhs likewise with N, out float32 [G, M, N] contiguous.
    k_sizes: Python ints, or an int32 tensor [G] on the operands' device that stays there (the
    returned GemmArgs.k_sizes): then A and B may hold more K than the groups use (a capacity, the
    same for both, as are the scales' rows) and the sizes are checked where they are read (by the
    kernels, kernels/group_maps.cuh, or by sizes_values)."""
    lhs_, rhs_, out_ = names["lhs"], names["rhs"], names["out"]
    on_device = isinstance(k_sizes, torch.Tensor)
    ks = sizes_tensor(k_sizes, names["k_sizes"]) if on_device else group_sizes(k_sizes, names["k_sizes"])
    num_groups = ks.shape[0] if on_device else len(ks)
    a, sa = fp8_operand(lhs, lhs_, 1, "(each group's [M, k_g] block in turn, flat)")
    b, sb = fp8_operand(rhs, rhs_, 1, "(each group's [N, k_g] block in turn, flat)")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{out_} must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"{out_} must be torch.float32, got {out.dtype}")
    if out.dim() != 3 or out.shape[0] != num_groups:
        raise ValueError(f"{out_} must be [G, M, N] with G = {num_groups} (one group per {names['k_sizes']} entry), "
                         f"got shape {tuple(out.shape)}")
    g, m, n = out.shape
    if m % 4 or n % 4 or m < 1 or n < 1:
        raise ValueError(f"{out_} must have M and N positive multiples of 4 (the scales' rows are read by TMA), "
                         f"got M = {m}, N = {n}")
    if not out.is_contiguous():
        raise ValueError(f"{out_} must be contiguous, got strides {out.stride()}")
    device, first = a.device, f"{lhs_}[0]"
    tensors = ((f"{lhs_}[1]", sa), (f"{rhs_}[0]", b), (f"{rhs_}[1]", sb), (out_, out))
    same_device(device, tensors + (((names["k_sizes"], ks),) if on_device else ()), first)
    if on_device:   # what the flat tensors hold: the groups may use less
        if a.numel() % m:
            raise ValueError(f"{first} must hold M x (its K capacity) elements, M = {m}: got {a.numel()}")
        total_k = a.numel() // m
        sum_k = f"{first}'s K capacity ({first}.numel() / M = {total_k})"
        # The scales' capacity in K blocks is A's scale rows; B's must match.
        total_kb = sa.shape[0] if sa.dim() == 2 and sa.shape[1] == m else None
    else:
        total_k, total_kb = sum(ks), sum((k + 127) // 128 for k in ks)
        sum_k = f"sum({names['k_sizes']})"
    for name, x, rows in ((first, a, m), (f"{rhs_}[0]", b, n)):
        if x.numel() != rows * total_k:
            raise ValueError(f"{name} must hold {rows} x {sum_k} = {rows * total_k} elements, got {x.numel()}")
        if x.numel() and x.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous, got stride {x.stride()}")
        aligned_start(x, name)
    for name, s, rows in ((f"{lhs_}[1]", sa, m), (f"{rhs_}[1]", sb, n)):
        if total_kb is None or s.shape != (total_kb, rows):
            want = f"({total_kb}, {rows})" if total_kb is not None else f"(KB, {rows}), KB its rows of 128-K blocks"
            raise ValueError(f"{name} must have shape {want} (one row per 128-K block of each group in turn, one scale "
                             f"per row of the operand), got {tuple(s.shape)}")
        if not s.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major), got strides {s.stride()}")
        aligned_start(s, name)
    aligned_start(out, out_)
    # Kernels see the scales as [rows, sum of K blocks] column-major, as every other layout's; the
    # planner ignores K (the largest group's, or the capacity).
    return GemmArgs(Layout.K_GROUPED, a, sa.T, b, sb.T, out, None, m, n, total_k if on_device else max(ks), g, m,
                    True, accumulate, ks)
