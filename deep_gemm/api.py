"""The public functions: thin adapters that hand a call to the one pipeline (ops/gemm.run, ops/cast),
or, while torch.compile or torch.export traces, to its custom op (ops/library.py)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import M_ALIGNMENT_CONTIGUOUS, Layout
from .ops import cast as _cast, gemm as _gemm, library as _library

Pair = Tuple[torch.Tensor, torch.Tensor]
_is_compiling = _library.is_compiling
_ops = torch.ops.deep_gemm if _library.REGISTERED else None


def gemm_fp8_fp8_bf16_nt(lhs: Pair, rhs: Pair, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[M, N] (bf16) = A[M, K] @ B[N, K]^T with DeepSeek-V3 block scales; returns out.

    lhs = (A: float8_e4m3fn [M, K], sa: float32 [M, ceil(K/128)], row-major or column-major
    TMA-aligned); rhs = (B: float8_e4m3fn [N, K], sb: float32 [ceil(N/128), ceil(K/128)]).
    out is allocated when None.
    """
    if _is_compiling():
        a, sa, b, sb = _pairs(lhs, rhs)
        if out is None:
            return _ops.gemm_fp8_fp8_bf16_nt(a, sa, b, sb)
        _ops.gemm_fp8_fp8_bf16_nt_out(a, sa, b, sb, out)
        return out
    return _gemm.run(Layout.DENSE, lhs, rhs, out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: Pair, rhs: Pair, out: torch.Tensor, m_indices: torch.Tensor,
                                              check_indices: bool = False) -> torch.Tensor:
    """out[m] = A[m] @ B[m_indices[m]]^T for MoE experts' rows concatenated along M; returns out.

    B: [G, N, K], sb: [G, ceil(N/128), ceil(K/128)]; m_indices: int32 [M], the expert of each row, -1
    for padding. Each block of get_m_alignment_for_contiguous_layout() rows belongs to one expert
    (padding at its end): a block whose first row is -1 (or outside [0, G)) is skipped and its rows
    of out are left untouched; -1 rows inside an expert's block are computed with that expert
    (their output is unspecified). check_indices=True validates m_indices on the host (a sync).
    """
    if _is_compiling():
        _ops.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(*_pairs(lhs, rhs), out, m_indices, check_indices)
        return out
    return _gemm.run(Layout.CONTIGUOUS, lhs, rhs, out, m_indices, check_indices=check_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: Pair, rhs: Pair, out: torch.Tensor, masked_m: torch.Tensor,
                                          expected_m: int) -> torch.Tensor:
    """out[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T; returns out.

    A: [G, max_m, K], sa: [G, max_m, ceil(K/128)], out: [G, max_m, N]. masked_m (int32 [G]) stays on
    the GPU and is never read on the host (CUDA-graph safe); rows past it are not written.
    expected_m (a host int) is the typical rows per group, used only to plan tiles.
    """
    if _is_compiling():
        _ops.m_grouped_gemm_fp8_fp8_bf16_nt_masked(*_pairs(lhs, rhs), out, masked_m, expected_m)
        return out
    return _gemm.run(Layout.MASKED, lhs, rhs, out, masked_m, expected_m)


def per_token_cast_to_fp8(x: torch.Tensor) -> Pair:
    """[M, K] or [G, M, K] -> (e4m3, float32 scales per 1x128 block in the column-major TMA-aligned
    layout the GEMMs read)."""
    if _is_compiling():
        return _ops.per_token_cast_to_fp8(x)
    return _cast.per_token_cast_to_fp8(x)


def per_block_cast_to_fp8(x: torch.Tensor) -> Pair:
    """[N, K] or [G, N, K] -> (e4m3, float32 scales per 128x128 block, row-major)."""
    if _is_compiling():
        return _ops.per_block_cast_to_fp8(x)
    return _cast.per_block_cast_to_fp8(x)


def get_m_alignment_for_contiguous_layout() -> int:
    """Rows of one group's block in the contiguous grouped layout (pad each group to this)."""
    return M_ALIGNMENT_CONTIGUOUS


def check_m_indices(m_indices: torch.Tensor, num_groups: int) -> None:
    """Host-side check (synchronises): every alignment block of rows is one group or padding."""
    _gemm.check_m_indices(m_indices, num_groups)


def _pairs(lhs, rhs):
    for name, pair in (("lhs", lhs), ("rhs", rhs)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{name} must be a (tensor, scales) pair, got {type(pair).__name__}")
    return (*lhs, *rhs)
