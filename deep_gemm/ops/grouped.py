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
from ..plan import LAYOUT_CONTIGUOUS, LAYOUT_MASKED, M_ALIGNMENT_CONTIGUOUS, plan_dense
from ..utils import get_num_sms
from ..validation import check_contiguous, check_masked
from .device import runs_on_hopper
from .gemm import pad_k_to_16


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[G, R, C] -> [G*R, C] without copying when the groups are evenly spaced."""
    if x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    return x.view(-1, x.shape[-1]) if x.is_contiguous() else x.as_strided(
        (x.shape[0] * x.shape[1], x.shape[2]), (x.stride(1), x.stride(2)))


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
    args = check_contiguous(pad_k_to_16(lhs), pad_k_to_16(rhs), out, m_indices)
    if check_indices:
        check_m_indices(args.m_indices, args.num_groups)
    if args.m == 0:
        return out
    if not runs_on_hopper(args.a.device):
        reference.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((args.a, args.sa), (args.b, args.sb), args.out,
                                                           args.m_indices.clamp(min=-1).where(
                                                               args.m_indices < args.num_groups,
                                                               torch.full_like(args.m_indices, -1)))
        return out
    from ..runtime.kernels import launch_gemm
    num_sms = get_num_sms()
    config = plan_dense(args.m, args.n, args.k, num_sms, layout=LAYOUT_CONTIGUOUS, num_groups=args.num_groups)
    b = _as_rows(args.b)
    launch_gemm(config, a=args.a, a_rows=args.m, sa=args.sa, sa_rows=args.m, sa_cols=args.sa.shape[-1],
                b=b, b_rows=b.shape[0], sb=args.sb, out=args.out, out_rows=args.m, shape_m=args.m,
                group_info=args.m_indices, num_sms=num_sms)
    return out


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m):
    """out[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T; returns out.

    expected_m (host int) is the typical rows per group, used only to plan tiles.
    """
    args = check_masked(pad_k_to_16(lhs), pad_k_to_16(rhs), out, masked_m, expected_m)
    if args.max_m == 0:
        return out
    if not runs_on_hopper(args.a.device):
        reference.m_grouped_gemm_fp8_fp8_bf16_nt_masked((args.a, args.sa), (args.b, args.sb), args.out,
                                                       args.masked_m.clamp(0, args.max_m), expected_m)
        return out
    from ..runtime.kernels import launch_gemm
    num_sms = get_num_sms()
    config = plan_dense(min(args.expected_m, args.max_m), args.n, args.k, num_sms, layout=LAYOUT_MASKED,
                        num_groups=args.num_groups)
    a, b, target = _as_rows(args.a), _as_rows(args.b), _as_rows(args.out)
    launch_gemm(config, a=a, a_rows=a.shape[0], sa=args.sa, sa_rows=args.max_m,
                sa_cols=args.num_groups * args.sa.shape[-1], b=b, b_rows=b.shape[0], sb=args.sb, out=target,
                out_rows=target.shape[0], shape_m=args.max_m, group_info=args.masked_m, num_sms=num_sms)
    if target.data_ptr() != args.out.data_ptr():
        args.out.copy_(target.view_as(args.out))
    return out
