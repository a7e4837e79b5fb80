"""M-grouped FP8 GEMMs for MoE, on the dense GEMM's kernel (scheduler modes).

Contiguous: the tokens of all experts are concatenated along M; m_indices maps
each row to its expert (-1 = padding).  Each block of
get_m_alignment_for_contiguous_layout() rows belongs to one expert: the kernel
reads the expert of a block from its first row.  A block whose first row is -1
(or any value outside [0, G)) is skipped and its output rows are left
untouched; rows marked -1 inside an expert's block are computed with that
expert's weights (their output is unspecified: callers ignore padding rows).

Masked: A is [G, max_m, K]; group g computes its first masked_m[g] rows.
masked_m stays on the GPU (CUDA-graph safe); rows past it are never written.
"""
from __future__ import annotations

import torch

from .. import reference
from .. import utils as _utils
from ..plan import LAYOUT_CONTIGUOUS, LAYOUT_MASKED, M_ALIGNMENT_CONTIGUOUS, plan_cached
from ..runtime.launch import LaunchCache, current_raw_stream
from ..validation import check_contiguous, check_masked
from .device import runs_on_hopper
from .gemm import _PLAIN, _device, _ptr, _runtime_kernels, _sms_for_key, pad_operands_k_to_16
from . import library as _library

_is_compiling = _library.is_compiling


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[G, R, C] -> [G*R, C] without copying when the groups are evenly spaced."""
    if x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    return x.view(-1, x.shape[-1]) if x.is_contiguous() else x.as_strided(
        (x.shape[0] * x.shape[1], x.shape[2]), (x.stride(1), x.stride(2)))


# ---- launch caches (see ops/gemm.py: the key is everything a launch depends on) -------------
_contiguous_launches = LaunchCache()
_masked_launches = LaunchCache()


def _grouped_key(lhs, rhs, out, index, extra):
    """(cache key, the call's six tensors) of a grouped call (index: m_indices or masked_m; extra:
    an int the plan depends on, part of the key), or None for a call that must take the long
    way. See ops/gemm.py for what the key and the guards hold."""
    try:
        if type(lhs) is not tuple or type(rhs) is not tuple or len(lhs) != 2 or len(rhs) != 2:
            return None
        a, sa = lhs
        b, sb = rhs
        # type(extra) is int: a bool or numpy int equal to a cached int must not hit (validation
        # rejects them).
        if not (type(a) in _PLAIN and type(sa) in _PLAIN and type(b) in _PLAIN and type(sb) in _PLAIN
                and type(out) in _PLAIN and type(index) in _PLAIN and type(extra) is int):
            return None
        return ((_ptr(a), _ptr(sa), _ptr(b), _ptr(sb), _ptr(out), _ptr(index), extra,
                 current_raw_stream(_device(a)), _utils._num_sms_override), (a, sa, b, sb, out, index))
    except Exception:  # exotic tensors whose pointers cannot be read: the long way
        return None


def check_m_indices(m_indices: torch.Tensor, num_groups: int) -> None:
    """Host-side check (synchronises): every alignment block is one expert or padding."""
    idx = m_indices.to("cpu", torch.int64)
    bad = ((idx < -1) | (idx >= num_groups)).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"m_indices[{row}] = {int(idx[row])} is outside [-1, {num_groups})")
    align = M_ALIGNMENT_CONTIGUOUS
    for start in range(0, idx.numel(), align):
        block = idx[start:start + align]
        experts = block[block >= 0].unique()
        if experts.numel() > 1 or (experts.numel() == 1 and int(block[0]) < 0):
            raise ValueError(
                f"m_indices rows {start}..{start + block.numel() - 1} mix experts {experts.tolist()} or start "
                f"with padding: each block of {align} rows must belong to one expert, padding (-1) at its end")


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, check_indices: bool = False):
    """out[m] = A[m] @ B[m_indices[m]]^T for the contiguous MoE layout; returns out.

    check_indices=True validates m_indices on the host first (a device sync).
    """
    if _is_compiling():  # torch.compile / export: trace one custom op (ops/library.py)
        return _library.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, check_indices)
    key = tensors = None
    hit = _grouped_key(lhs, rhs, out, m_indices, 0)
    if hit is not None:
        key, tensors = hit
        launch = None if check_indices else _contiguous_launches.find(key, tensors)
        if launch is not None:
            launch.fire()
            return out

    args = check_contiguous(*pad_operands_k_to_16(lhs, rhs), out, m_indices)
    if check_indices:
        check_m_indices(args.m_indices, args.num_groups)
    if args.m == 0:
        return out
    if not runs_on_hopper(args.a.device):
        # Like the kernel, treat indices outside [0, G) as padding.
        idx = args.m_indices
        in_range = (idx >= 0) & (idx < args.num_groups)
        reference.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((args.a, args.sa), (args.b, args.sb), args.out,
                                                           torch.where(in_range, idx, torch.full_like(idx, -1)))
        return out
    num_sms = _sms_for_key(key, args.a.device)
    config = plan_cached(args.m, args.n, args.k, num_sms, LAYOUT_CONTIGUOUS, args.num_groups)
    b = _as_rows(args.b)
    launch = _runtime_kernels().prepare_gemm(config, args.a, args.m, args.sa, args.m, b,
                                             b.shape[0], args.sb, args.out, args.m, args.m, args.m_indices, num_sms)
    launch.fire()
    # Cache a launch that worked and was made from the caller's own tensors: nothing validation
    # rebuilt, and B viewed in place (_as_rows copies unevenly spaced groups, and a copy made
    # while args.b is alive cannot start at its address).
    if (key is not None and args.a is lhs[0] and args.sa is lhs[1] and args.b is rhs[0] and args.sb is rhs[1]
            and args.out is out and args.m_indices is m_indices and b.data_ptr() == args.b.data_ptr()):
        _contiguous_launches.put(key, tensors, launch)
    return out


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m):
    """out[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T; returns out.

    expected_m (host int) is the typical rows per group, used only to plan tiles.
    """
    if _is_compiling():  # torch.compile / export: trace one custom op (ops/library.py)
        return _library.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
    key = tensors = None
    hit = _grouped_key(lhs, rhs, out, masked_m, expected_m)
    if hit is not None:
        key, tensors = hit
        launch = _masked_launches.find(key, tensors)
        if launch is not None:
            launch.fire()
            return out

    args = check_masked(*pad_operands_k_to_16(lhs, rhs), out, masked_m, expected_m)
    if args.max_m == 0:
        return out
    if not runs_on_hopper(args.a.device):
        reference.m_grouped_gemm_fp8_fp8_bf16_nt_masked((args.a, args.sa), (args.b, args.sb), args.out,
                                                       args.masked_m.clamp(0, args.max_m), expected_m)
        return out
    num_sms = _sms_for_key(key, args.a.device)
    config = plan_cached(min(args.expected_m, args.max_m), args.n, args.k, num_sms, LAYOUT_MASKED,
                         args.num_groups)
    a, b, target = _as_rows(args.a), _as_rows(args.b), _as_rows(args.out)
    launch = _runtime_kernels().prepare_gemm(config, a, a.shape[0], args.sa, args.max_m, b, b.shape[0], args.sb,
                                             target, target.shape[0], args.max_m, args.masked_m, num_sms)
    launch.fire()
    copied_out = target.data_ptr() != args.out.data_ptr()
    # As for the contiguous layout: cache only launches that worked, on the caller's own tensors
    # viewed in place.
    if (key is not None and not copied_out and args.a is lhs[0] and args.sa is lhs[1] and args.b is rhs[0]
            and args.sb is rhs[1] and args.out is out and args.masked_m is masked_m
            and a.data_ptr() == args.a.data_ptr() and b.data_ptr() == args.b.data_ptr()):
        _masked_launches.put(key, tensors, launch)
    if copied_out:
        args.out.copy_(target.view_as(args.out))
    return out
