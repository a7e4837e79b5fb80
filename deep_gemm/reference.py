"""Plain-torch semantics of every public operation (any device): the tests' oracle, and the path taken without a
Hopper GPU. Clarity over speed; the only concession is computing in float32 (float64 where float32 matmul would
silently drop to TF32/bf16 precision)."""
from __future__ import annotations

from typing import Optional

import torch

from .utils import get_col_major_tma_aligned_tensor

BLOCK = 128                 # scale granularity along K (and along N for the weights)
FP8_MAX = 448.0             # largest finite float8_e4m3fn value
# scale = amax * fp32(1 / 448): torch on CUDA computes `amax / 448` so (it multiplies by a scalar divisor's fp32
# reciprocal) but divides on the CPU; writing the product keeps CPU, CUDA and the cast kernels bit-identical.
INV_FP8_MAX = 1.0 / FP8_MAX
AMAX_FLOOR = 1e-4           # keeps all-zero blocks from producing a zero (then inf) scale
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_cast_input(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D or 3-D (a leading group dimension), got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have K >= 1 columns, got shape {tuple(x.shape)}")


def _pad_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad dimension `dim` of x up to a multiple of BLOCK (zeros never raise an amax)."""
    size = x.shape[dim]
    pad = -size % BLOCK
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    # x / scale can land a rounding error above 448; the clamp keeps it finite and is otherwise a no-op.
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def per_token_cast_to_fp8(x: torch.Tensor):
    """Quantise activations per 1x128 block. x: [M, K] or [G, M, K] (bf16/fp16/fp32), any K >= 1.
    Returns (q, scales): q float8_e4m3fn of x's shape; scales float32 [..., M, ceil(K/128)] in the column-major
    TMA-aligned layout, with x ~= q * scales (broadcast over each 128-wide block)."""
    check_cast_input(x, "x")
    k = x.shape[-1]
    xp = _pad_last(x.float(), -1)
    blocks = xp.unflatten(-1, (-1, BLOCK))                      # [..., M, KB, 128]
    amax = blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)     # [..., M, KB]
    scales = amax * INV_FP8_MAX
    q = _to_e4m3(blocks / scales.unsqueeze(-1)).flatten(-2)[..., :k].contiguous()
    return q, get_col_major_tma_aligned_tensor(scales)


def per_block_cast_to_fp8(x: torch.Tensor):
    """Quantise weights per 128x128 block. x: [N, K] or [G, N, K] (bf16/fp16/fp32), any N, K >= 1.
    Returns (q, scales): q float8_e4m3fn of x's shape; scales float32 [..., ceil(N/128), ceil(K/128)], contiguous."""
    check_cast_input(x, "x")
    n, k = x.shape[-2], x.shape[-1]
    xp = _pad_last(_pad_last(x.float(), -1), -2)
    lead = xp.shape[:-2]
    blocks = xp.reshape(*lead, xp.shape[-2] // BLOCK, BLOCK, xp.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR)       # [..., NB, KB]
    scales = amax * INV_FP8_MAX
    q = _to_e4m3(blocks / scales[..., :, None, :, None]).reshape(xp.shape)
    return q[..., :n, :k].contiguous(), scales.contiguous()


# Transposed per-token casts (the operands of weight-gradient GEMMs: K = tokens) ----------------
K_GROUP_ALIGNMENT = 16      # tokens of a K group: its [H, T_g] block's rows must start 16-byte aligned (TMA)


def check_transposed_cast_input(x, name: str = "x") -> None:
    """x [T, H] of bf16/fp16/fp32 whose columns are adjacent (any row stride): the casts read x.T without a copy."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, H] (tokens, columns), got shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.shape[0] > 0 and x.stride(1) != 1:
        raise ValueError(f"{name} must have adjacent columns (stride 1 along H), got strides {x.stride()}; for a "
                         f"transposed view {name} = y.t() of a row-major y, y itself is the operand: use "
                         f"per_token_cast_to_fp8(y)")


def check_k_sizes(k_sizes, num_tokens: int, name: str = "k_sizes") -> list:
    """k_sizes: a list (or tuple) of ints >= 0, multiples of K_GROUP_ALIGNMENT, summing to num_tokens."""
    if not isinstance(k_sizes, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints (tokens per group), got {type(k_sizes).__name__}")
    for g, size in enumerate(k_sizes):
        if isinstance(size, bool) or not isinstance(size, (int, torch.SymInt)):
            raise TypeError(f"{name}[{g}] must be an int, got {type(size).__name__}")
        if size < 0 or size % K_GROUP_ALIGNMENT:
            raise ValueError(f"{name}[{g}] must be a non-negative multiple of {K_GROUP_ALIGNMENT} (each group's rows "
                             f"of the transposed operand start 16-byte aligned), got {size}")
    if sum(k_sizes) != num_tokens:
        raise ValueError(f"{name} must sum to the {num_tokens} rows of x, got {sum(k_sizes)}")
    return list(k_sizes)


def per_token_cast_to_fp8_transposed(x: torch.Tensor):
    """x [T, H] -> per_token_cast_to_fp8(x.T): (q float8_e4m3fn [H, T] contiguous, scales float32 [H, ceil(T/128)] in
    the column-major TMA-aligned layout), each row of q quantised per 128 tokens. Any T >= 0, H >= 0."""
    check_transposed_cast_input(x, "x")
    t, h = x.shape
    if t == 0 or h == 0:
        blocks = -(-t // BLOCK)
        scales = torch.empty((blocks, (h + 3) // 4 * 4), dtype=torch.float32, device=x.device).t()[:h]
        return torch.empty((h, t), dtype=torch.float8_e4m3fn, device=x.device), scales
    return per_token_cast_to_fp8(x.t())


def k_grouped_per_token_cast_to_fp8_transposed(x: torch.Tensor, k_sizes):
    """x [T, H] holding G groups of k_sizes[g] consecutive rows -> (q, scales) in the K-grouped GEMM's layout:
    q flat float8_e4m3fn [T * H], group after group an [H, k_sizes[g]] row-major block (x_g.T quantised per 128 of
    its tokens, blocks restarting at each group); scales float32 [sum of ceil(k_sizes[g] / 128), H] row-major, group
    after group, one row per 128-token block."""
    check_transposed_cast_input(x, "x")
    sizes = check_k_sizes(k_sizes, x.shape[0])
    h = x.shape[1]
    q = torch.empty((x.shape[0] * h,), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((sum(-(-k // BLOCK) for k in sizes), h), dtype=torch.float32, device=x.device)
    start = row = 0
    for k in sizes:
        if k and h:
            q_g, s_g = per_token_cast_to_fp8(x[start:start + k].t())          # [H, k], [H, ceil(k / 128)]
            q.view(torch.uint8)[start * h:(start + k) * h] = q_g.view(torch.uint8).flatten()
            scales[row:row + s_g.shape[1]] = s_g.t()
        start, row = start + k, row + -(-k // BLOCK)
    return q, scales


# Dequantisation --------------------------------------------------------------------------------
def _expand(scales: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    return scales.repeat_interleave(BLOCK, dim=dim).narrow(dim, 0, size)


def dequantize_lhs(a: torch.Tensor, sa: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a [..., M, K] fp8 with sa [..., M, ceil(K/128)] (any strides) -> a * sa in `dtype`."""
    k = a.shape[-1]
    if sa.shape[:-1] != a.shape[:-1] or sa.shape[-1] != -(-k // BLOCK):
        raise ValueError(f"sa must have shape {tuple(a.shape[:-1]) + (-(-k // BLOCK),)}, got {tuple(sa.shape)}")
    return a.to(dtype) * _expand(sa.to(dtype), -1, k)


def dequantize_rhs(b: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """b [..., N, K] fp8 with sb [..., ceil(N/128), ceil(K/128)] -> b * sb in `dtype`."""
    n, k = b.shape[-2], b.shape[-1]
    want = tuple(b.shape[:-2]) + (-(-n // BLOCK), -(-k // BLOCK))
    if tuple(sb.shape) != want:
        raise ValueError(f"sb must have shape {want}, got {tuple(sb.shape)}")
    return b.to(dtype) * _expand(_expand(sb.to(dtype), -1, k), -2, n)


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T at full float32 accuracy (float64 where float32 matmul may use reduced precision)."""
    if a.is_cuda and torch.get_float32_matmul_precision() != "highest":
        return (a.double() @ b.double().T).float()
    return a @ b.T


def _pair(x, name: str):
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{name} must be a (tensor, scales) pair, got {type(x).__name__}")
    return x


# GEMMs: out = (A * sa) @ (B * sb)^T, written as bf16 -------------------------------------------
def gemm_fp8_fp8_bf16_nt(lhs, rhs, out=None) -> torch.Tensor:
    """Dense: A [M, K], sa [M, KB]; B [N, K], sb [NB, KB]; out bf16 [M, N] (allocated if None)."""
    a, _ = _pair(lhs, "lhs")
    b, _ = _pair(rhs, "rhs")
    want = (a.shape[0], b.shape[0])
    if out is None:
        out = torch.empty(want, dtype=torch.bfloat16, device=a.device)
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
    return gemm_fp8_fp8_nt(lhs, rhs, out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices) -> torch.Tensor:
    """Grouped, contiguous: row m of A/out uses group m_indices[m] of B; rows marked -1 are untouched."""
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    num_groups = b.shape[0]
    idx = m_indices.to(device=a.device, dtype=torch.int64)
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= num_groups):
        raise ValueError(f"m_indices must hold group numbers in 0..{num_groups - 1} or -1 (padding)")
    a_deq = dequantize_lhs(a, sa)
    for g in range(num_groups):
        rows = (idx == g).nonzero().flatten()
        if rows.numel():
            out[rows] = _matmul_nt(a_deq[rows], dequantize_rhs(b[g], sb[g])).to(out.dtype)
    return out


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m=None) -> torch.Tensor:
    """Grouped, masked: group g computes rows [0, masked_m[g]) of A[g]/out[g]; later rows are untouched.
    expected_m is only a planning hint for the GPU kernel and is ignored here."""
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    max_m = a.shape[1]
    counts = [int(v) for v in masked_m.tolist()]
    for g, m in enumerate(counts):
        if not 0 <= m <= max_m:
            raise ValueError(f"masked_m[{g}] must be in 0..{max_m}, got {m}")
        if m:
            result = _matmul_nt(dequantize_lhs(a[g, :m], sa[g, :m]), dequantize_rhs(b[g], sb[g]))
            out[g, :m] = result.to(out.dtype)
    return out


# Training GEMMs: fp32 out, D (+)= A @ B^T, B scaled per row --------------------------------------
def gemm_fp8_fp8_nt(lhs, rhs, out: torch.Tensor, row_scales_b: bool = False, accumulate: bool = False) -> torch.Tensor:
    """Dense, any output dtype: out (+)= (A * sa) @ (B * sb)^T, sb per 128x128 block or, with
    row_scales_b, [N, ceil(K/128)] per row and 128-K block like sa; accumulate adds to out (an fp32
    addition of the float32 product, as the kernel's reduce-add does)."""
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    b_deq = dequantize_lhs(b, sb) if row_scales_b else dequantize_rhs(b, sb)
    result = _matmul_nt(dequantize_lhs(a, sa), b_deq)
    out.copy_(out.float() + result if accumulate else result)
    return out


def k_grouped_operand(pairs):
    """The K-grouped layout of one operand from its groups' per-row casts [(q [rows, k_g] e4m3, s [rows,
    ceil(k_g/128)]), ...]: (q flat, group after group; s [sum of ceil(k_g/128), rows], contiguous)."""
    return (torch.cat([q.reshape(-1) for q, _ in pairs]), torch.cat([s.T for _, s in pairs]).contiguous())


def k_grouped_gemm_fp8_fp8_nt(lhs, rhs, out: torch.Tensor, k_sizes, accumulate: bool = True) -> torch.Tensor:
    """K-grouped: out[g] (+)= A_g @ B_g^T for G groups of K = k_sizes[g]. lhs = (A flat e4m3 holding
    each group's [M, k_g] block in turn, sa float32 [sum ceil(k_g/128), M]); rhs likewise with N;
    out float32 [G, M, N]. A group of K = 0 adds nothing (or writes zeros without accumulate)."""
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    m, n = out.shape[-2], out.shape[-1]
    offset = first_kb = 0
    for g, k in enumerate(k_sizes):
        kb = -(-k // BLOCK)
        a_g = a.reshape(-1)[offset * m:(offset + k) * m].view(m, k)
        b_g = b.reshape(-1)[offset * n:(offset + k) * n].view(n, k)
        result = _matmul_nt(dequantize_lhs(a_g, sa[first_kb:first_kb + kb].T),
                            dequantize_lhs(b_g, sb[first_kb:first_kb + kb].T))
        out[g] = out[g] + result if accumulate else result
        offset, first_kb = offset + k, first_kb + kb
    return out


# BF16 GEMMs (issue #22): float64 sums of the bf16 inputs, rounded once to out's dtype -------------
def _bf16_input(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise TypeError(f"{name} must be a torch.bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.double()


def bf16_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, layout: str = "nt",
              c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = c + op(a) @ op(b) in DeepGEMM's layout letters: nt a [M, K], b [N, K]; nn a [M, K],
    b [K, N]; tn a [K, M], b [K, N]; tt a [K, M], b [N, K]. c (any float dtype) or None."""
    x, y = _bf16_input(a, "a"), _bf16_input(b, "b")
    x = x.T if layout[0] == "t" else x
    y = y if layout[1] == "n" else y.T
    result = x @ y
    if c is not None:
        result = result + c.double()
    out.copy_(result)
    return out


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                                      m_indices: torch.Tensor) -> torch.Tensor:
    """Row m of out = a[m] @ b[m_indices[m]]^T; rows of index outside [0, G) are untouched."""
    x, w = _bf16_input(a, "a"), _bf16_input(b, "b")
    idx = m_indices.to(device=a.device, dtype=torch.int64)
    for g in range(w.shape[0]):
        rows = (idx == g).nonzero().flatten()
        if rows.numel():
            out[rows] = (x[rows] @ w[g].T).to(out.dtype)
    return out


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                                  masked_m: torch.Tensor) -> torch.Tensor:
    """out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T (masked_m clamped to [0, max_m]); later rows
    untouched."""
    x, w = _bf16_input(a, "a"), _bf16_input(b, "b")
    for g, m in enumerate(masked_m.clamp(0, a.shape[1]).tolist()):
        if m:
            out[g, :m] = (x[g, :m] @ w[g].T).to(out.dtype)
    return out


def k_grouped_bf16_gemm_tn(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, ks,
                           c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[g] = c[g] + a_g^T @ b_g, a [sum ks, M] and b [sum ks, N] holding each group's rows in turn."""
    x, y = _bf16_input(a, "a"), _bf16_input(b, "b")
    start = 0
    for g, k in enumerate(ks):
        result = x[start:start + k].T @ y[start:start + k]
        out[g] = (result + c[g].double() if c is not None else result).to(out.dtype)
        start += k
    return out


# Error metrics (float64) -----------------------------------------------------------------------
def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 1 - 2<x,y> / (|x|^2 + |y|^2); 0 for identical inputs."""
    x, y = x.double(), y.double()
    denom = float((x * x + y * y).sum())
    if denom == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denom


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; 0 when both are empty or both zero, inf if only ref is zero."""
    out, ref = out.double(), ref.double()
    num = float(torch.linalg.vector_norm(out - ref)) if out.numel() else 0.0
    den = float(torch.linalg.vector_norm(ref)) if ref.numel() else 0.0
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
