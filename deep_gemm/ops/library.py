"""torch.library custom ops, so that torch.compile(fullgraph=True) and torch.export see each
public deep_gemm call as one opaque operator instead of breaking the graph at it.

    deep_gemm::gemm_fp8_fp8_bf16_nt(a, sa, b, sb) -> out
    deep_gemm::gemm_fp8_fp8_bf16_nt_out(a, sa, b, sb, out!) -> ()
    deep_gemm::m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, out!, m_indices, check_indices) -> ()
    deep_gemm::m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, out!, masked_m, expected_m) -> ()
    deep_gemm::per_token_cast_to_fp8(x) -> (q, scales)
    deep_gemm::per_block_cast_to_fp8(x) -> (q, scales)

The real kernels are the public Python functions themselves; the fake kernels give the exact
shapes and strides those functions return. The public functions route here only while being
traced (``is_compiling()``), so eager calls pay one cheap check and nothing else.

No ``from __future__ import annotations`` here: some torch versions read the op signatures.
"""
import torch

_FP8 = torch.float8_e4m3fn
_GEMM_ARGS = "Tensor a, Tensor sa, Tensor b, Tensor sb"
# name -> (schema, names of mutated arguments)
SCHEMAS = {
    "gemm_fp8_fp8_bf16_nt": (f"({_GEMM_ARGS}) -> Tensor", ()),
    "gemm_fp8_fp8_bf16_nt_out": (f"({_GEMM_ARGS}, Tensor(a!) out) -> ()", ("out",)),
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": (
        f"({_GEMM_ARGS}, Tensor(a!) out, Tensor m_indices, bool check_indices=False) -> ()", ("out",)),
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked": (
        f"({_GEMM_ARGS}, Tensor(a!) out, Tensor masked_m, int expected_m) -> ()", ("out",)),
    "per_token_cast_to_fp8": ("(Tensor x) -> (Tensor, Tensor)", ()),
    "per_block_cast_to_fp8": ("(Tensor x) -> (Tensor, Tensor)", ()),
}


def _resolve_is_compiling():
    """torch.compiler.is_compiling (torch >= 2.3), else the older spelling. Resolved once: the
    public functions call it on every eager call. Dynamo knows these functions and folds them
    to True while tracing."""
    compiler = getattr(torch, "compiler", None)
    fn = getattr(compiler, "is_compiling", None)
    if fn is None:
        fn = getattr(getattr(torch, "_utils", None), "is_compiling", None)
    return fn or (lambda: False)


def _eager(fn, *args):
    """Run a public function's eager path. Newer torch keeps is_compiling() True for the whole
    of a compilation, in which inductor may run a real kernel (constant folding); the public
    function would then route straight back to its op, so lower the flag for that call."""
    if not is_compiling():
        return fn(*args)
    old = getattr(torch.compiler, "_is_compiling_flag", None)
    if not isinstance(old, bool):
        return fn(*args)
    torch.compiler._is_compiling_flag = False
    try:
        return fn(*args)
    finally:
        torch.compiler._is_compiling_flag = old


# ---- real kernels: the public functions ---------------------------------------------------

def _gemm(a, sa, b, sb):
    from .gemm import gemm_fp8_fp8_bf16_nt
    return _eager(gemm_fp8_fp8_bf16_nt, (a, sa), (b, sb))


def _gemm_out(a, sa, b, sb, out):
    from .gemm import gemm_fp8_fp8_bf16_nt
    _eager(gemm_fp8_fp8_bf16_nt, (a, sa), (b, sb), out)


def _contiguous(a, sa, b, sb, out, m_indices, check_indices=False):
    from .grouped import m_grouped_gemm_fp8_fp8_bf16_nt_contiguous as fn
    _eager(fn, (a, sa), (b, sb), out, m_indices, check_indices)


def _masked(a, sa, b, sb, out, masked_m, expected_m):
    from .grouped import m_grouped_gemm_fp8_fp8_bf16_nt_masked as fn
    _eager(fn, (a, sa), (b, sb), out, masked_m, expected_m)


def tma_scales_strides(shape) -> tuple:
    """Strides of column-major TMA-aligned scales [*, M, KB] as get_col_major_tma_aligned_tensor
    allocates them: a [G, KB, aligned M] buffer, transposed (torch counts sizes of 0 as 1)."""
    m, kb = shape[-2], shape[-1]
    col = max((m + 3) // 4 * 4, 1)
    return (1, col) if len(shape) == 2 else (col * max(kb, 1), 1, col)


def _tma_scales(s):
    """The same values in exactly tma_scales_strides' layout, as the fake kernel promises.
    A cast may return other strides on dimensions of size 1 (which address nothing): those are
    re-labelled without a copy; any other layout is copied."""
    want = tma_scales_strides(s.shape)
    if s.stride() == want:
        return s
    from ..utils import is_col_major_tma_aligned
    if is_col_major_tma_aligned(s):
        return s.as_strided(s.shape, want)
    return _new_tma_scales(s, s.shape).copy_(s)


def _new_tma_scales(like, shape):
    m, kb = shape[-2], shape[-1]
    buf = like.new_empty((*shape[:-2], kb, (m + 3) // 4 * 4), dtype=torch.float32)
    return buf.transpose(-1, -2)[..., :m, :]


def _contiguous_strides(t):
    """t contiguous with exactly torch.empty's strides: `.contiguous()` keeps any stride on a
    dimension of size 1 (a [1, K] slice of a wider row keeps its row stride), fake tensors don't."""
    t = t.contiguous()
    want, step = [], 1
    for size in reversed(t.shape):
        want.append(step)
        step *= max(size, 1)
    want = tuple(reversed(want))
    return t if t.stride() == want else t.as_strided(t.shape, want)


def _per_token(x):
    from ..utils import per_token_cast_to_fp8
    q, s = _eager(per_token_cast_to_fp8, x)
    return _contiguous_strides(q), _tma_scales(s)


def _per_block(x):
    from ..utils import per_block_cast_to_fp8
    q, s = _eager(per_block_cast_to_fp8, x)
    return _contiguous_strides(q), _contiguous_strides(s)


# ---- fake kernels: shapes, dtypes and strides only (no data, no data_ptr) -----------------

def _check_pair(x, s, name: str, dims: int):
    if x.dtype != _FP8:
        raise TypeError(f"{name}[0] must be torch.float8_e4m3fn, got {x.dtype}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name}[1] must be torch.float32 scales, got {s.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name}[0] must be {dims}-D, got shape {tuple(x.shape)}")


def _check_gemm(a, sa, b, sb, a_dims: int, b_dims: int):
    _check_pair(a, sa, "lhs", a_dims)
    _check_pair(b, sb, "rhs", b_dims)
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
    m = a.shape[0]
    if n % 8 == 0:
        return a.new_empty((m, n), dtype=torch.bfloat16)
    # As validation._alloc_out: rows padded to 16 bytes for TMA, a view of the first n columns.
    return a.new_empty((m, (n + 7) // 8 * 8), dtype=torch.bfloat16)[:, :n]


def _gemm_out_fake(a, sa, b, sb, out):
    _check_out(out, (a.shape[0], _check_gemm(a, sa, b, sb, 2, 2)))


def _contiguous_fake(a, sa, b, sb, out, m_indices, check_indices=False):
    _check_out(out, (a.shape[0], _check_gemm(a, sa, b, sb, 2, 3)))


def _masked_fake(a, sa, b, sb, out, masked_m, expected_m):
    _check_out(out, (*a.shape[:2], _check_gemm(a, sa, b, sb, 3, 3)))


def _check_cast(x):
    from ..reference import _check_cast_input  # dtype / rank checks only: safe on fake tensors
    _check_cast_input(x, "x")


def _per_token_fake(x):
    _check_cast(x)
    shape = (*x.shape[:-1], (x.shape[-1] + 127) // 128)
    return x.new_empty(x.shape, dtype=_FP8), _new_tma_scales(x, shape)


def _per_block_fake(x):
    _check_cast(x)
    shape = (*x.shape[:-2], (x.shape[-2] + 127) // 128, (x.shape[-1] + 127) // 128)
    return x.new_empty(x.shape, dtype=_FP8), x.new_empty(shape, dtype=torch.float32)


_KERNELS = {
    "gemm_fp8_fp8_bf16_nt": (_gemm, _gemm_fake),
    "gemm_fp8_fp8_bf16_nt_out": (_gemm_out, _gemm_out_fake),
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": (_contiguous, _contiguous_fake),
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked": (_masked, _masked_fake),
    "per_token_cast_to_fp8": (_per_token, _per_token_fake),
    "per_block_cast_to_fp8": (_per_block, _per_block_fake),
}


# ---- registration -------------------------------------------------------------------------

def _register() -> bool:
    """Define every op; False (routing stays off, torch.compile graph-breaks at deep_gemm
    calls but works) when this torch has no usable torch.library API."""
    lib = torch.library
    if hasattr(torch.ops, "deep_gemm") and hasattr(torch.ops.deep_gemm, "per_block_cast_to_fp8"):
        return True  # already defined (module reloaded): defining again would raise
    if hasattr(lib, "custom_op") and hasattr(lib, "register_fake"):           # torch >= 2.4
        for name, (schema, mutated) in SCHEMAS.items():
            real, fake = _KERNELS[name]
            op = lib.custom_op(f"deep_gemm::{name}", real, mutates_args=mutated, schema=schema)
            op.register_fake(fake)
        return True
    impl_abstract = getattr(lib, "impl_abstract", None)                        # torch 2.2 / 2.3
    if impl_abstract is None or not hasattr(lib, "Library"):
        return False
    global _LIB
    _LIB = lib.Library("deep_gemm", "DEF")  # kept alive: the definitions die with it
    for name, (schema, _) in SCHEMAS.items():
        real, fake = _KERNELS[name]
        _LIB.define(name + schema)
        _LIB.impl(name, real, "CompositeExplicitAutograd")
        impl_abstract(f"deep_gemm::{name}", lib=_LIB)(fake)
    return True


try:
    REGISTERED = _register()
except Exception as e:  # never let an exotic torch break `import deep_gemm`
    import warnings
    warnings.warn(f"deep_gemm: torch.library ops not registered ({type(e).__name__}: {e}); "
                  f"torch.compile will graph-break at deep_gemm calls")
    REGISTERED = False

# What the public functions check first. Off when the ops don't exist: then tracing falls
# back to graph breaks instead of failing on a missing op.
is_compiling = _resolve_is_compiling() if REGISTERED else (lambda: False)


# ---- what the public functions call while being traced -----------------------------------

def _pair(x, name: str):
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{name} must be a (tensor, scales) pair, got {type(x).__name__}")
    return x


def gemm_fp8_fp8_bf16_nt(lhs, rhs, out=None):
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    if out is None:
        return torch.ops.deep_gemm.gemm_fp8_fp8_bf16_nt(a, sa, b, sb)
    torch.ops.deep_gemm.gemm_fp8_fp8_bf16_nt_out(a, sa, b, sb, out)
    return out


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, check_indices=False):
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    torch.ops.deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, sa, b, sb, out, m_indices, check_indices)
    return out


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m):
    a, sa = _pair(lhs, "lhs")
    b, sb = _pair(rhs, "rhs")
    torch.ops.deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, sa, b, sb, out, masked_m, expected_m)
    return out


def per_token_cast_to_fp8(x):
    return torch.ops.deep_gemm.per_token_cast_to_fp8(x)


def per_block_cast_to_fp8(x):
    return torch.ops.deep_gemm.per_block_cast_to_fp8(x)
