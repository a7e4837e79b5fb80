"""The public functions: thin adapters that hand a call to the one pipeline (ops/gemm.run, ops/cast),
or, while torch.compile or torch.export traces, to its custom op (ops/library.py)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import M_ALIGNMENT_CONTIGUOUS, Layout
from .ops import bf16 as _bf16, cast as _cast, gemm as _gemm, library as _library, validation as _validation
from .utils import ceil_div, get_col_major_tma_aligned_tensor, ints_only

Pair = Tuple[torch.Tensor, torch.Tensor]
_is_compiling = _library.is_compiling
_ops = torch.ops.deep_gemm if _library.REGISTERED else None
# Layouts as plain ints on the per-call path (an enum member's lookup and hash cost microseconds).
_DENSE, _CONTIGUOUS, _MASKED = int(Layout.DENSE), int(Layout.CONTIGUOUS), int(Layout.MASKED)
_K_GROUPED = int(Layout.K_GROUPED)


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
    return _gemm.run(_DENSE, lhs, rhs, out)


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
    return _gemm.run(_CONTIGUOUS, lhs, rhs, out, m_indices, check_indices=check_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: Pair, rhs: Pair, out: torch.Tensor, masked_m: torch.Tensor,
                                          expected_m: int) -> torch.Tensor:
    """out[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T; returns out.

    A: [G, max_m, K], sa: [G, max_m, ceil(K/128)], out: [G, max_m, N]. masked_m (int32 [G]) stays on
    the GPU and is never read on the host (CUDA-graph safe); rows past it are not written; a count
    outside [0, max_m] acts as the nearest end of that range (on CPU alike).
    expected_m (a host int) is the typical rows per group, used only to plan tiles.
    """
    if _is_compiling():
        _ops.m_grouped_gemm_fp8_fp8_bf16_nt_masked(*_pairs(lhs, rhs), out, masked_m, expected_m)
        return out
    return _gemm.run(_MASKED, lhs, rhs, out, masked_m, expected_m)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs: Pair, rhs: Pair, out: torch.Tensor) -> torch.Tensor:
    """out[M, N] (fp32) += A[M, K] @ B[N, K]^T, both operands scaled per row and 128-K block (the
    weight gradient of an FP8 training step); returns out.

    lhs = (A: float8_e4m3fn [M, K], sa: float32 [M, ceil(K/128)]), rhs = (B: float8_e4m3fn [N, K],
    sb: float32 [N, ceil(K/128)]); each scale tensor row-major or column-major TMA-aligned (the
    latter, what per_token_cast_to_fp8 returns, costs nothing). out: float32 [M, N] with rows
    16-byte aligned, updated in place (each element gets one fp32 addition of the product).
    """
    if _is_compiling():
        _ops.fp8_gemm_nt_training(*_pairs(lhs, rhs), out, True, True)
        return out
    return _gemm.run(_DENSE, lhs, rhs, out, row_scales_b=True, accumulate=True)


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs: Pair, rhs: Pair, out: torch.Tensor, k_sizes) -> torch.Tensor:
    """out[g] (fp32 [M, N]) += A_g @ B_g^T for the G groups of a MoE layer's weight gradient, group g
    over its own K = k_sizes[g] (the tokens routed to expert g); returns out.

    lhs = (A: flat float8_e4m3fn holding each group's [M, k_g] row-major block in turn, sa: float32
    [sum ceil(k_g/128), M], K-block-major, group after group); rhs likewise with N; out: float32
    [G, M, N] contiguous, accumulated in place; M and N multiples of 4. k_sizes: each k_g >= 0 and
    a multiple of 16 (0: the group adds nothing), as
    - a list of Python ints, read on the host: a CUDA graph replays the sizes of the captured call;
    - an int32 tensor [G] on the operands' GPU, read on the device (CUDA-graph safe: each replay
      uses its current values, as the routing wrote them). A and B may then hold more K than the
      groups use (a capacity: M x K_cap and N x K_cap elements, the scales K_cap/128 rows or more,
      the same for both), the groups packed from the start. Sizes that break these rules cannot
      raise an error without a sync: from the first bad group on, out is filled with NaN and no
      memory outside the tensors is read. On the CPU the tensor's values are checked like a list's.
    """
    if _is_compiling():
        if isinstance(k_sizes, torch.Tensor):
            _ops.k_grouped_fp8_gemm_nt_device_sizes(*_pairs(lhs, rhs), out, k_sizes, True)
        else:
            _ops.k_grouped_fp8_gemm_nt(*_pairs(lhs, rhs), out, list(k_sizes), True)
        return out
    return _gemm.run(_K_GROUPED, lhs, rhs, out, row_scales_b=True, accumulate=True,
                     k_sizes=tuple(k_sizes) if type(k_sizes) is list else k_sizes,
                     names=_validation.K_GROUPED_NAMES)


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


def per_token_cast_to_fp8_transposed(x: torch.Tensor) -> Pair:
    """x [T, H] -> per_token_cast_to_fp8(x.T) without materialising x.T: (e4m3 [H, T] row-major, float32
    scales [H, ceil(T/128)] per 1x128 block along T, column-major TMA-aligned), the K-major operand
    (K = tokens) of a weight-gradient GEMM."""
    if _is_compiling():
        return _ops.per_token_cast_to_fp8_transposed(x)
    return _cast.per_token_cast_to_fp8_transposed(x)


def k_grouped_per_token_cast_to_fp8_transposed(x: torch.Tensor, k_sizes) -> Pair:
    """x [T, H] of G groups of k_sizes[g] consecutive rows (each a multiple of 16, 0 allowed) ->
    (e4m3 [T * H]: group after group x_g.T [H, k_g] row-major; float32 scales
    [sum of ceil(k_g/128), H] row-major), the layout of K-grouped weight-gradient GEMMs."""
    if _is_compiling():
        return _ops.k_grouped_per_token_cast_to_fp8_transposed(x, list(k_sizes))
    return _cast.k_grouped_per_token_cast_to_fp8_transposed(x, k_sizes)


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


# ==== DeepGEMM 2.x call signatures ====================================================================
# Thin adapters with DeepGEMM 2.x's positional order, keyword names and defaults (its pybind
# registration, csrc/apis/gemm.hpp and csrc/apis/layout.hpp): they check what only the 2.x call has
# (recipes, compiled_dims, the psum layout, features not built yet), translate the call and hand it
# to the v1 public function above, which runs the pipeline, or while torch.compile traces, its
# custom op. Like DeepGEMM they write d in place and return None. Bad input raises TypeError or
# ValueError naming the 2.x argument (a, b, d, grouped_layout, ...).

# The 2.x names of the arguments, for the pipeline's error messages.
_V2_NAMES = {"lhs": "a", "rhs": "b", "out": "d", "m_indices": "grouped_layout", "masked_m": "masked_m",
             "expected_m": "expected_m"}


def fp8_gemm_nt(a: Pair, b: Pair, d: torch.Tensor, c: Optional[torch.Tensor] = None,
                recipe: Optional[Tuple[int, int, int]] = None, recipe_a: Optional[Tuple[int, int]] = None,
                recipe_b: Optional[Tuple[int, int]] = None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """d[M, N] = c + A[M, K] @ B[N, K]^T with DeepSeek-V3 scales (DeepGEMM 2.x); returns None.

    a = (A: float8_e4m3fn [M, K], sa: float32 [M, ceil(K/128)], row-major or column-major
    TMA-aligned); b = (B: float8_e4m3fn [N, K], sb); d: bf16 or fp32 [M, N], written in place.
    c: None, or an fp32 [M, N] addend with an fp32 d: d itself (accumulated in place) or a tensor
    that shares no memory with d (copied into d first).

    recipe: None or (1, 128, 128): B's scales per 128x128 block, sb float32 [ceil(N/128),
    ceil(K/128)]; (1, 1, 128): B scaled per row and 128-K block like A, sb float32 [N, ceil(K/128)]
    (row-major or column-major TMA-aligned). Equally recipe_a=(1, 128) with recipe_b=(128, 128) or
    (1, 128); never both forms. compiled_dims (letters of "mnk": the dims DeepGEMM fixes at
    compile time) is accepted and has no effect: N and K are always compiled in, M is always a
    run-time value. disable_ue8m0_cast is accepted and has no effect: on Hopper the fp32 scales
    are used as they are (UE8M0 is Blackwell's packed scale format).
    """
    # The launch cache first for the usual calls (no recipe_a/b, c None or d itself), with the flags
    # the call below would pass to the pipeline (a bf16 d with per-block B and no c: the v1 call).
    if recipe_a is None and recipe_b is None and (c is None or c is d) and type(d) is torch.Tensor:
        row_b = _fast_recipe(recipe)
        if row_b is not None and _plain_flags(compiled_dims, disable_ue8m0_cast) and not _is_compiling():
            v1 = not row_b and c is None and d.dtype is torch.bfloat16
            # (index, expected_m, row_scales_b, accumulate, fp32_out_ok), positionally
            if _gemm.fire_cached(_DENSE, a, b, d, None, None, row_b, c is not None, not v1):
                return
    _check_pairs(a, b)
    _check_d(d, dense=True)
    row_scales_b = _check_recipes(recipe, recipe_a, recipe_b)
    _check_compiled_dims(compiled_dims)
    _check_flag(disable_ue8m0_cast, "disable_ue8m0_cast")
    addend = _check_addend(c, d)
    if d.dtype == torch.bfloat16 and not row_scales_b and c is None:
        _call_v1(gemm_fp8_fp8_bf16_nt, _DENSE, a, b, d)
    elif _is_compiling():
        if addend is not None:
            d.copy_(addend)
        _ops.fp8_gemm_nt_training(*_pairs(a, b), d, row_scales_b, c is not None)
    else:
        _gemm.run(_DENSE, a, b, d, names=_V2_NAMES, row_scales_b=row_scales_b, accumulate=c is not None,
                  addend=addend, fp32_out_ok=True)


def k_grouped_fp8_gemm_nt_contiguous(a: Pair, b: Pair, d: torch.Tensor, ks_cpu, grouped_layout: torch.Tensor,
                                     c: Optional[torch.Tensor] = None,
                                     recipe: Optional[Tuple[int, int, int]] = (1, 1, 128)) -> None:
    """d[g] = c[g] + A_g @ B_g^T for G groups of K = ks_cpu[g] (DeepGEMM 2.x); returns None.

    The layout of k_grouped_wgrad_gemm_fp8_fp8_fp32_nt: a = (flat e4m3 holding each group's
    [M, k_g] block in turn, float32 [sum ceil(k_g/128), M]), b likewise with N, d float32
    [G, M, N]. ks_cpu: the groups' K as Python ints (read on the host, multiples of 16);
    grouped_layout: the same sizes as an int32 [G] tensor on the device (checked, not read). With
    ks_cpu=None the sizes are read from grouped_layout on the device instead (CUDA-graph safe, as
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt with a tensor: A and B may hold more K than used). c:
    None (d = A_g B_g^T), d itself (accumulated) or an fp32 [G, M, N] tensor sharing no memory
    with d (copied into d first). recipe: (1, 1, 128) only (both operands scaled per row).
    """
    _check_pairs(a, b)
    if _int_tuple(recipe, "recipe", 3) != (1, 1, 128):
        raise ValueError(f"recipe={recipe} is not supported for K-grouped GEMMs: both operands are scaled per row "
                         f"and 128-K block, recipe=(1, 1, 128)")
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"d must be a torch.Tensor (the output), got {type(d).__name__}")
    if ks_cpu is None:   # the sizes stay on the device
        if not isinstance(grouped_layout, torch.Tensor):
            raise TypeError(f"grouped_layout must be a torch.Tensor (int32 [G], each group's K), got "
                            f"{type(grouped_layout).__name__}")
        sizes, names = grouped_layout, {"lhs": "a", "rhs": "b", "out": "d", "k_sizes": "grouped_layout"}
    elif not isinstance(ks_cpu, (list, tuple)):
        raise TypeError(f"ks_cpu must be a list of Python ints (each group's K) or None (read grouped_layout on the "
                        f"device), got {type(ks_cpu).__name__}")
    else:
        _validation.index_tensor(grouped_layout, "grouped_layout", len(ks_cpu), d.device, "(each group's K)", "d")
        sizes, names = tuple(ks_cpu), {"lhs": "a", "rhs": "b", "out": "d", "k_sizes": "ks_cpu"}
    addend = _check_addend(c, d)
    if _is_compiling():
        if addend is not None:
            d.copy_(addend)
        if ks_cpu is None:
            _ops.k_grouped_fp8_gemm_nt_device_sizes(*_pairs(a, b), d, grouped_layout, c is not None)
        else:
            _ops.k_grouped_fp8_gemm_nt(*_pairs(a, b), d, list(ks_cpu), c is not None)
    else:
        _gemm.run(_K_GROUPED, a, b, d, row_scales_b=True, accumulate=c is not None, k_sizes=sizes, names=names,
                  addend=addend)


def _k_major_only_gemm(name: str, product: str, layout: str, fix: str, dims: str):
    """A DeepGEMM 2.x FP8 GEMM with an MN-major operand, which Hopper's FP8 wgmma cannot read."""
    def gemm(a: Pair, b: Pair, d: torch.Tensor, c: Optional[torch.Tensor] = None,
             recipe: Optional[Tuple[int, int, int]] = None, recipe_a: Optional[Tuple[int, int]] = None,
             recipe_b: Optional[Tuple[int, int]] = None, compiled_dims: str = dims,
             disable_ue8m0_cast: bool = False) -> None:
        raise ValueError(f"{name}: {layout}, but FP8 operands must be K-major on Hopper (the FP8 wgmma reads A and B "
                         f"with K contiguous; DeepGEMM rejects this layout on SM90 as well). Use fp8_gemm_nt with a "
                         f"transposed cast: {fix}.")
    gemm.__name__ = gemm.__qualname__ = name
    gemm.__doc__ = f"D = {product}: always raises ValueError on Hopper (FP8 operands must be K-major)."
    return gemm


_CAST_A_T = "cast A from x.t().contiguous() ([M, K]) with per_token_cast_to_fp8"
_CAST_B_T = "B from w.t().contiguous() ([N, K]) with per_block_cast_to_fp8"
fp8_gemm_nn = _k_major_only_gemm("fp8_gemm_nn", "A[M, K] @ B[K, N]", "b is [K, N] (N-major)", "cast " + _CAST_B_T, "nk")
fp8_gemm_tn = _k_major_only_gemm("fp8_gemm_tn", "A[K, M]^T @ B[K, N]", "a is [K, M] and b is [K, N] (both MN-major)",
                                 f"{_CAST_A_T} and {_CAST_B_T}", "mn")
fp8_gemm_tt = _k_major_only_gemm("fp8_gemm_tt", "A[K, M]^T @ B[N, K]^T", "a is [K, M] (M-major)", _CAST_A_T, "mn")


def m_grouped_fp8_gemm_nt_contiguous(a: Pair, b: Pair, d: torch.Tensor, grouped_layout: torch.Tensor,
                                     recipe: Optional[Tuple[int, int, int]] = None,
                                     recipe_a: Optional[Tuple[int, int]] = None,
                                     recipe_b: Optional[Tuple[int, int]] = None, compiled_dims: str = "nk",
                                     disable_ue8m0_cast: bool = False, use_psum_layout: bool = False,
                                     expected_m_for_psum_layout: Optional[int] = None) -> None:
    """d[m] = A[m] @ B[g(m)]^T for MoE experts' rows concatenated along M (DeepGEMM 2.x); returns None.

    a = (A [M, K], sa [M, ceil(K/128)]), b = (B [G, N, K], sb [G, ceil(N/128), ceil(K/128)]),
    d: bf16 [M, N], written in place. recipe, recipe_a, recipe_b, compiled_dims and
    disable_ue8m0_cast as in fp8_gemm_nt (per-row B scales are not supported by the grouped GEMMs).

    use_psum_layout=False: grouped_layout is m_indices, int32 [M], each row's group, -1 for
    padding; every block of get_mk_alignment_for_contiguous_layout() rows belongs to one group
    (padding at its end).

    use_psum_layout=True: grouped_layout is int32 [G] on A's device, non-decreasing: group g's rows
    end at grouped_layout[g] (exclusive) and group g + 1's start at that row rounded up to
    get_mk_alignment_for_contiguous_layout() (group 0 starts at row 0); rows at or past M are
    ignored. The rows' groups are worked out on the device by a few torch ops that never read
    grouped_layout on the host (CUDA-graph capturable: a replay reads its current contents).
    expected_m_for_psum_layout (DeepGEMM's planning hint for that layout) is accepted and checked;
    the contiguous planner here plans from M.

    Rows of d that belong to no group: those in an alignment block without any group's row (past
    the last group) are left untouched; gap rows after a group's last row inside that group's
    last alignment block are unspecified (the kernel may compute them with that group's weights
    from whatever A holds there; the CPU reference leaves them untouched).
    """
    if use_psum_layout is False and expected_m_for_psum_layout is None \
            and _plain_v2_call(recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, d) \
            and _gemm.fire_cached(_CONTIGUOUS, a, b, d, grouped_layout):
        return
    _check_m_grouped_v2(a, b, d, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)
    _check_flag(use_psum_layout, "use_psum_layout")
    if use_psum_layout:
        if expected_m_for_psum_layout is not None:
            _check_positive_int(expected_m_for_psum_layout, "expected_m_for_psum_layout")
        grouped_layout = _psum_m_indices(a, b, grouped_layout)
    elif expected_m_for_psum_layout is not None:
        raise ValueError(f"expected_m_for_psum_layout is only meaningful with use_psum_layout=True, got "
                         f"{expected_m_for_psum_layout!r} with use_psum_layout=False")
    _call_v1(m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, _CONTIGUOUS, a, b, d, grouped_layout)


def m_grouped_fp8_gemm_nt_masked(a: Pair, b: Pair, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                                 recipe: Optional[Tuple[int, int, int]] = None,
                                 recipe_a: Optional[Tuple[int, int]] = None,
                                 recipe_b: Optional[Tuple[int, int]] = None, compiled_dims: str = "nk",
                                 disable_ue8m0_cast: bool = False) -> None:
    """d[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T (DeepGEMM 2.x); returns None.

    a = (A [G, max_m, K], sa [G, max_m, ceil(K/128)]), b = (B [G, N, K], sb), d: bf16
    [G, max_m, N]. masked_m (int32 [G]) stays on the device (CUDA-graph safe); rows past it are not
    written; a count outside [0, max_m] acts as the nearest end of that range. expected_m (a host
    int) is the typical rows per group, used only to plan tiles.
    recipe, recipe_a, recipe_b, compiled_dims and disable_ue8m0_cast as in fp8_gemm_nt.
    """
    if _plain_v2_call(recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, d) \
            and _gemm.fire_cached(_MASKED, a, b, d, masked_m, expected_m):
        return
    _check_m_grouped_v2(a, b, d, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)
    _call_v1(m_grouped_gemm_fp8_fp8_bf16_nt_masked, _MASKED, a, b, d, masked_m, expected_m)


fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked   # DeepGEMM's older name, still used by engines


def get_mk_alignment_for_contiguous_layout() -> int:
    """Rows of one group's block in the contiguous grouped layout (DeepGEMM 2.x name): 128."""
    return M_ALIGNMENT_CONTIGUOUS


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    """Accepts the one alignment the Hopper kernels are built for, 128 (DeepGEMM 2.x name)."""
    if isinstance(new_value, bool) or not isinstance(new_value, int):
        raise TypeError(f"new_value must be an int, got {type(new_value).__name__}")
    if new_value != M_ALIGNMENT_CONTIGUOUS:
        raise ValueError(f"the contiguous layout's alignment is fixed at {M_ALIGNMENT_CONTIGUOUS} rows on Hopper "
                         f"(the only supported value), got {new_value}")


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """float32 scales sf ([MN, SF_K] or [G, MN, SF_K]) in the MN-major (column-major) TMA-aligned
    layout: sf itself when laid out so already, else a copy (DeepGEMM 2.x name of
    get_col_major_tma_aligned_tensor)."""
    _check_fp32_scales(sf, "sf")
    if sf.dim() not in (2, 3):
        raise ValueError(f"sf must be 2-D [MN, SF_K] or 3-D [G, MN, SF_K], got shape {tuple(sf.shape)}")
    return get_col_major_tma_aligned_tensor(sf)


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe,
                                      num_groups: Optional[int] = None, is_sfa: Optional[bool] = None,
                                      disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """float32 scale factors in the layout the Hopper GEMMs read (DeepGEMM 2.x).

    sf: [ceil(mn/gran_mn), ceil(k/gran_k)], with a leading [num_groups] when num_groups is given.
    recipe: (gran_m_a, gran_n_b, gran_k) with is_sfa saying whose scales sf holds (A: True), or
    one operand's (gran_mn, gran_k) with is_sfa None. Per-token scales (gran_mn 1, gran_k 128)
    come back MN-major TMA-aligned (get_mn_major_tma_aligned_tensor); per-block scales
    (128, 128) unchanged (a row-major copy if they are not row-major contiguous); per-row B scales
    (recipe (1, 1, 128)) like per-token ones. Anything else raises ValueError (packed UE8M0 int32
    scales are Blackwell's). disable_ue8m0_cast changes nothing on Hopper.
    """
    if not isinstance(sf, torch.Tensor):
        raise TypeError(f"sf must be a torch.Tensor, got {type(sf).__name__}")
    for name, value in (("mn", mn), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_groups is not None:
        _check_positive_int(num_groups, "num_groups")
    _check_flag(disable_ue8m0_cast, "disable_ue8m0_cast")
    if isinstance(recipe, (tuple, list)) and len(recipe) == 3:
        gran_m_a, gran_n_b, gran_k = _int_tuple(recipe, "recipe", 3)
        if is_sfa is None or not isinstance(is_sfa, (bool, int)):
            raise ValueError(f"is_sfa must be True (sf holds A's scales) or False (B's) with a 3-element recipe, "
                             f"got {is_sfa!r}")
        gran = (gran_m_a, gran_k) if is_sfa else (gran_n_b, gran_k)
        if is_sfa and gran != (1, 128):
            raise ValueError(f"recipe={tuple(recipe)} gives A's scales granularity {gran}; A's scales on Hopper are "
                             f"per 1x128 block: recipe[0] must be 1 and recipe[2] 128")
        if not is_sfa and gran not in ((1, 128), (128, 128)):
            raise ValueError(f"recipe={tuple(recipe)} gives B's scales granularity {gran}; B's scales on Hopper are "
                             f"per 128x128 block or per row: recipe[1] 128 or 1, recipe[2] 128")
    elif isinstance(recipe, (tuple, list)) and len(recipe) == 2:
        gran = _int_tuple(recipe, "recipe", 2)
        if is_sfa is not None:
            raise ValueError(f"is_sfa must be None with a 2-element (gran_mn, gran_k) recipe, got {is_sfa!r}")
        if gran not in ((1, 128), (128, 128)):
            raise ValueError(f"recipe={gran} is not a Hopper scale granularity: (1, 128) (per token) or (128, 128) "
                             f"(per block)")
    else:
        raise TypeError(f"recipe must be a 3-tuple (gran_m_a, gran_n_b, gran_k) or a 2-tuple (gran_mn, gran_k), "
                        f"got {recipe!r}")
    if sf.dtype == torch.int32:
        raise ValueError("sf holds packed UE8M0 scales (int32), Blackwell's format: the Hopper GEMMs read float32 "
                         "scales, pass those")
    _check_fp32_scales(sf, "sf")
    want = ((num_groups,) if num_groups is not None else ()) + (ceil_div(mn, gran[0]), ceil_div(k, gran[1]))
    if tuple(sf.shape) != want:
        raise ValueError(f"sf must have shape {want} (mn={mn}, k={k}, granularity {gran}"
                         f"{f', num_groups={num_groups}' if num_groups is not None else ''}), got {tuple(sf.shape)}")
    if gran[0] == 1:
        return get_col_major_tma_aligned_tensor(sf)
    return sf if sf.is_contiguous() else sf.contiguous()


def _psum_m_indices(a: Pair, b: Pair, grouped_layout: torch.Tensor) -> torch.Tensor:
    """The psum layout's grouped_layout (int32 [G], each group's end row) as m_indices (int32 [M],
    each row's group, -1 for gap rows and rows past the last group), built on the device without
    reading grouped_layout on the host (see m_grouped_fp8_gemm_nt_contiguous)."""
    _check_pairs(a, b)
    x, w = a[0], b[0]
    for name, t in (("a[0]", x), ("b[0]", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"a[0] must be 2-D [M, K], got shape {tuple(x.shape)}")
    if w.dim() != 3 or w.shape[0] < 1:
        raise ValueError(f"b[0] must be 3-D [G, N, K] with at least one group, got shape {tuple(w.shape)}")
    num_groups = w.shape[0]
    _validation.index_tensor(grouped_layout, "grouped_layout", num_groups, x.device,
                             "with use_psum_layout=True (each group's end row)", "a[0]")
    ends = grouped_layout
    step = M_ALIGNMENT_CONTIGUOUS
    starts = torch.cat((ends.new_zeros(1), torch.div(ends[:-1] + (step - 1), step, rounding_mode="floor") * step))
    rows = torch.arange(x.shape[0], dtype=torch.int32, device=ends.device)
    group = torch.searchsorted(ends, rows, right=True)          # the first group whose end is past the row
    clamped = group.clamp(max=num_groups - 1)
    inside = (group < num_groups) & (rows >= starts.index_select(0, clamped)) & (rows < ends.index_select(0, clamped))
    return clamped.to(torch.int32).masked_fill(~inside, -1)


# ---- checks and translation of the 2.x arguments --------------------------------------------------


def _check_pairs(a, b) -> None:
    if type(a) is tuple and type(b) is tuple and len(a) == 2 and len(b) == 2:   # the usual call, quickly
        return
    for name, pair in (("a", a), ("b", b)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            got = f"{len(pair)} items" if isinstance(pair, (tuple, list)) else type(pair).__name__
            raise TypeError(f"{name} must be a (tensor, scales) pair, got {got}")


def _check_d(d, dense: bool) -> None:
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"d must be a torch.Tensor (the output, allocated by the caller), got {type(d).__name__}")
    if d.dtype == torch.float32 and not dense:
        raise ValueError("d of torch.float32 is not supported by the M-grouped GEMMs (DeepGEMM's neither): "
                         "pass a torch.bfloat16 d")
    if d.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"d must be torch.bfloat16{' or torch.float32' if dense else ''}, got {d.dtype}")


def _check_addend(c, d: torch.Tensor) -> Optional[torch.Tensor]:
    """The addend c of D = C + A B: None (no addend), d itself (D accumulates in place: None
    returned) or an fp32 tensor of d's shape sharing no memory with d, returned to be copied into
    d once the call is validated. d is then fp32."""
    if c is None:
        return None
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"c must be a torch.Tensor or None, got {type(c).__name__}")
    if c.dtype != torch.float32 or d.dtype != torch.float32:
        raise TypeError(f"c (the addend) and d must both be torch.float32 to accumulate, got c {c.dtype} and "
                        f"d {d.dtype}")
    if c.shape != d.shape or c.device != d.device:
        raise ValueError(f"c must have d's shape {tuple(d.shape)} and device {d.device}, got {tuple(c.shape)} on "
                         f"{c.device}")
    if c is d:   # (decided without reading addresses, which torch.compile's tracing cannot compare)
        return None
    same_view = c.data_ptr() == d.data_ptr() and c.stride() == d.stride()
    if not same_view:
        if c.untyped_storage().data_ptr() == d.untyped_storage().data_ptr():
            raise ValueError("c shares memory with d without being d itself: pass c=d to accumulate in place, or a "
                             "separate tensor")
        return c
    return None


def _int_tuple(value, name: str, length: int) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != length or \
            any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be a tuple of {length} ints, got {value!r}")
    return tuple(value)


def _check_recipes(recipe, recipe_a, recipe_b, allow_row_b: bool = True) -> bool:
    """recipe (gran_m_a, gran_n_b, gran_k), or recipe_a (gran_m, gran_k) with recipe_b (gran_n, gran_k):
    whether B is scaled per row (else per 128 x 128 block)."""
    if recipe is not None:
        if recipe_a is not None or recipe_b is not None:
            raise ValueError("pass either recipe or recipe_a with recipe_b, not both")
        r = _int_tuple(recipe, "recipe", 3)
        if r == (1, 128, 128) or (allow_row_b and r == (1, 1, 128)):
            return r == (1, 1, 128)
        if r == (1, 1, 128):
            raise ValueError(f"recipe=(1, 1, 128) (per-row B scales) {_M_GROUPED_PER_BLOCK}")
        raise ValueError(f"recipe={r} is not supported on Hopper: recipe must be None, (1, 128, 128) (A's scales per "
                         f"1x128 block, B's per 128x128 block){' or (1, 1, 128) (B per row)' if allow_row_b else ''}")
    if recipe_a is None and recipe_b is None:
        return False
    if recipe_a is None or recipe_b is None:
        raise ValueError(f"recipe_a and recipe_b go together: {'recipe_a' if recipe_a is None else 'recipe_b'} is "
                         f"missing")
    ra, rb = _int_tuple(recipe_a, "recipe_a", 2), _int_tuple(recipe_b, "recipe_b", 2)
    if ra != (1, 128):
        raise ValueError(f"recipe_a={ra} is not supported on Hopper: A's scales are per 1x128 block, recipe_a=(1, 128)")
    if rb == (128, 128) or (allow_row_b and rb == (1, 128)):
        return rb == (1, 128)
    if rb == (1, 128):
        raise ValueError(f"recipe_b=(1, 128) (per-row B scales) {_M_GROUPED_PER_BLOCK}")
    raise ValueError(f"recipe_b={rb} is not supported on Hopper: B's scales are per 128x128 block, recipe_b=(128, 128)"
                     + (", or per row, recipe_b=(1, 128)" if allow_row_b else ""))


_M_GROUPED_PER_BLOCK = ("is not supported by the M-grouped GEMMs: they read B's scales per 128x128 block (DeepGEMM's "
                        "Hopper M-grouped kernels do too); use recipe (1, 128, 128)")


def _check_compiled_dims(compiled_dims) -> None:
    if not isinstance(compiled_dims, str):
        raise TypeError(f"compiled_dims must be a str, got {type(compiled_dims).__name__}")
    if compiled_dims.strip("mnk"):
        raise ValueError(f"compiled_dims must be made of the letters m, n and k (the dims fixed at compile time), got "
                         f"{compiled_dims!r}")


def _check_flag(value, name: str) -> None:
    if value is False or value is True:
        return
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_fp32_scales(sf, name: str) -> None:
    if not isinstance(sf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(sf).__name__}")
    if sf.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 scales, got {sf.dtype}")


_COMMON_DIMS = frozenset(("nk", "mn", "mnk", "k", "n", ""))   # compiled_dims values that need no check


_FAST_RECIPES = {(1, 128, 128): False, (1, 1, 128): True}   # recipe -> B scaled per row


def _fast_recipe(recipe):
    """Whether B is scaled per row under `recipe` when it is None or one of _FAST_RECIPES, a tuple of
    ints; None for anything else (which _check_recipes checks)."""
    if recipe is None:
        return False
    # Ints only: a bool equals an int ((1, True, 128) would find (1, 1, 128)), and an unhashable item
    # must reach _check_recipes' message.
    if type(recipe) is tuple and ints_only(recipe):
        return _FAST_RECIPES.get(recipe)
    return None


def _plain_flags(compiled_dims, disable_ue8m0_cast) -> bool:
    """compiled_dims and disable_ue8m0_cast whose checks pass at a glance."""
    return (type(compiled_dims) is str and compiled_dims in _COMMON_DIMS
            and (disable_ue8m0_cast is False or disable_ue8m0_cast is True))


def _plain_v2_call(recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast, d) -> bool:
    """The serving engines' call of a DeepGEMM 2.x M-grouped FP8 GEMM: B scaled per block by the
    default recipe, a bf16 d, flags whose checks pass at a glance. Such a call on tensors (or a
    layout) that the pipeline has cached fires the cached launch before the 2.x checks: its key
    and guard say they passed."""
    return (recipe_a is None and recipe_b is None and _fast_recipe(recipe) is False
            and _plain_flags(compiled_dims, disable_ue8m0_cast) and type(d) is torch.Tensor
            and d.dtype == torch.bfloat16 and not _is_compiling())


def _check_m_grouped_v2(a, b, d, recipe, recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast) -> None:
    """The DeepGEMM 2.x M-grouped FP8 calls' own arguments (the pipeline checks the tensors)."""
    _check_pairs(a, b)
    _check_d(d, dense=False)
    _check_recipes(recipe, recipe_a, recipe_b, allow_row_b=False)
    _check_compiled_dims(compiled_dims)
    _check_flag(disable_ue8m0_cast, "disable_ue8m0_cast")


def _call_v1(fn, layout: int, *args) -> None:
    """The v1 call of the translated arguments: the pipeline, whose messages name the 2.x arguments,
    or while tracing the v1 public function (which becomes its custom op)."""
    if _is_compiling():
        fn(*args)
    else:
        _gemm.run(layout, *args, names=_V2_NAMES)

# ==== BF16 GEMMs (DeepGEMM 2.x names) ===============================================================
# Dense calls at decode sizes and the grouped calls run the BF16 kernel on a Hopper GPU; the others
# run plain torch (ops/bf16.py: torch.matmul, i.e. cuBLAS on a GPU). While torch.compile traces they
# are one custom op each.
_BF16_DENSE_DOC = """d = c + {op} (DeepGEMM 2.x); returns None.

    a: bf16 {a_shape}, b: bf16 {b_shape}; each operand either contiguous along its last dimension
    or a transposed view (stride(-2) == 1), the other stride a multiple of 8 elements (16 bytes);
    K a multiple of 8 (zero-pad A and B along K otherwise). d: bf16 or fp32 [M, N], written in
    place. c: None, d itself (fp32, accumulated in place), or an fp32 [M, N] tensor sharing no
    memory with d (copied into d first). compiled_dims is checked and has no effect.
    On a Hopper GPU, calls with M <= 128 and 16-byte aligned rows (of each operand, whichever
    dimension is contiguous, and of d) run the BF16 kernel, which reads K-major and MN-major
    operands alike (no copy), except an MN-major b of few 64-column tiles (N < 64 x half the SMs)
    at M > 64; the others run cuBLAS through torch (torch.matmul, fp32 accumulation).
    """


def _bf16_dense(layout: str, a, b, d, c, compiled_dims) -> None:
    _check_compiled_dims(compiled_dims)
    key = None
    if (c is None or c is d) and not _is_compiling():
        fired, key = _bf16.try_fire_dense(a, b, d, layout, c is not None)
        if fired:   # a launch cached for (a, b, d) or their layout
            return
    a_mk, b_nk = _bf16.check_dense(layout, a, b, d)
    addend = _check_addend(c, d)
    _bf16.addend_into(d, addend)
    if _is_compiling():
        _ops.bf16_gemm_nt(a_mk, b_nk, d, c is not None)
    else:
        _bf16.run_dense(a_mk, b_nk, d, c is not None, key if addend is None else None, given=(a, b, d))


def _bf16_dense_gemm(layout: str, op: str, a_shape: str, b_shape: str, dims: str):
    def gemm(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: Optional[torch.Tensor] = None,
             compiled_dims: str = dims) -> None:
        _bf16_dense(layout, a, b, d, c, compiled_dims)
    gemm.__name__ = gemm.__qualname__ = f"bf16_gemm_{layout}"
    gemm.__doc__ = _BF16_DENSE_DOC.format(op=op, a_shape=a_shape, b_shape=b_shape)
    return gemm


bf16_gemm_nt = _bf16_dense_gemm("nt", "A[M, K] @ B[N, K]^T", "[M, K]", "[N, K]", "nk")
bf16_gemm_nn = _bf16_dense_gemm("nn", "A[M, K] @ B[K, N]", "[M, K]", "[K, N]", "nk")
bf16_gemm_tn = _bf16_dense_gemm("tn", "A[K, M]^T @ B[K, N]", "[K, M]", "[K, N]", "mn")
bf16_gemm_tt = _bf16_dense_gemm("tt", "A[K, M]^T @ B[N, K]^T", "[K, M]", "[N, K]", "mn")


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                                      grouped_layout: torch.Tensor, compiled_dims: str = "nk",
                                      use_psum_layout: bool = False,
                                      expected_m_for_psum_layout: Optional[int] = None) -> None:
    """d[m] = A[m] @ B[g(m)]^T for MoE experts' rows concatenated along M (DeepGEMM 2.x); returns None.

    a: bf16 [M, K], b: bf16 [G, N, K] (both K-major, K a multiple of 8), d: bf16 [M, N].
    grouped_layout as in m_grouped_fp8_gemm_nt_contiguous: m_indices (int32 [M], each row's
    group, -1 for padding; every block of get_mk_alignment_for_contiguous_layout() rows belongs to
    one group, padding at its end) or, with use_psum_layout=True, each group's end row (int32 [G]),
    turned into row groups on the device. Indices are never read on the host (CUDA-graph
    capturable). Rows of no group: those in an alignment block without any group's row are left
    untouched; gap rows after a group's last row inside its last alignment block are unspecified
    (the kernel computes them with that group's weights from whatever A holds there).
    On a Hopper GPU with contiguous a, b and d (N a multiple of 8) the BF16 kernel runs; otherwise
    it runs through torch: on a GPU one torch._grouped_mm over the rows sorted by group where torch
    has it, else one torch.matmul per group (both leave every row of no group untouched).
    """
    _check_compiled_dims(compiled_dims)
    key = None
    if use_psum_layout is False and not _is_compiling():
        fired, key = _bf16.try_fire_contiguous(a, b, d, grouped_layout)   # a launch cached for these tensors
        if fired:
            return
    _check_flag(use_psum_layout, "use_psum_layout")
    _bf16.check_m_grouped(a, b, d, masked=False)
    if use_psum_layout:
        if expected_m_for_psum_layout is not None:
            _check_positive_int(expected_m_for_psum_layout, "expected_m_for_psum_layout")
        grouped_layout = _psum_m_indices((a, None), (b, None), grouped_layout)
    elif expected_m_for_psum_layout is not None:
        raise ValueError(f"expected_m_for_psum_layout is only meaningful with use_psum_layout=True, got "
                         f"{expected_m_for_psum_layout!r} with use_psum_layout=False")
    else:
        _validation.index_tensor(grouped_layout, "grouped_layout", a.shape[0], a.device,
                                 "(the group of each row of a, -1 for padding)", "a")
    if _is_compiling():
        _ops.m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout)
    else:
        _bf16.run_contiguous(a, b, d, grouped_layout, key)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int, compiled_dims: str = "nk") -> None:
    """d[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T (DeepGEMM 2.x); returns None.

    a: bf16 [G, max_m, K], b: bf16 [G, N, K] (K-major, K a multiple of 8), d: bf16 [G, max_m, N].
    masked_m (int32 [G]) stays on the device and is never read on the host (CUDA-graph safe);
    rows past it keep their values (a masked_m above max_m acts as max_m, below 0 as 0).
    expected_m (a host int) is a planning hint, checked.
    On a Hopper GPU with contiguous tensors (N a multiple of 8), the BF16 kernel runs: it reads
    masked_m on the device and computes each group's valid rows only. Otherwise it runs through torch
    (a batched torch.matmul over every row, cuBLAS on a GPU, then a device-side row mask).
    """
    _check_compiled_dims(compiled_dims)
    key = None
    if not _is_compiling():
        fired, key = _bf16.try_fire_masked(a, b, d, masked_m, expected_m)   # a launch cached for these tensors
        if fired:
            return
    g = _bf16.check_m_grouped(a, b, d, masked=True)
    _validation.index_tensor(masked_m, "masked_m", g, a.device, "(valid rows of each group)", "a")
    _validation.host_rows_hint(expected_m)
    if _is_compiling():
        _ops.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    else:
        _bf16.run_masked(a, b, d, masked_m, expected_m, key)


bf16_m_grouped_gemm_nt_masked = m_grouped_bf16_gemm_nt_masked   # DeepGEMM's older name


def k_grouped_bf16_gemm_tn_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks_cpu,
                                      grouped_layout: torch.Tensor, c: Optional[torch.Tensor] = None,
                                      compiled_dims: str = "mn", use_psum_layout: bool = False) -> None:
    """d[g] = c[g] + A_g^T @ B_g for the G groups of a MoE layer's weight gradient (DeepGEMM 2.x);
    returns None.

    a: bf16 [sum(ks_cpu), M], b: bf16 [sum(ks_cpu), N]: each group's tokens in turn along dim 0
    (MN-major operands, M and N multiples of 8). ks_cpu: each group's K as Python ints (>= 0,
    multiples of 8, read on the host); grouped_layout: the same sizes as int32 [G] on the device
    (checked, not read). d: fp32 [G, M, N]. c: None (d = A_g^T B_g; a group of K = 0 gives
    zeros), d itself (accumulated) or an fp32 [G, M, N] tensor sharing no memory with d (copied
    into d first). use_psum_layout=True is not supported.
    ks_cpu=None: the sizes are read from grouped_layout where the GEMM runs: by the kernel on the
    device (CUDA-graph safe; a and b may hold more rows than the groups use, the same number; sizes
    that are negative, not multiples of 8 or past those rows give NaN in d from that group on),
    else on the host (checked, ValueError).
    On a Hopper GPU with 16-byte aligned rows of a and b and a contiguous d (N a multiple of 4) the
    BF16 kernel runs (its launch cached per tensors and ks_cpu); otherwise it runs through torch
    (one torch.matmul per group, cuBLAS on a GPU).
    """
    _check_compiled_dims(compiled_dims)
    _check_flag(use_psum_layout, "use_psum_layout")
    if use_psum_layout:
        raise ValueError("use_psum_layout=True is not supported by k_grouped_bf16_gemm_tn_contiguous: pass ks_cpu "
                         "and grouped_layout as each group's K")
    key = None
    if (c is None or c is d) and not _is_compiling():
        fired, key = _bf16.try_fire_k_grouped(a, b, d, ks_cpu, grouped_layout, c is not None)
        if fired:   # a launch cached for these tensors and sizes, or their layout's
            return
    ks = _bf16.check_k_grouped(a, b, d, ks_cpu, grouped_layout)
    addend = _check_addend(c, d)
    _bf16.addend_into(d, addend)
    if _is_compiling():
        if isinstance(ks, torch.Tensor):
            _ops.k_grouped_bf16_gemm_tn_device_sizes(a, b, d, ks, c is not None)
        else:
            _ops.k_grouped_bf16_gemm_tn(a, b, d, list(ks), c is not None)
    else:
        _bf16.run_k_grouped(a, b, d, ks, c is not None, key if addend is None else None)
