"""The one host pipeline of the GEMMs: cached launch, or validate -> plan -> prepare -> fire -> cache.

Every public GEMM is `run` with a layout. A call whose tensors have the same data pointers, shapes,
strides and dtypes as an earlier call that passed validation and launched on the caller's own
tensors (nothing copied, padded or staged) fires the same prepared launch: the cache key holds the
pointers, layout, flags, planning hint, current stream and set_num_sms() value, and each entry's
guard checks the rest (runtime/launch.py). A call whose tensors sit elsewhere but whose layout is
such a call's (same key but for the pointers, same guard, every pointer 16-byte aligned) binds that
launch's template to its pointers instead: validation would establish the same facts and planning
and preparing would give the same parameters but for the addresses. Anything else goes the long
way, which validates everything.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..config import M_ALIGNMENT_CONTIGUOUS, Layout
from ..plan import plan_cached
from ..runtime.launch import LaunchCache
from .. import utils as _utils
from ..utils import sms_for
from .device import runs_on_hopper
from .validation import V1_NAMES, GemmArgs, check_gemm, check_k_grouped, sizes_values

_launches = LaunchCache()
_HINT_TYPES = frozenset((int, type(None)))
_kernels = None


def _runtime():
    """deep_gemm.runtime.kernels, imported on the first launch (it pulls in the JIT and the driver
    bindings, which a CPU-only process never needs)."""
    global _kernels
    if _kernels is None:
        from ..runtime import kernels
        _kernels = kernels
    return _kernels


# ---- K padding: TMA needs 16-byte row strides -----------------------------------------------------
def _unaligned_k(pair) -> bool:
    """An fp8 operand whose K is not a multiple of 16: zero columns are appended (they add nothing to
    the sums and leave the scale blocks unchanged). Anything else is left to validation."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return False
    x = pair[0]
    return isinstance(x, torch.Tensor) and x.dtype == torch.float8_e4m3fn and x.dim() >= 2 and x.shape[-1] % 16 != 0


def pad_k_to_16(pair):
    """The operand padded along K if it needs it, in torch (the reference of ops/pad.py)."""
    if not _unaligned_k(pair):
        return pair
    x = pair[0]
    padded = F.pad(x.view(torch.uint8), (0, (-x.shape[-1]) % 16)).view(torch.float8_e4m3fn)
    return padded, pair[1]


def pad_operands_k_to_16(lhs, rhs):
    """(lhs, rhs) with K padded to a multiple of 16 when a contiguous operand needs it (a strided view
    with aligned rows runs as it is, unless its partner is padded); on a Hopper GPU by one launch.
    Operands whose K differ are left alone: padding would hide the mismatch validation reports."""
    pads = [_unaligned_k(pair) for pair in (lhs, rhs)]
    if not any(pad and pair[0].is_contiguous() for pad, pair in zip(pads, (lhs, rhs))):
        return lhs, rhs
    if pads != [True, True] or lhs[0].shape[-1] != rhs[0].shape[-1]:
        return lhs, rhs
    xs = [pair[0].contiguous() for pair in (lhs, rhs)]
    if not (xs[0].device == xs[1].device and runs_on_hopper(xs[0].device)):
        return pad_k_to_16(lhs), pad_k_to_16(rhs)
    from .pad import pad_k16   # imported on first use: it pulls in the JIT
    a, b = pad_k16(*xs)
    return (a, lhs[1]), (b, rhs[1])


# ---- the pipeline ----------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[G, R, C] -> [G * R, C] without a copy when the groups are evenly spaced."""
    if x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    if x.is_contiguous():
        return x.view(-1, x.shape[-1])
    return x.as_strided((x.shape[0] * x.shape[1], x.shape[2]), (x.stride(1), x.stride(2)))


def _run_reference(args: GemmArgs) -> None:
    lhs, rhs = (args.a, args.sa), (args.b, args.sb)
    if args.layout == Layout.K_GROUPED:   # the scales as the caller gave them, [sum of K blocks, rows]
        reference.k_grouped_gemm_fp8_fp8_nt((args.a, args.sa.T), (args.b, args.sb.T), args.out, args.k_sizes,
                                            args.accumulate)
    elif args.layout == Layout.DENSE:
        reference.gemm_fp8_fp8_nt(lhs, rhs, args.out, args.row_scales_b, args.accumulate)
    elif args.layout == Layout.CONTIGUOUS:   # like the kernel, indices outside [0, G) are padding
        idx = args.index
        in_range = (idx >= 0) & (idx < args.num_groups)
        reference.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, args.out,
                                                           torch.where(in_range, idx, torch.full_like(idx, -1)))
    else:
        reference.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, args.out, args.index.clamp(0, args.m),
                                                       args.expected_m)


def _launch(args: GemmArgs, num_sms: int):
    """(prepared launch, copy_back) of a validated call on a Hopper GPU. copy_back is None when the
    launch writes the caller's out and reads the caller's operands in place; else what must run
    after it (possibly nothing), and the launch must not be cached."""
    a, b, out = args.a, args.b, args.out
    copy_back = None
    if args.layout == Layout.DENSE and out.dtype == torch.bfloat16 and (out.stride(0) % 8 or out.data_ptr() % 16):
        # TMA stores need 16-byte rows: such an out is written through an aligned buffer.
        out = torch.empty((args.m, (args.n + 7) // 8 * 8), dtype=torch.bfloat16, device=out.device)
        copy_back = lambda: args.out.copy_(out[:, :args.n])  # noqa: E731
    if args.layout in (Layout.CONTIGUOUS, Layout.MASKED):   # groups as rows of one 2-D view (copied if unevenly spaced)
        b = _as_rows(b)
        if args.layout == Layout.MASKED:
            a, out = _as_rows(a), _as_rows(out)
        if out.data_ptr() != args.out.data_ptr():
            copy_back = lambda: args.out.copy_(out.view_as(args.out))  # noqa: E731
        elif a.data_ptr() != args.a.data_ptr() or b.data_ptr() != args.b.data_ptr():
            copy_back = lambda: None  # noqa: E731
    config = plan_cached(min(args.expected_m, args.m), args.n, args.k, num_sms, args.layout, args.num_groups,
                         args.row_scales_b, out.dtype == torch.float32, args.accumulate)
    if isinstance(args.k_sizes, torch.Tensor):   # K-grouped, the sizes read on the device
        config = dataclasses.replace(config, device_sizes=True)
    rows = args.m * (args.num_groups if args.layout == Layout.MASKED else 1)
    launch = _runtime().prepare_gemm(config, a=a, a_rows=rows, sa=args.sa, sa_rows=args.m, b=b, b_rows=b.shape[0],
                                     sb=args.sb, out=out, out_rows=rows, shape_m=args.m, group_info=args.index,
                                     num_sms=num_sms, k_sizes=args.k_sizes)
    return launch, copy_back


def run(layout: int, lhs, rhs, out: Optional[torch.Tensor] = None, index=None, expected_m=None,
        check_indices: bool = False, names=V1_NAMES, row_scales_b: bool = False, accumulate: bool = False,
        k_sizes=None, addend: Optional[torch.Tensor] = None, fp32_out_ok: bool = False) -> torch.Tensor:
    """One GEMM of `layout`; returns the output (allocated when a dense call's out is None).
    check_indices (contiguous): validate m_indices on the host first (a device sync). names: the
    caller's names of the arguments, for error messages (ops/validation.check_gemm).
    row_scales_b: B scaled per row and 128-K block; accumulate: out += A B^T (fp32 out), after
    `addend` (checked by the caller) is copied into out once the call is validated. K-grouped
    (layout K_GROUPED): flat operands, k_sizes each group's K (ints, or an int32 tensor on the
    operands' device, read there by the kernels on a Hopper GPU), out [G, M, N] fp32. fp32_out_ok: a
    dense out may be fp32 (the training and DeepGEMM 2.x calls; the v1 bf16 call refuses it)."""
    if out is None and layout == Layout.DENSE:
        out = _new_dense_out(lhs, rhs)
    key = flat = None
    if not check_indices and addend is None:
        fired, key, flat = _try_cached(layout, lhs, rhs, out, index, expected_m, row_scales_b, accumulate, k_sizes,
                                       fp32_out_ok)
        if fired:
            return out

    if layout == Layout.K_GROUPED:
        args = check_k_grouped(lhs, rhs, out, k_sizes, accumulate, names)
    else:
        args = check_gemm(layout, *pad_operands_k_to_16(lhs, rhs), out, index, expected_m, names, row_scales_b,
                          accumulate, fp32_out_ok or accumulate)
    if addend is not None:
        out.copy_(addend)
    if layout == Layout.K_GROUPED and type(args.k_sizes) is tuple and not any(args.k_sizes):   # no K: D or zeros
        if not accumulate:
            out.zero_()
        return out
    result = out if out is not None else args.out   # validation may hand back a re-strided view
    if check_indices:
        check_m_indices(args.index, args.num_groups)
    if args.m == 0:
        return result
    if not runs_on_hopper(args.a.device):
        if isinstance(args.k_sizes, torch.Tensor):   # sizes on the device, read here: checked here
            args = args._replace(k_sizes=sizes_values(args, names["k_sizes"]))
        _run_reference(args)
        return result
    launch, copy_back = _launch(args, sms_for(args.a.device.index, key))
    launch.fire()
    if copy_back is not None:
        copy_back()
    elif key is not None and _same_tensors(args, flat):
        _launches.put(key, flat, launch)   # made from the caller's own tensors: the key describes it fully
    return result


def _try_cached(layout: int, lhs, rhs, out, index, expected_m, row_scales_b: bool, accumulate: bool, k_sizes,
                fp32_out_ok: bool) -> tuple:
    """(fired, key, flat): fire the launch cached for this call, or its layout's template. A key only
    for (tensor, scales) tuples and an int (or no) hint: a bool or numpy int equal to a cached int
    must not hit, since validation rejects them. K-grouped: the group sizes are part of the key (a
    tuple of ints exactly: anything else is validated the long way), or, as a tensor, one of the
    call's tensors (its values never reach the host)."""
    if type(k_sizes) is torch.Tensor:
        index, k_sizes = k_sizes, _DEVICE_SIZES
    sizes_ok = k_sizes is None or k_sizes is _DEVICE_SIZES or type(k_sizes) is tuple and _utils.ints_only(k_sizes)
    if not (type(lhs) is tuple and type(rhs) is tuple and type(expected_m) in _HINT_TYPES and sizes_ok):
        return False, None, None
    try:
        a, sa = lhs
        b, sb = rhs
    except ValueError:   # not pairs: validation says so
        return False, None, None
    # In the order runtime/kernels.prepare_gemm numbers the tensors of its relocations.
    flat = (a, sa, b, sb, out) if index is None else (a, sa, b, sb, out, index)
    # launch_key_extra's tuple, built inline (a call less per call)
    fired, key = _launches.try_fire(flat, (layout, expected_m, row_scales_b, accumulate, k_sizes, fp32_out_ok,
                                           _utils._num_sms_override))
    return fired, key, flat


def fire_cached(layout: int, lhs, rhs, out, index=None, expected_m=None, row_scales_b: bool = False,
                accumulate: bool = False, fp32_out_ok: bool = False) -> bool:
    """Fire the launch cached for the call run(layout, lhs, rhs, out, index, expected_m, flags...)
    would make, or its layout's template; False when the call must go the long way."""
    return _try_cached(layout, lhs, rhs, out, index, expected_m, row_scales_b, accumulate, None, fp32_out_ok)[0]


def launch_key_extra(layout: int, expected_m=None, row_scales_b: bool = False, accumulate: bool = False,
                     k_sizes=None, fp32_out_ok: bool = False) -> tuple:
    """What a launch (and its validation) depends on besides its tensors' pointers, layouts and the
    stream: the cache key's tail (set_num_sms()'s value last). fp32_out_ok is in it because the v1
    bf16 call refuses the fp32 out that the training calls accept. (_try_cached builds the same
    tuple inline.)"""
    return layout, expected_m, row_scales_b, accumulate, k_sizes, fp32_out_ok, _utils._num_sms_override


def _same_tensors(args: GemmArgs, flat: tuple) -> bool:
    """Whether validation handed back the caller's own tensors (K-grouped: the scales as transposed
    views of the caller's, which validation never copies), so the cache key describes the launch
    fully."""
    if args.layout == Layout.K_GROUPED:
        on_device = args.k_sizes if isinstance(args.k_sizes, torch.Tensor) else None
        sizes_ok = (flat[5] if len(flat) > 5 else None) is on_device
        return all(x is y for x, y in zip((args.a, args.b, args.out), flat[::2])) and sizes_ok and \
            args.sa.data_ptr() == flat[1].data_ptr() and args.sb.data_ptr() == flat[3].data_ptr()
    return all(x is y for x, y in zip((args.a, args.sa, args.b, args.sb, args.out, args.index), flat))


_DEVICE_SIZES = "device"   # a launch key's K-grouped sizes when they stay on the device


def _new_dense_out(lhs, rhs) -> Optional[torch.Tensor]:
    """A dense call's out for out=None, allocated up front so that the call can use the launch
    cache (torch's caching allocator tends to hand back the same block call after call): only in
    the plain CUDA case whose rows need no padding (N % 8 == 0); None otherwise, and validation
    allocates."""
    if type(lhs) is tuple and type(rhs) is tuple and len(lhs) == 2 and len(rhs) == 2:
        a, b = lhs[0], rhs[0]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_cuda and a.dim() == 2 \
                and b.dim() == 2 and b.shape[0] % 8 == 0:
            return torch.empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16, device=a.device)
    return None


def check_m_indices(m_indices: torch.Tensor, num_groups: int, alignment: int = M_ALIGNMENT_CONTIGUOUS) -> None:
    """Host-side check (synchronises): every block of `alignment` rows is one group or padding."""
    idx = m_indices.to("cpu", torch.int64)
    bad = ((idx < -1) | (idx >= num_groups)).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"m_indices[{row}] = {int(idx[row])} is outside [-1, {num_groups})")
    for start in range(0, idx.numel(), alignment):
        block = idx[start:start + alignment]
        experts = block[block >= 0].unique()
        if experts.numel() > 1 or (experts.numel() == 1 and int(block[0]) < 0):
            raise ValueError(
                f"m_indices rows {start}..{start + block.numel() - 1} mix experts {experts.tolist()} or start "
                f"with padding: each block of {alignment} rows must belong to one expert, padding (-1) at its end")
