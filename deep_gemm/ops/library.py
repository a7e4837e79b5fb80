"""torch.library custom ops (OPS below), so that torch.compile(fullgraph=True) and torch.export see
each public deep_gemm call as one opaque operator instead of breaking the graph at it.

The real kernels run the eager pipelines (ops/gemm.py, ops/cast.py); the fake kernels give the exact
shapes and strides those return. The public functions (api.py) route here only while being traced
(`is_compiling()`), so eager calls pay one cheap check.

No ``from __future__ import annotations`` here: some torch versions read the op signatures.
"""
import torch

from ..config import Layout
from ..utils import is_col_major_tma_aligned
from .. import reference
from . import bf16, cast, gemm
from .validation import K_GROUPED_NAMES, fp8_operand

_FP8 = torch.float8_e4m3fn
_GEMM_ARGS = "Tensor a, Tensor sa, Tensor b, Tensor sb"


# ---- real kernels ------------------------------------------------------------------------------
def _gemm(a, sa, b, sb):
    return gemm.run(Layout.DENSE, (a, sa), (b, sb))


def _gemm_out(a, sa, b, sb, out):
    gemm.run(Layout.DENSE, (a, sa), (b, sb), out)


def _contiguous(a, sa, b, sb, out, m_indices, check_indices=False):
    gemm.run(Layout.CONTIGUOUS, (a, sa), (b, sb), out, m_indices, check_indices=check_indices)


def _masked(a, sa, b, sb, out, masked_m, expected_m):
    gemm.run(Layout.MASKED, (a, sa), (b, sb), out, masked_m, expected_m)


def _training(a, sa, b, sb, out, row_scales_b, accumulate):
    gemm.run(Layout.DENSE, (a, sa), (b, sb), out, row_scales_b=row_scales_b, accumulate=accumulate, fp32_out_ok=True)


def _k_grouped(a, sa, b, sb, out, k_sizes, accumulate):
    gemm.run(Layout.K_GROUPED, (a, sa), (b, sb), out, row_scales_b=True, accumulate=accumulate, k_sizes=tuple(k_sizes),
             names=K_GROUPED_NAMES)


def _k_grouped_device_sizes(a, sa, b, sb, out, k_sizes, accumulate):
    gemm.run(Layout.K_GROUPED, (a, sa), (b, sb), out, row_scales_b=True, accumulate=accumulate, k_sizes=k_sizes,
             names=K_GROUPED_NAMES)


def _bf16_dense(a, b, out, accumulate):
    bf16.run_dense(a, b, out, accumulate)


def _bf16_contiguous(a, b, out, m_indices):
    bf16.run_contiguous(a, b, out, m_indices)


def _bf16_masked(a, b, out, masked_m, expected_m):
    bf16.run_masked(a, b, out, masked_m, expected_m)


def _bf16_k_grouped(a, b, out, k_sizes, accumulate):
    bf16.run_k_grouped(a, b, out, k_sizes if isinstance(k_sizes, torch.Tensor) else tuple(k_sizes), accumulate)


def tma_scales_strides(shape) -> tuple:
    """Strides of column-major TMA-aligned scales [*, M, KB] as get_col_major_tma_aligned_tensor
    allocates them: a [G, KB, aligned M] buffer, transposed (torch counts sizes of 0 as 1)."""
    m, kb = shape[-2], shape[-1]
    col = max((m + 3) // 4 * 4, 1)
    return (1, col) if len(shape) == 2 else (col * max(kb, 1), 1, col)


def _contiguous_strides(t):
    """t contiguous with torch.empty's strides (`.contiguous()` keeps any stride of a size-1 dimension)."""
    t = t.contiguous()
    want, step = [], 1
    for size in reversed(t.shape):
        want.append(step)
        step *= max(size, 1)
    want = tuple(reversed(want))
    return t if t.stride() == want else t.as_strided(t.shape, want)


# The casts' outputs each in an allocation of their own: a custom op's outputs may share no storage
# (torch checks), and the eager casts cut both from one.
def _per_token(x):
    q, s = cast.per_token_cast_to_fp8(x, separate_outputs=True)
    want = tma_scales_strides(s.shape)   # the fake kernel's promise: size-1 dimensions relabelled
    if s.stride() != want:
        s = s.as_strided(s.shape, want) if is_col_major_tma_aligned(s) else _new_tma_scales(x, s.shape).copy_(s)
    return _contiguous_strides(q), s


def _per_block(x):
    q, s = cast.per_block_cast_to_fp8(x, separate_outputs=True)
    return _contiguous_strides(q), _contiguous_strides(s)


def _transposed(x):
    return cast.per_token_cast_to_fp8_transposed(x, separate_outputs=True)


def _k_grouped_transposed(x, k_sizes):
    return cast.k_grouped_per_token_cast_to_fp8_transposed(x, list(k_sizes), separate_outputs=True)


# ---- fake kernels: shapes, dtypes and strides only ------------------------------------------------
def _check_gemm(a, sa, b, sb, a_dims: int, b_dims: int):
    fp8_operand((a, sa), "lhs", a_dims, "[M, K]" if a_dims == 2 else "[G, max_m, K]")
    fp8_operand((b, sb), "rhs", b_dims, "[N, K]" if b_dims == 2 else "[G, N, K]")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"rhs[0] must have K = {a.shape[-1]} columns like lhs[0], got shape {tuple(b.shape)}")
    return b.shape[-2]


def _check_out(out, shape):
    if out.dtype != torch.bfloat16:
        raise TypeError(f"out must be torch.bfloat16, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")


def _gemm_fake(a, sa, b, sb):
    n = _check_gemm(a, sa, b, sb, 2, 2)
    # As validation.new_bf16_output: rows padded to 16 bytes for TMA, a view of the first n columns.
    return a.new_empty((a.shape[0], (n + 7) // 8 * 8), dtype=torch.bfloat16)[:, :n]


def _gemm_out_fake(a, sa, b, sb, out):
    _check_out(out, (a.shape[0], _check_gemm(a, sa, b, sb, 2, 2)))


def _contiguous_fake(a, sa, b, sb, out, m_indices, check_indices=False):
    _check_out(out, (a.shape[0], _check_gemm(a, sa, b, sb, 2, 3)))


def _masked_fake(a, sa, b, sb, out, masked_m, expected_m):
    _check_out(out, (*a.shape[:2], _check_gemm(a, sa, b, sb, 3, 3)))


def _training_fake(a, sa, b, sb, out, row_scales_b, accumulate):
    _check_gemm(a, sa, b, sb, 2, 2)


def _k_grouped_fake(a, sa, b, sb, out, k_sizes, accumulate):
    pass   # out is written in place; the eager run validates


def _bf16_dense_fake(a, b, out, accumulate):
    bf16.output(out, (a.shape[0], b.shape[0]), a.device, "a", fp32_ok=True)


def _bf16_contiguous_fake(a, b, out, m_indices):
    bf16.output(out, (a.shape[0], b.shape[1]), a.device, "a", fp32_ok=False)


def _bf16_masked_fake(a, b, out, masked_m, expected_m):
    bf16.output(out, (*a.shape[:2], b.shape[1]), a.device, "a", fp32_ok=False)


def _bf16_k_grouped_fake(a, b, out, k_sizes, accumulate):
    bf16.output(out, (len(k_sizes), a.shape[1], b.shape[1]), a.device, "a", fp32_ok=True, fp32_only=True)


def _bf16_k_grouped_device_sizes_fake(a, b, out, k_sizes, accumulate):
    bf16.output(out, (k_sizes.shape[0], a.shape[1], b.shape[1]), a.device, "a", fp32_ok=True, fp32_only=True)


def _new_tma_scales(like, shape):
    m, kb = shape[-2], shape[-1]
    return like.new_empty((*shape[:-2], kb, (m + 3) // 4 * 4), dtype=torch.float32).transpose(-1, -2)[..., :m, :]


def _per_token_fake(x):
    reference.check_cast_input(x, "x")
    return x.new_empty(x.shape, dtype=_FP8), _new_tma_scales(x, (*x.shape[:-1], (x.shape[-1] + 127) // 128))


def _transposed_fake(x):
    reference.check_transposed_cast_input(x, "x")
    return cast.dense_transposed_outputs(x)


def _k_grouped_transposed_fake(x, k_sizes):
    reference.check_transposed_cast_input(x, "x")
    return cast.k_grouped_transposed_outputs(x, reference.check_k_sizes(list(k_sizes), x.shape[0]))


def _per_block_fake(x):
    reference.check_cast_input(x, "x")
    shape = (*x.shape[:-2], (x.shape[-2] + 127) // 128, (x.shape[-1] + 127) // 128)
    return x.new_empty(x.shape, dtype=_FP8), x.new_empty(shape, dtype=torch.float32)


# name -> (schema, mutated arguments, real kernel, fake kernel)
OPS = {
    "gemm_fp8_fp8_bf16_nt": (f"({_GEMM_ARGS}) -> Tensor", (), _gemm, _gemm_fake),
    "gemm_fp8_fp8_bf16_nt_out": (f"({_GEMM_ARGS}, Tensor(a!) out) -> ()", ("out",), _gemm_out, _gemm_out_fake),
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": (
        f"({_GEMM_ARGS}, Tensor(a!) out, Tensor m_indices, bool check_indices=False) -> ()", ("out",),
        _contiguous, _contiguous_fake),
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked": (
        f"({_GEMM_ARGS}, Tensor(a!) out, Tensor masked_m, int expected_m) -> ()", ("out",), _masked, _masked_fake),
    "fp8_gemm_nt_training": (
        f"({_GEMM_ARGS}, Tensor(a!) out, bool row_scales_b, bool accumulate) -> ()", ("out",), _training,
        _training_fake),
    "k_grouped_fp8_gemm_nt": (
        f"({_GEMM_ARGS}, Tensor(a!) out, int[] k_sizes, bool accumulate) -> ()", ("out",), _k_grouped,
        _k_grouped_fake),
    "k_grouped_fp8_gemm_nt_device_sizes": (   # the sizes an int32 tensor (read on the device on a GPU)
        f"({_GEMM_ARGS}, Tensor(a!) out, Tensor k_sizes, bool accumulate) -> ()", ("out",), _k_grouped_device_sizes,
        _k_grouped_fake),
    # BF16 (issue #22): a [M, K] / b [N, K] views in any layout (dense), as api.py hands them over
    "bf16_gemm_nt": ("(Tensor a, Tensor b, Tensor(a!) out, bool accumulate) -> ()", ("out",), _bf16_dense,
                     _bf16_dense_fake),
    "m_grouped_bf16_gemm_nt_contiguous": ("(Tensor a, Tensor b, Tensor(a!) out, Tensor m_indices) -> ()", ("out",),
                                          _bf16_contiguous, _bf16_contiguous_fake),
    "m_grouped_bf16_gemm_nt_masked": ("(Tensor a, Tensor b, Tensor(a!) out, Tensor masked_m, int expected_m) -> ()",
                                      ("out",), _bf16_masked, _bf16_masked_fake),
    "k_grouped_bf16_gemm_tn": ("(Tensor a, Tensor b, Tensor(a!) out, int[] k_sizes, bool accumulate) -> ()", ("out",),
                               _bf16_k_grouped, _bf16_k_grouped_fake),
    "k_grouped_bf16_gemm_tn_device_sizes": (
        "(Tensor a, Tensor b, Tensor(a!) out, Tensor k_sizes, bool accumulate) -> ()", ("out",), _bf16_k_grouped,
        _bf16_k_grouped_device_sizes_fake),
    "per_token_cast_to_fp8": ("(Tensor x) -> (Tensor, Tensor)", (), _per_token, _per_token_fake),
    "per_block_cast_to_fp8": ("(Tensor x) -> (Tensor, Tensor)", (), _per_block, _per_block_fake),
    "per_token_cast_to_fp8_transposed": ("(Tensor x) -> (Tensor, Tensor)", (), _transposed, _transposed_fake),
    "k_grouped_per_token_cast_to_fp8_transposed": ("(Tensor x, int[] k_sizes) -> (Tensor, Tensor)", (),
                                                   _k_grouped_transposed, _k_grouped_transposed_fake),
}


def _register() -> bool:
    """Define every op; False (tracing then graph-breaks at deep_gemm calls) without torch.library."""
    lib = torch.library
    if hasattr(torch.ops, "deep_gemm") and hasattr(torch.ops.deep_gemm, "per_block_cast_to_fp8"):
        return True  # already defined (module reloaded): defining again would raise
    if hasattr(lib, "custom_op") and hasattr(lib, "register_fake"):           # torch >= 2.4
        for name, (schema, mutated, real, fake) in OPS.items():
            lib.custom_op(f"deep_gemm::{name}", real, mutates_args=mutated, schema=schema).register_fake(fake)
        return True
    return False


try:
    REGISTERED = _register()
except Exception as e:  # never let an exotic torch break `import deep_gemm`
    import warnings
    warnings.warn(f"deep_gemm: torch.library ops not registered ({type(e).__name__}: {e}); "
                  f"torch.compile will graph-break at deep_gemm calls")
    REGISTERED = False


def _resolve_is_compiling():
    """torch.compiler.is_compiling, resolved once (Dynamo folds it to True while tracing); always
    False when the ops do not exist, so that tracing graph-breaks instead of failing."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return fn if REGISTERED and fn is not None else (lambda: False)


is_compiling = _resolve_is_compiling()
