"""BF16 GEMMs: argument rules, the BF16 kernel's pipeline, and torch (cuBLAS) for the rest.

Rules, in ops/validation.py's style: every bad input raises TypeError (wrong kind or dtype) or
ValueError (shape, layout, device, alignment) naming the DeepGEMM 2.x argument (a, b, d, c,
grouped_layout, masked_m, ks_cpu, ...). The layout rules are the kernel's (TMA: 16-byte aligned
rows, so K and every outer stride a multiple of 8 elements), for every call alike.

Execution: on a Hopper GPU, a dense call (K- or MN-major operands) where
plan.bf16_dense_kernel_pays (M up to 128), the contiguous and masked calls on contiguous tensors
and the K-grouped call run the GEMM kernel with bf16 operands (kernels/gemm.cuh, Bf16Math), through
ops/gemm.py's kind of pipeline: a launch cache keyed on (a, b, d) (grouped: and the group tensor;
K-grouped: and the K sizes) first, else validate -> plan -> prepare -> fire -> cache. Every other
call, and any call on CPU tensors, runs plain torch (torch.matmul: cuBLAS on a GPU) on the given
views, writing d in place. Neither reads masked_m or m_indices on the host (CUDA-graph capturable).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import utils as _utils
from ..config import K_GROUPED_DEVICE_MAX_GROUPS, K_GROUPED_MAX_GROUPS, Layout
from ..plan import bf16_dense_kernel_pays, plan_bf16
from ..runtime.launch import LaunchCache
from ..utils import sms_for
from .device import runs_on_hopper
from .validation import group_sizes, index_tensor, same_device, sizes_tensor

_BF16 = torch.bfloat16
TMA_ELEMS = 8   # 16 bytes of bf16
_tracing = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


# ---- rules -----------------------------------------------------------------------------------------
def operand(x, name: str, dims: int, what: str, mn_major_ok: bool = False) -> None:
    """A bf16 operand of rank `dims`: K-major (stride(-1) == 1) or, where mn_major_ok, the other of its
    last two dimensions contiguous (stride(-2) == 1, e.g. a transposed view); the other stride a
    positive multiple of 8 elements (16 bytes, TMA)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != _BF16:
        raise TypeError(f"{name} must be torch.bfloat16, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {what}, got shape {tuple(x.shape)}")
    if x.numel() == 0:   # nothing is read
        return
    rows, cols = x.shape[-2], x.shape[-1]
    s_row, s_col = x.stride(-2), x.stride(-1)
    if s_col == 1 or cols <= 1:
        lead = s_row if rows > 1 else TMA_ELEMS
    elif mn_major_ok and (s_row == 1 or rows <= 1):
        lead = s_col
    else:
        allowed = "stride(-1) == 1" + (" or stride(-2) == 1 (a transposed view)" if mn_major_ok else "")
        raise ValueError(f"{name} {what} must have one contiguous dimension ({allowed}), got strides {x.stride()}: "
                         f"pass a contiguous tensor")
    outer = [x.stride(d) for d in range(dims - 2) if x.shape[d] > 1]
    if lead <= 0 or lead % TMA_ELEMS or any(s <= 0 or s % TMA_ELEMS for s in outer):
        raise ValueError(f"{name} has strides {x.stride()} but TMA needs 16-byte aligned rows: every stride but the "
                         f"contiguous one must be a positive multiple of {TMA_ELEMS} elements; pad the contiguous "
                         f"dimension to a multiple of {TMA_ELEMS}")
    if _tracing():   # fake tensors have no address
        return
    if x.data_ptr() % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address (TMA requirement), got "
                         f"{x.storage_offset()} elements into its storage: pass a .clone()")


def k_multiple(k: int, what: str) -> None:
    if k % TMA_ELEMS:
        raise ValueError(f"K = {k} ({what}) must be a multiple of {TMA_ELEMS} (16-byte TMA rows of bf16); zero-pad "
                         f"both operands along K to a multiple of {TMA_ELEMS} (zeros add nothing)")


def output(d, want: tuple, device: torch.device, first: str, fp32_ok: bool, fp32_only: bool = False) -> None:
    """d: bf16 (or fp32 where allowed) of shape `want` on the operands' device; any strides."""
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"d must be a torch.Tensor (the output, allocated by the caller), got {type(d).__name__}")
    if fp32_only and d.dtype != torch.float32:
        raise TypeError(f"d must be torch.float32, got {d.dtype}")
    if d.dtype != _BF16 and not (fp32_ok and d.dtype == torch.float32):
        raise TypeError(f"d must be torch.bfloat16{' or torch.float32' if fp32_ok else ''}, got {d.dtype}")
    if tuple(d.shape) != tuple(want):
        raise ValueError(f"d must have shape {tuple(want)}, got {tuple(d.shape)}")
    same_device(device, (("d", d),), first)


# Each dense layout: (whether a is given [K, M], whether b is given [K, N]).
DENSE_LAYOUTS = {"nt": (False, False), "nn": (False, True), "tn": (True, True), "tt": (True, False)}


def check_dense(layout: str, a, b, d) -> tuple:
    """(a as [M, K], b as [N, K]) views of a dense call in `layout` (DeepGEMM's letters)."""
    a_t, b_t = DENSE_LAYOUTS[layout]
    operand(a, "a", 2, "[K, M]" if a_t else "[M, K]", mn_major_ok=True)
    operand(b, "b", 2, "[K, N]" if b_t else "[N, K]", mn_major_ok=True)
    a_mk = a.T if a_t else a
    b_nk = b.T if b_t else b
    if a_mk.shape[1] != b_nk.shape[1]:
        raise ValueError(f"a ({'[K, M]' if a_t else '[M, K]'}, shape {tuple(a.shape)}) and b "
                         f"({'[K, N]' if b_t else '[N, K]'}, shape {tuple(b.shape)}) must agree on K")
    same_device(a.device, (("b", b),), "a")
    k_multiple(a_mk.shape[1], "a's and b's shared dimension")
    output(d, (a_mk.shape[0], b_nk.shape[0]), a.device, "a", fp32_ok=True)
    return a_mk, b_nk


def check_m_grouped(a, b, d, masked: bool) -> int:
    """The M-grouped calls (K-major operands): contiguous a [M, K] or masked a [G, max_m, K];
    b [G, N, K]; d bf16 like a with N columns. Returns G."""
    operand(a, "a", 3 if masked else 2, "[G, max_m, K]" if masked else "[M, K]")
    operand(b, "b", 3, "[G, N, K]")
    g, n, k = b.shape
    if g < 1:
        raise ValueError(f"b must hold at least one group, got shape {tuple(b.shape)}")
    if a.shape[-1] != k:
        raise ValueError(f"b must have K = {a.shape[-1]} columns like a, got shape {tuple(b.shape)}")
    if masked and a.shape[0] != g:
        raise ValueError(f"a must hold G = {g} groups like b, got shape {tuple(a.shape)}")
    same_device(a.device, (("b", b),), "a")
    k_multiple(k, "a's and b's last dimension")
    output(d, (*a.shape[:-1], n), a.device, "a", fp32_ok=False)
    return g


def check_k_grouped(a, b, d, ks_cpu, grouped_layout=None):
    """MoE weight gradient: a [sum k_g, M], b [sum k_g, N] (MN-major: tokens of each group in turn
    along dim 0), d float32 [G, M, N]; ks_cpu Python ints >= 0 summing to the rows of a and b (each
    a multiple of 8 for 16-byte aligned group starts); grouped_layout, when given, the same sizes
    as int32 [G] on the device (checked, not read). Returns the sizes: a tuple, or with ks_cpu=None
    grouped_layout itself, read where the GEMM runs (a and b may then hold more rows than the
    groups use, the same number)."""
    if ks_cpu is None:
        return _check_k_grouped_device_sizes(a, b, d, grouped_layout)
    if not isinstance(ks_cpu, (list, tuple)):
        raise TypeError(f"ks_cpu must be a list of Python ints (each group's K), got {type(ks_cpu).__name__}")
    for g, k in enumerate(ks_cpu):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"ks_cpu[{g}] must be a Python int, got {type(k).__name__}")
        if k < 0 or k % TMA_ELEMS:
            raise ValueError(f"ks_cpu[{g}] must be a non-negative multiple of {TMA_ELEMS} (each group's rows start "
                             f"16-byte aligned for TMA), got {k}")
    if not ks_cpu:
        raise ValueError("ks_cpu must name at least one group, got an empty list")
    operand(a, "a", 2, "[sum(ks_cpu), M]")
    operand(b, "b", 2, "[sum(ks_cpu), N]")
    total = sum(ks_cpu)
    for name, x in (("a", a), ("b", b)):
        if x.shape[0] != total:
            raise ValueError(f"{name} must have sum(ks_cpu) = {total} rows (each group's tokens in turn), got shape "
                             f"{tuple(x.shape)}")
    same_device(a.device, (("b", b),), "a")
    output(d, (len(ks_cpu), a.shape[1], b.shape[1]), a.device, "a", fp32_ok=True, fp32_only=True)
    if grouped_layout is not None:
        index_tensor(grouped_layout, "grouped_layout", len(ks_cpu), a.device, "(each group's K)", "a")
    return tuple(ks_cpu)


def _check_k_grouped_device_sizes(a, b, d, sizes) -> torch.Tensor:
    if not isinstance(sizes, torch.Tensor):
        raise TypeError(f"grouped_layout must be a torch.Tensor (int32 [G], each group's K) when ks_cpu is None, got "
                        f"{type(sizes).__name__}")
    sizes_tensor(sizes, "grouped_layout")
    operand(a, "a", 2, "[K capacity, M]")
    operand(b, "b", 2, "[K capacity, N]")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same number of rows (tokens), got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    same_device(a.device, (("b", b), ("grouped_layout", sizes)), "a")
    output(d, (sizes.shape[0], a.shape[1], b.shape[1]), a.device, "a", fp32_ok=True, fp32_only=True)
    return sizes


def _sizes_values(sizes: torch.Tensor, capacity: int) -> tuple:
    """A sizes tensor's values, read on the host where the kernel does not run: a list's rules (each K
    a non-negative multiple of 8), and the groups within the rows of a and b."""
    ks = group_sizes(sizes.tolist(), "grouped_layout", K_GROUPED_DEVICE_MAX_GROUPS, TMA_ELEMS)
    if sum(ks) > capacity:
        raise ValueError(f"grouped_layout adds up to {sum(ks)} rows, more than a and b hold ({capacity})")
    return ks


# ---- execution: the kernel ------------------------------------------------------------------------
_launches = LaunchCache()
launch_count = 0   # kernel launches so far (tests tell the kernel path from torch's with it)


def _try_fire(tensors: tuple, extra: tuple):
    """(fired, key): fire the launch cached for `tensors`, or for their layout at new addresses
    (runtime/launch.LaunchCache); key (None for tensors that must go the long way) is what the long
    path caches a new launch under. set_num_sms()'s value ends the key."""
    global launch_count
    fired, key = _launches.try_fire(tensors, (*extra, _utils._num_sms_override))
    launch_count += fired
    return fired, key


def try_fire_dense(a, b, d, layout: str, accumulate: bool):
    """_try_fire of a dense call in `layout` (nt, nn, tn, tt) on (a, b, d) as given."""
    return _try_fire((a, b, d), (layout, accumulate))


def _rows_aligned(x: torch.Tensor) -> bool:
    """x's rows are contiguous and start 16-byte aligned (what the kernel's TMA maps need)."""
    return (x.stride(-1) == 1 and x.stride(-2) > 0 and x.stride(-2) * x.element_size() % 16 == 0
            and x.data_ptr() % 16 == 0)


def _major(x: torch.Tensor) -> Optional[str]:
    """"k" when the kernel reads the 2-D operand view x [rows, K] K-major (rows 16-byte aligned), "mn"
    when MN-major (x.T's rows are), else None."""
    if _rows_aligned(x):
        return "k"
    return "mn" if _rows_aligned(x.T) else None


def _dense_plan(a_mk: torch.Tensor, b_nk: torch.Tensor, d: torch.Tensor, accumulate: bool, key) -> Optional[tuple]:
    """(config, SMs) of the BF16 kernel for this validated dense call, or None for cuBLAS: a Hopper
    GPU, each operand K- or MN-major with 16-byte aligned rows, rows of d too, accumulation into
    fp32 d, and a shape where plan.bf16_dense_kernel_pays."""
    m, k = a_mk.shape
    n = b_nk.shape[0]
    if not (m and n and k and a_mk.is_cuda and runs_on_hopper(a_mk.device)):
        return None
    if accumulate and d.dtype != torch.float32:
        return None
    major_a, major_b = _major(a_mk), _major(b_nk)
    if major_a is None or major_b is None or not _rows_aligned(d):
        return None
    num_sms = sms_for(a_mk.device.index, key)
    if not bf16_dense_kernel_pays(m, n, k, major_b == "mn", num_sms):
        return None
    return plan_bf16(m, n, k, num_sms, out_fp32=d.dtype == torch.float32, accumulate=accumulate,
                     a_mn_major=major_a == "mn", b_mn_major=major_b == "mn"), num_sms


def _fire_new(config, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, shape_m: int, group_info, num_sms: int,
              key, tensors: tuple, k_sizes=None) -> None:
    """Prepare and fire the kernel over row views a [rows, K], b [rows, K], d [rows, N] (K-grouped: the
    flat operands and d [G, M, N]); cache the launch under `key` (the caller's `tensors`, which the
    views show unchanged) unless key is None."""
    global launch_count
    from ..runtime.kernels import prepare_gemm   # (the CUDA bindings are imported on first use)
    with torch.cuda.device(a.device.index):
        launch = prepare_gemm(config, a=a, a_rows=a.shape[0], sa=None, sa_rows=0, b=b, b_rows=b.shape[0], sb=None,
                              out=d, out_rows=d.shape[-2], shape_m=shape_m, group_info=group_info, num_sms=num_sms,
                              k_sizes=k_sizes)
        launch.fire()
    launch_count += 1
    if key is not None:
        _launches.put(key, tensors, launch)


# The grouped calls' cache keys: their tensors (a, b, d, m_indices or masked_m; K-grouped: a, b, d),
# then a tag (masked: and expected_m; K-grouped: the K sizes and accumulation) and set_num_sms's value.
_CONTIGUOUS, _MASKED, _K_GROUPED = "contiguous", "masked", "k_grouped"


def try_fire_contiguous(a, b, d, m_indices):
    """_try_fire of a contiguous call on m_indices (the psum layout's indices are new tensors: the long way)."""
    return _try_fire((a, b, d, m_indices), (_CONTIGUOUS,))


def try_fire_masked(a, b, d, masked_m, expected_m):
    """_try_fire of a masked call: only for a plain int expected_m (validation rejects anything else,
    so nothing else may pass through the cache)."""
    if type(expected_m) is not int:
        return False, None
    return _try_fire((a, b, d, masked_m), (_MASKED, expected_m))


def try_fire_k_grouped(a, b, d, ks_cpu, grouped_layout, accumulate: bool):
    """_try_fire of a K-grouped call: only for a list or tuple of plain ints (a bool or numpy int equal
    to a cached size must not hit, since validation rejects them), after grouped_layout passed its
    check (the one thing of the call its key and guard do not cover); with ks_cpu=None, the sizes
    tensor is one of the call's tensors."""
    if ks_cpu is None:
        if type(a) is not torch.Tensor or type(grouped_layout) is not torch.Tensor:
            return False, None
        return _try_fire((a, b, d, grouped_layout), (_K_GROUPED, None, accumulate))
    if type(a) is not torch.Tensor or not _utils.ints_only(ks_cpu):
        return False, None
    index_tensor(grouped_layout, "grouped_layout", len(ks_cpu), a.device, "(each group's K)", "a")
    return _try_fire((a, b, d), (_K_GROUPED, tuple(ks_cpu), accumulate))


def masked_kernel_takes(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, expected_m: int) -> bool:
    """Whether the BF16 kernel runs this validated masked call: a Hopper GPU, expected_m >= 1 and
    grouped_kernel_takes."""
    return expected_m > 0 and grouped_kernel_takes(a, b, d)


def grouped_kernel_takes(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether the BF16 kernel runs this validated M-grouped call: a Hopper GPU, rows of A, N and K,
    contiguous a, b and d (each group's rows follow the last group's) starting 16-byte aligned,
    rows of d 16-byte long."""
    if not (a.numel() and b.numel() and a.is_cuda and runs_on_hopper(a.device)):
        return False
    return b.shape[1] % TMA_ELEMS == 0 and all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (a, b, d))


def _run_masked_kernel(a, b, d, masked_m, expected_m: int, key) -> None:
    g, max_m, k = a.shape
    n = b.shape[1]
    num_sms = sms_for(a.device.index, key)
    config = plan_bf16(expected_m, n, k, num_sms, layout=Layout.MASKED, num_groups=g)
    _fire_new(config, a.view(g * max_m, k), b.view(g * n, k), d.view(g * max_m, n), max_m, masked_m, num_sms, key,
              (a, b, d, masked_m))


# ---- execution: torch ----------------------------------------------------------------------------
def _product(x: torch.Tensor, y: torch.Tensor, fp32: bool) -> torch.Tensor:
    """x @ y with fp32 accumulation: on a GPU with a bf16 result, cuBLAS's bf16 GEMM; else the
    operands widened to fp32 (exact products of bf16 values, fp32 sums), as the kernel does."""
    if x.is_cuda and not fp32:
        return torch.matmul(x, y)
    return torch.matmul(x.float(), y.float())


def run_dense(a_mk: torch.Tensor, b_nk: torch.Tensor, d: torch.Tensor, accumulate: bool, key=None,
              given: Optional[tuple] = None) -> None:
    """d (+)= a_mk @ b_nk^T; an fp32 sum then rounded to d's dtype. key: try_fire_dense's, for a call
    on the caller's own tensors `given` (a, b, d as passed: the kernel's launch is cached under it)."""
    planned = _dense_plan(a_mk, b_nk, d, accumulate, key)
    if planned is not None:
        config, num_sms = planned
        _fire_new(config, a_mk, b_nk, d, a_mk.shape[0], None, num_sms, key, given or (a_mk, b_nk, d))
        return
    if d.is_cuda and d.dtype == _BF16 and not accumulate:   # cuBLAS writes d itself: no copy of the result
        torch.matmul(a_mk, b_nk.T, out=d)
        return
    fp32 = accumulate or d.dtype == torch.float32
    result = _product(a_mk, b_nk.T, fp32)
    if accumulate:
        d.copy_(d.float() + result)
    else:
        d.copy_(result)


def run_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor, key=None) -> None:
    """Row m of d = a[m] @ b[m_indices[m]]^T. The kernel (grouped_kernel_takes) reads the group of each
    M_ALIGNMENT_CONTIGUOUS-row block from its first row and skips blocks of no group (index outside
    [0, G)); torch leaves every row of no group as it is: on a GPU one torch._grouped_mm over the
    rows sorted by group (grouped_rows_product), where torch has it for these operands; else one
    product per group over every row, kept where the row is that group's. Neither reads the indices
    on the host. key: try_fire_contiguous's."""
    if grouped_kernel_takes(a, b, d):
        m, k = a.shape
        g, n, _ = b.shape
        num_sms = sms_for(a.device.index, key)
        config = plan_bf16(m, n, k, num_sms, layout=Layout.CONTIGUOUS, num_groups=g)
        _fire_new(config, a, b.view(g * n, k), d, m, m_indices, num_sms, key, (a, b, d, m_indices))
        return
    idx = m_indices.view(-1, 1)
    grouped = grouped_rows_product(a, b, m_indices) if a.is_cuda else None
    if grouped is not None:
        torch.where((idx >= 0) & (idx < b.shape[0]), grouped, d, out=d)   # (in place: one pass over d)
        return
    for g in range(b.shape[0]):
        result = _product(a, b[g].T, d.dtype == torch.float32).to(d.dtype)
        d.copy_(torch.where(idx == g, result, d))


# Each group's rows start 16-row aligned in grouped_rows_product's buffer: the alignment torch's grouped
# GEMM checked along the grouped dimension in some versions; zero rows cost little.
GROUPED_MM_ROWS = 16


def grouped_rows_product(a: torch.Tensor, b: torch.Tensor, m_indices: torch.Tensor) -> Optional[torch.Tensor]:
    """bf16 [M, N]: row m = a[m] @ b[m_indices[m]]^T for rows whose index is in [0, G) (the other rows
    hold anything), by one torch._grouped_mm; None where torch has none for these operands. The
    rows are moved, group after group, into a buffer in which each group starts GROUPED_MM_ROWS-row
    aligned; every step runs on the device (no host sync: CUDA-graph capturable)."""
    grouped_mm = getattr(torch, "_grouped_mm", None)
    m, k = a.shape
    g, n, _ = b.shape
    if grouped_mm is None or n % 8 or not (a.is_contiguous() and b.is_contiguous()) or m == 0:
        return None
    idx = m_indices.to(torch.int64)
    group = torch.where((idx >= 0) & (idx < g), idx, g)        # rows of no group: a group G, last
    counts = torch.zeros(g + 1, dtype=torch.int64, device=a.device).scatter_add_(0, group, torch.ones_like(group))
    ends = ((counts[:g] + GROUPED_MM_ROWS - 1) // GROUPED_MM_ROWS * GROUPED_MM_ROWS).cumsum(0)
    starts = torch.cat([ends.new_zeros(1), ends])             # each group's first buffer row; [G]: a spare row
    order = torch.argsort(group, stable=True)                 # the rows, group after group
    first = counts.cumsum(0) - counts                         # each group's first place among them
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m, device=a.device)
    spare = m + GROUPED_MM_ROWS * g                           # past every group: where the rows of no group go
    dest = torch.where(group < g, starts[group] + rank - first[group], spare)
    # Uninitialised: a padding row's product is never read, and rows of a GEMM do not mix.
    buffer = a.new_empty(spare + 1, k)
    buffer[dest] = a
    try:
        product = grouped_mm(buffer, b.transpose(1, 2), offs=ends.to(torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):   # this torch's kernel refuses these operands
        return None
    return product[dest]


def run_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
               key=None) -> None:
    """d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T; later rows keep their values (masked_m read on
    the device only; values outside [0, max_m] act as clamped). key: try_fire_masked's."""
    if masked_kernel_takes(a, b, d, expected_m):
        _run_masked_kernel(a, b, d, masked_m, expected_m, key)
        return
    result = _product(a, b.transpose(1, 2), d.dtype == torch.float32).to(d.dtype)
    rows = torch.arange(a.shape[1], device=a.device, dtype=torch.int32).view(1, -1, 1)
    keep = rows < masked_m.view(-1, 1, 1)
    d.copy_(torch.where(keep, result, d))


def k_grouped_kernel_takes(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks) -> bool:
    """Whether the BF16 kernel runs this validated K-grouped call: a Hopper GPU, some K (sizes on the
    device: maybe), at most K_GROUPED_MAX_GROUPS groups with sizes on the host, rows of a and b
    16-byte aligned, d contiguous with rows of 16 bytes from a 16-byte aligned start."""
    some_k = isinstance(ks, torch.Tensor) or (any(ks) and len(ks) <= K_GROUPED_MAX_GROUPS)
    if not (some_k and a.shape[1] and b.shape[1] and a.is_cuda and runs_on_hopper(a.device)):
        return False
    return _rows_aligned(a) and _rows_aligned(b) and d.is_contiguous() and _rows_aligned(d)


def run_k_grouped(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks, accumulate: bool, key=None) -> None:
    """d[g] (+)= a_g^T @ b_g, a_g / b_g the rows of group g; a group of K = 0 adds nothing. ks: a
    tuple, or an int32 tensor whose values the kernel reads on the device (kernels/group_maps.cuh;
    elsewhere they are read and checked here). key: try_fire_k_grouped's (the kernel's launch is
    cached under it)."""
    on_device = isinstance(ks, torch.Tensor)
    if k_grouped_kernel_takes(a, b, d, ks):
        m, n = a.shape[1], b.shape[1]
        num_sms = sms_for(a.device.index, key)
        config = plan_bf16(m, n, 0, num_sms, accumulate=accumulate, layout=Layout.K_GROUPED, num_groups=len(ks))
        if on_device:
            config = dataclasses.replace(config, device_sizes=True)
        tensors = (a, b, d, ks) if on_device else (a, b, d)
        _fire_new(config, a, b, d, m, None, num_sms, key, tensors, k_sizes=ks)
        return
    if on_device:
        ks = _sizes_values(ks, a.shape[0])
    start = 0
    for g, k in enumerate(ks):
        result = _product(a[start:start + k].T, b[start:start + k], True)
        d[g].copy_(d[g] + result if accumulate else result)
        start += k


def addend_into(d: torch.Tensor, addend: Optional[torch.Tensor]) -> None:
    if addend is not None:
        d.copy_(addend)
