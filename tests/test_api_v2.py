"""DeepGEMM 2.x call signatures (deep_gemm/api.py, second half): fp8_gemm_nt/nn/tn/tt,
m_grouped_fp8_gemm_nt_contiguous (m_indices and psum layouts), m_grouped_fp8_gemm_nt_masked and its
alias, and the layout utilities, called the way serving and training engines call DeepGEMM.

The signatures are checked against DeepGEMM's pybind registration (csrc/apis/gemm.hpp,
csrc/apis/layout.hpp of deepseek-ai/DeepGEMM, the 2.x revision with recipe_a/recipe_b and
use_psum_layout / expected_m_for_psum_layout). Every result is compared with float64 on the
dequantised operands (deep_gemm.reference), outputs are poisoned first, and every bad input must
raise TypeError or ValueError naming the 2.x argument. CPU tensors run the reference path; the
`cuda` parameters and the graph test run on a Hopper GPU only.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import deep_gemm
from deep_gemm import api
from deep_gemm.config import Layout
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs

ALIGN = 128
BF16 = torch.bfloat16
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
EMPTY = inspect.Parameter.empty


# ---- helpers ------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, device):
    return torch.randn(*shape, generator=gen).to(device, BF16)


def _lhs(shape, gen, device):
    return deep_gemm.per_token_cast_to_fp8(_randn(shape, gen, device))


def _rhs(shape, gen, device):
    return deep_gemm.per_block_cast_to_fp8(_randn(shape, gen, device))


def _poisoned(shape, device):
    return torch.full(shape, float("nan"), dtype=BF16, device=device)


def _ref(a, b):
    """float64 A @ B^T of the dequantised operands (a: [.., M, K] pair, b: [N, K] pair)."""
    return dequantize_lhs(*a, dtype=torch.float64) @ dequantize_rhs(*b, dtype=torch.float64).transpose(-1, -2)


def _check(out, ref):
    assert not torch.isnan(out).any(), "NaN left in rows that must be written"
    assert calc_diff(out.cpu(), ref.cpu()) < 1e-5


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def _psum_ends(sizes):
    """DeepGEMM's psum grouped_layout for group sizes: each group's end row, the next group
    starting at that end rounded up to the alignment."""
    ends, start = [], 0
    for size in sizes:
        ends.append(start + size)
        start = _align(start + size)
    return ends


def _psum_rows(sizes, m):
    """The expected group of each of m rows (-1: gap or past the last group), in plain Python."""
    rows = [-1] * m
    start = 0
    for g, size in enumerate(sizes):
        for r in range(start, min(start + size, m)):
            rows[r] = g
        start = _align(start + size)
    return rows


# ---- signatures ----------------------------------------------------------------------------------
_RECIPES = [("recipe", None), ("recipe_a", None), ("recipe_b", None)]
_DENSE = [("a", EMPTY), ("b", EMPTY), ("d", EMPTY), ("c", None)] + _RECIPES
SIGNATURES = {   # as DeepGEMM 2.x registers them (py::arg names, order, defaults)
    "fp8_gemm_nt": _DENSE + [("compiled_dims", "nk"), ("disable_ue8m0_cast", False)],
    "fp8_gemm_nn": _DENSE + [("compiled_dims", "nk"), ("disable_ue8m0_cast", False)],
    "fp8_gemm_tn": _DENSE + [("compiled_dims", "mn"), ("disable_ue8m0_cast", False)],
    "fp8_gemm_tt": _DENSE + [("compiled_dims", "mn"), ("disable_ue8m0_cast", False)],
    "m_grouped_fp8_gemm_nt_contiguous": [("a", EMPTY), ("b", EMPTY), ("d", EMPTY), ("grouped_layout", EMPTY)]
    + _RECIPES + [("compiled_dims", "nk"), ("disable_ue8m0_cast", False), ("use_psum_layout", False),
                  ("expected_m_for_psum_layout", None)],
    "m_grouped_fp8_gemm_nt_masked": [("a", EMPTY), ("b", EMPTY), ("d", EMPTY), ("masked_m", EMPTY),
                                     ("expected_m", EMPTY)] + _RECIPES
    + [("compiled_dims", "nk"), ("disable_ue8m0_cast", False)],
    "transform_sf_into_required_layout": [("sf", EMPTY), ("mn", EMPTY), ("k", EMPTY), ("recipe", EMPTY),
                                          ("num_groups", None), ("is_sfa", None), ("disable_ue8m0_cast", False)],
    "get_mk_alignment_for_contiguous_layout": [],
    "set_mk_alignment_for_contiguous_layout": [("new_value", EMPTY)],
    "get_mn_major_tma_aligned_tensor": [("sf", EMPTY)],
    # v1 names keep their v1 signatures
    "gemm_fp8_fp8_bf16_nt": [("lhs", EMPTY), ("rhs", EMPTY), ("out", None)],
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": [("lhs", EMPTY), ("rhs", EMPTY), ("out", EMPTY),
                                                  ("m_indices", EMPTY), ("check_indices", False)],
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked": [("lhs", EMPTY), ("rhs", EMPTY), ("out", EMPTY),
                                              ("masked_m", EMPTY), ("expected_m", EMPTY)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    params = list(inspect.signature(getattr(deep_gemm, name)).parameters.values())
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)   # positional and keyword, like pybind


def test_exports():
    assert deep_gemm.fp8_m_grouped_gemm_nt_masked is deep_gemm.m_grouped_fp8_gemm_nt_masked
    assert deep_gemm.fp8_gemm_nt is not deep_gemm.gemm_fp8_fp8_bf16_nt   # 2.x adapters, not v1 aliases
    assert deep_gemm.m_grouped_fp8_gemm_nt_contiguous is not deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
    for name in deep_gemm.__all__:
        assert callable(getattr(deep_gemm, name)) or inspect.ismodule(getattr(deep_gemm, name)), name
    for name in ("get_tma_aligned_size", "set_num_sms", "get_num_sms", "get_mk_alignment_for_contiguous_layout",
                 "set_mk_alignment_for_contiguous_layout", "get_mn_major_tma_aligned_tensor",
                 "transform_sf_into_required_layout", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt"):
        assert name in deep_gemm.__all__, name
    assert deep_gemm.get_tma_aligned_size(5, 4) == 8
    assert isinstance(deep_gemm.get_num_sms(), int)


# ---- fp8_gemm_nt -----------------------------------------------------------------------------------
DENSE_CALLS = {   # how engines call it
    "positional": lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d),
    "positional_all": lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, None, (1, 128, 128), None, None, "nk", False),
    "keywords": lambda a, b, d: deep_gemm.fp8_gemm_nt(a=a, b=b, d=d, c=None, recipe=None, compiled_dims="nk",
                                                      disable_ue8m0_cast=True),
    "recipe_pair": lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(1, 128), recipe_b=(128, 128)),
    "recipe_list": lambda a, b, d: deep_gemm.fp8_gemm_nt(list(a), list(b), d, recipe=[1, 128, 128]),
    "compiled_dims": lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, compiled_dims="mnk"),
    "no_compiled_dims": lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, compiled_dims=""),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", sorted(DENSE_CALLS))
@pytest.mark.parametrize("m, n, k", [(1, 128, 128), (64, 136, 384), (130, 256, 200), (0, 64, 128)])
def test_fp8_gemm_nt(device, call, m, n, k):
    gen = _gen(m * 7 + n + k)
    a, b = _lhs((m, k), gen, device), _rhs((n, k), gen, device)
    d = _poisoned((m, n), device)
    assert DENSE_CALLS[call](a, b, d) is None          # like DeepGEMM: d in place, None returned
    if m:
        _check(d, _ref(a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_nt_with_transformed_scales(device):
    """The engines' path: scales laid out by transform_sf_into_required_layout first."""
    gen = _gen(3)
    m, n, k = 96, 256, 512
    x, w = _randn((m, k), gen, device), _randn((n, k), gen, device)
    qa, sa = deep_gemm.per_token_cast_to_fp8(x)
    qb, sb = deep_gemm.per_block_cast_to_fp8(w)
    sa_rows = sa.contiguous()                       # row-major, as a fused quant kernel may leave them
    sa_t = deep_gemm.transform_sf_into_required_layout(sa_rows, m, k, (1, 128, 128), is_sfa=True)
    sb_t = deep_gemm.transform_sf_into_required_layout(sb, n, k, (1, 128, 128), is_sfa=False)
    d = _poisoned((m, n), device)
    deep_gemm.fp8_gemm_nt((qa, sa_t), (qb, sb_t), d)
    _check(d, _ref((qa, sa), (qb, sb)))


# ---- nn / tn / tt: K-major only on Hopper --------------------------------------------------------
@pytest.mark.parametrize("name", ["fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt"])
def test_non_nt_layouts_raise(name):
    gen = _gen(0)
    a, b = _lhs((8, 128), gen, "cpu"), _rhs((16, 128), gen, "cpu")
    d = _poisoned((8, 16), "cpu")
    fn = getattr(deep_gemm, name)
    for call in (lambda: fn(a, b, d), lambda: fn(a=a, b=b, d=d, c=None, compiled_dims="mn")):
        with pytest.raises(ValueError, match=rf"^{name}: .*K-major on Hopper.*fp8_gemm_nt with a transposed cast"):
            call()
    assert torch.isnan(d).all()


# ---- errors -----------------------------------------------------------------------------------------
def _dense_args():
    gen = _gen(1)
    return _lhs((8, 256), gen, "cpu"), _rhs((16, 256), gen, "cpu"), _poisoned((8, 16), "cpu")


DENSE_ERRORS = [
    # (call on (a, b, d), exception, message pattern)
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, c=d), TypeError,
     r"^c \(the addend\) and d must both be torch.float32 to accumulate, got c torch.bfloat16"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d.float(), d.float()[:4]), ValueError, r"^c must have d's shape"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe=(1, 1, 128)), ValueError,
     r"^b\[1\] must have shape \(16, 2\) \(one scale per row and 128-wide K block\)"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(1, 128), recipe_b=(1, 128)), ValueError,
     r"^b\[1\] must have shape \(16, 2\)"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe=(128, 128, 128)), ValueError,
     r"^recipe=\(128, 128, 128\) is not supported on Hopper"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe=(1, 128)), TypeError, r"^recipe must be a tuple of 3"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe="1x128"), TypeError, r"^recipe must be a tuple"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe=(1, 128, 128), recipe_a=(1, 128), recipe_b=(128, 128)),
     ValueError, r"^pass either recipe or recipe_a with recipe_b"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(1, 128)), ValueError, r"recipe_b is missing"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_b=(128, 128)), ValueError, r"recipe_a is missing"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(128, 128), recipe_b=(128, 128)), ValueError,
     r"^recipe_a=\(128, 128\) is not supported"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(1, 128), recipe_b=(64, 128)), ValueError,
     r"^recipe_b=\(64, 128\) is not supported"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, recipe_a=(1, 128.0), recipe_b=(128, 128)), TypeError,
     r"^recipe_a must be a tuple of 2 ints"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, compiled_dims="mx"), ValueError,
     r"^compiled_dims must be made of the letters m, n and k"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, compiled_dims="NK"), ValueError, r"^compiled_dims"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, compiled_dims=None), TypeError, r"^compiled_dims must be a str"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, disable_ue8m0_cast="yes"), TypeError,
     r"^disable_ue8m0_cast must be a bool"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a[0], b, d), TypeError, r"^a must be a \(tensor, scales\) pair"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, (*b, b[1]), d), TypeError, r"^b must be a \(tensor, scales\) pair, got 3"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, None), TypeError, r"^d must be a torch.Tensor"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d.half()), TypeError, r"^d must be torch.bfloat16"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d[:, :5]), ValueError, r"^d must have shape \(8, 16\)"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt((a[0].float(), a[1]), b, d), TypeError,
     r"^a\[0\] must be torch.float8_e4m3fn"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, (b[0], b[1].double()), d), TypeError, r"^b\[1\] must be torch.float32"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, (b[0][:, :128], b[1][:, :1]), d), ValueError,
     r"^b\[0\] must have K = 256 columns like a\[0\]"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt((a[0], a[1][:, :1]), b, d), ValueError, r"^a\[1\] must have shape"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, (b[0], b[1][:, :1]), d), ValueError,
     r"^b\[1\] must have shape \(1, 2\)"),
    (lambda a, b, d: deep_gemm.fp8_gemm_nt(a, b, d, None, None, None, None, "nk", False, None), TypeError,
     r"positional argument"),
]


@pytest.mark.parametrize("case", range(len(DENSE_ERRORS)))
def test_fp8_gemm_nt_errors(case):
    call, exc, pattern = DENSE_ERRORS[case]
    a, b, d = _dense_args()
    with pytest.raises(exc, match=pattern) as info:
        call(a, b, d)
    assert not isinstance(info.value.__cause__, (TypeError, ValueError))   # a clean message, no chained copy
    assert torch.isnan(d).all(), "a rejected call must not write d"


# ---- m_grouped_fp8_gemm_nt_contiguous with m_indices -----------------------------------------------
def _contiguous_inputs(sizes, n, k, device, seed, extra_blocks=1):
    """A with each group's rows padded to the alignment (m_indices -1 on padding), extra_blocks
    whole padding blocks at the end; B [G, N, K]."""
    gen = _gen(seed)
    m_indices = []
    for g, size in enumerate(sizes):
        m_indices += [g] * size + [-1] * (_align(size) - size)
    m_indices += [-1] * (ALIGN * extra_blocks)
    m = len(m_indices)
    a, b = _lhs((m, k), gen, device), _rhs((len(sizes), n, k), gen, device)
    return a, b, torch.tensor(m_indices, dtype=torch.int32, device=device)


def _check_grouped_rows(d, a, b, row_groups):
    """Rows of group g against the reference; rows in whole padding blocks still poisoned."""
    row_groups = torch.as_tensor(row_groups).cpu()
    a64 = dequantize_lhs(*a, dtype=torch.float64)              # dequantised first: no fp8 indexing
    for g in range(b[0].shape[0]):
        rows = (row_groups == g).nonzero().flatten().to(d.device)
        if rows.numel():
            _check(d[rows], a64[rows] @ dequantize_rhs(b[0][g], b[1][g], torch.float64).T)
    for start in range(0, row_groups.numel(), ALIGN):
        if (row_groups[start:start + ALIGN] < 0).all():
            assert torch.isnan(d[start:start + ALIGN]).all(), f"padding block at row {start} was written"


CONTIGUOUS_CALLS = {
    "positional": lambda a, b, d, idx: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, idx),
    "positional_all": lambda a, b, d, idx: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, idx, (1, 128, 128), None, None, "nk", False, False, None),
    "keywords": lambda a, b, d, idx: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a=a, b=b, d=d, grouped_layout=idx, recipe_a=(1, 128), recipe_b=(128, 128), compiled_dims="nk",
        disable_ue8m0_cast=True, use_psum_layout=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", sorted(CONTIGUOUS_CALLS))
def test_contiguous_m_indices(device, call):
    a, b, m_indices = _contiguous_inputs([130, 0, 128, 5], n=256, k=384, device=device, seed=11)
    d = _poisoned((a[0].shape[0], 256), device)
    assert CONTIGUOUS_CALLS[call](a, b, d, m_indices) is None
    _check_grouped_rows(d, a, b, m_indices)


# ---- the psum layout ---------------------------------------------------------------------------------
PSUM_SIZES = [
    [130, 0, 128, 5],       # partial blocks, an empty group, an exactly aligned group
    [0, 0, 7],              # leading empty groups
    [1],                    # one row
    [0, 0, 0],              # nothing at all
    [256, 129, 0],          # a trailing empty group
    [300, 0, 0, 129, 64],
]


def _random_sizes(seed: int, groups: int = 6):
    sizes = torch.randint(0, 300, (groups,), generator=_gen(seed)).tolist()
    sizes[seed % groups] = 0                          # at least one empty group
    return sizes


@pytest.mark.parametrize("extra_rows", [0, 1, 2 * ALIGN])
@pytest.mark.parametrize("sizes", PSUM_SIZES + [_random_sizes(s) for s in range(4)])
def test_psum_rows_of_each_group(sizes, extra_rows):
    """The device-side index: each group's rows, -1 in the gaps and past the last group."""
    ends = _psum_ends(sizes)
    m = _align(ends[-1]) + extra_rows
    a = (torch.empty(m, 128, dtype=torch.float8_e4m3fn), torch.empty(m, 1))
    b = (torch.empty(len(sizes), 16, 128, dtype=torch.float8_e4m3fn), torch.empty(len(sizes), 1, 1))
    idx = api._psum_m_indices(a, b, torch.tensor(ends, dtype=torch.int32))
    assert idx.dtype == torch.int32 and idx.shape == (m,)
    assert idx.tolist() == _psum_rows(sizes, m)


def test_psum_rows_past_m_are_ignored():
    sizes = [200, 100]
    ends = _psum_ends(sizes)                     # [200, 356]
    for m in (0, 150, 300):
        a = (torch.empty(m, 128, dtype=torch.float8_e4m3fn), torch.empty(m, 1))
        b = (torch.empty(2, 16, 128, dtype=torch.float8_e4m3fn), torch.empty(2, 1, 1))
        assert api._psum_m_indices(a, b, torch.tensor(ends, dtype=torch.int32)).tolist() == _psum_rows(sizes, m)


PSUM_CALLS = {
    "keywords": lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl, use_psum_layout=True),
    "with_hint": lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, gl, use_psum_layout=True, expected_m_for_psum_layout=128),
    "positional_all": lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, gl, None, (1, 128), (128, 128), "nk", False, True, 96),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", sorted(PSUM_CALLS))
@pytest.mark.parametrize("seed", range(3))
def test_contiguous_psum_layout(device, call, seed):
    sizes = _random_sizes(seed, groups=5)
    ends = _psum_ends(sizes)
    m = _align(ends[-1]) + 2 * ALIGN                  # two whole padding blocks at the end
    n, k = 256, 384
    gen = _gen(100 + seed)
    a, b = _lhs((m, k), gen, device), _rhs((len(sizes), n, k), gen, device)
    grouped_layout = torch.tensor(ends, dtype=torch.int32, device=device)
    before = grouped_layout.clone()
    d = _poisoned((m, n), device)
    assert PSUM_CALLS[call](a, b, d, grouped_layout) is None
    _check_grouped_rows(d, a, b, _psum_rows(sizes, m))
    assert torch.equal(grouped_layout, before)


def _grouped_args(use_psum: bool):
    a, b, m_indices = _contiguous_inputs([130, 5], n=64, k=128, device="cpu", seed=5)
    gl = torch.tensor(_psum_ends([130, 5]), dtype=torch.int32) if use_psum else m_indices
    return a, b, _poisoned((a[0].shape[0], 64), "cpu"), gl


CONTIGUOUS_ERRORS = [
    # (use_psum_layout, call on (a, b, d, grouped_layout), exception, pattern)
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl.long()), TypeError,
     r"^grouped_layout must be torch.int32"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl[:-1]), ValueError,
     r"^grouped_layout must have shape \(512,\) \(the group of each row of a\[0\]"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl.tolist()), TypeError,
     r"^grouped_layout must be a torch.Tensor"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl, expected_m_for_psum_layout=64),
     ValueError, r"^expected_m_for_psum_layout is only meaningful with use_psum_layout=True"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d.float(), gl), ValueError,
     r"^d of torch.float32 is not supported by the M-grouped GEMMs"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d[:, :8], gl), ValueError,
     r"^d must have shape"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, (b[0][0], b[1][0]), d, gl),
     ValueError, r"^b\[0\] must be 3-D"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl, recipe=(1, 1, 128)),
     ValueError, r"^recipe=\(1, 1, 128\) \(per-row B scales\) is not supported by the M-grouped GEMMs"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl, compiled_dims="kx"),
     ValueError, r"^compiled_dims"),
    (False, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl, use_psum_layout="yes"),
     TypeError, r"^use_psum_layout must be a bool"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl.long(), use_psum_layout=True),
     TypeError, r"^grouped_layout must be torch.int32"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl[:1], use_psum_layout=True),
     ValueError, r"^grouped_layout must have shape \(2,\) with use_psum_layout=True"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl[None], use_psum_layout=True),
     ValueError, r"^grouped_layout must have shape \(2,\)"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, torch.stack([gl, gl], 1)[:, 0], use_psum_layout=True), ValueError,
     r"^grouped_layout must be contiguous"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, gl.to("meta"),
                                                                           use_psum_layout=True),
     ValueError, r"^grouped_layout is on meta but a\[0\] is on cpu"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, None, use_psum_layout=True),
     TypeError, r"^grouped_layout must be a torch.Tensor"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, gl, use_psum_layout=True, expected_m_for_psum_layout=0), ValueError,
     r"^expected_m_for_psum_layout must be >= 1"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, gl, use_psum_layout=True, expected_m_for_psum_layout=64.0), TypeError,
     r"^expected_m_for_psum_layout must be an int"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a[0], b, d, gl, use_psum_layout=True),
     TypeError, r"^a must be a \(tensor, scales\) pair"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, (b[0][0], b[1][0]), d, gl,
                                                                           use_psum_layout=True),
     ValueError, r"^b\[0\] must be 3-D \[G, N, K\]"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a[0][None], a[1]), b, d, gl,
                                                                           use_psum_layout=True),
     ValueError, r"^a\[0\] must be 2-D \[M, K\]"),
    (True, lambda a, b, d, gl: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d[:-1], gl, use_psum_layout=True),
     ValueError, r"^d must have shape"),
]


@pytest.mark.parametrize("case", range(len(CONTIGUOUS_ERRORS)))
def test_contiguous_errors(case):
    use_psum, call, exc, pattern = CONTIGUOUS_ERRORS[case]
    a, b, d, gl = _grouped_args(use_psum)
    with pytest.raises(exc, match=pattern):
        call(a, b, d, gl)
    assert torch.isnan(d).all()


# ---- m_grouped_fp8_gemm_nt_masked ----------------------------------------------------------------------
MASKED_CALLS = {
    "positional": lambda a, b, d, mm, em: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm, em),
    "alias": lambda a, b, d, mm, em: deep_gemm.fp8_m_grouped_gemm_nt_masked(a, b, d, mm, em),
    "alias_keywords": lambda a, b, d, mm, em: deep_gemm.fp8_m_grouped_gemm_nt_masked(
        a, b, d, mm, em, compiled_dims="nk", disable_ue8m0_cast=True),
    "keywords": lambda a, b, d, mm, em: deep_gemm.m_grouped_fp8_gemm_nt_masked(
        a=a, b=b, d=d, masked_m=mm, expected_m=em, recipe=(1, 128, 128)),
    "positional_all": lambda a, b, d, mm, em: deep_gemm.m_grouped_fp8_gemm_nt_masked(
        a, b, d, mm, em, None, (1, 128), (128, 128), "nk", False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", sorted(MASKED_CALLS))
def test_masked(device, call):
    gen = _gen(21)
    g, max_m, n, k = 4, 192, 256, 384
    a, b = _lhs((g, max_m, k), gen, device), _rhs((g, n, k), gen, device)
    masked = [192, 0, 1, 77]
    masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
    d = _poisoned((g, max_m, n), device)
    assert MASKED_CALLS[call](a, b, d, masked_m, 64) is None
    for i, rows in enumerate(masked):
        if rows:
            _check(d[i, :rows], _ref((a[0][i, :rows], a[1][i, :rows]), (b[0][i], b[1][i])))
        assert torch.isnan(d[i, rows:]).all(), f"group {i}: rows past masked_m were written"


def _masked_args():
    gen = _gen(2)
    a, b = _lhs((2, 64, 128), gen, "cpu"), _rhs((2, 32, 128), gen, "cpu")
    return a, b, _poisoned((2, 64, 32), "cpu"), torch.tensor([3, 64], dtype=torch.int32)


MASKED_ERRORS = [
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm, 16.0), TypeError,
     r"^expected_m must be a Python int"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm, 0), ValueError,
     r"^expected_m must be a positive int"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm.long(), 16), TypeError,
     r"^masked_m must be torch.int32"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm[:1], 16), ValueError,
     r"^masked_m must have shape \(2,\)"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d[:, :8], mm, 16), ValueError,
     r"^d must have shape \(2, 64, 32\)"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d.float(), mm, 16), ValueError,
     r"^d of torch.float32 is not supported by the M-grouped GEMMs"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm, 16, recipe_a=(1, 128),
                                                                recipe_b=(1, 128)),
     ValueError, r"^recipe_b=\(1, 128\) \(per-row B scales\) is not supported by the M-grouped GEMMs"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, mm, 16, compiled_dims=1), TypeError,
     r"^compiled_dims must be a str"),
    (lambda a, b, d, mm: deep_gemm.m_grouped_fp8_gemm_nt_masked((a[0][0], a[1][0]), b, d, mm, 16), ValueError,
     r"^a\[0\] must be 3-D \[G, max_m, K\]"),
    (lambda a, b, d, mm: deep_gemm.fp8_m_grouped_gemm_nt_masked(a, b[0], d, mm, 16), TypeError,
     r"^b must be a \(tensor, scales\) pair"),
]


@pytest.mark.parametrize("case", range(len(MASKED_ERRORS)))
def test_masked_errors(case):
    call, exc, pattern = MASKED_ERRORS[case]
    a, b, d, mm = _masked_args()
    with pytest.raises(exc, match=pattern):
        call(a, b, d, mm)
    assert torch.isnan(d).all()


# ---- utilities ---------------------------------------------------------------------------------------
def test_mk_alignment():
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == 128 == deep_gemm.get_m_alignment_for_contiguous_layout()
    assert deep_gemm.set_mk_alignment_for_contiguous_layout(128) is None
    with pytest.raises(ValueError, match=r"fixed at 128 rows on Hopper \(the only supported value\), got 64"):
        deep_gemm.set_mk_alignment_for_contiguous_layout(64)
    with pytest.raises(TypeError, match=r"^new_value must be an int"):
        deep_gemm.set_mk_alignment_for_contiguous_layout("128")
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == 128


@pytest.mark.parametrize("shape", [(5, 3), (8, 1), (1, 4), (2, 7, 3), (3, 130, 57)])
def test_get_mn_major_tma_aligned_tensor(shape):
    sf = torch.randn(*shape)
    out = deep_gemm.get_mn_major_tma_aligned_tensor(sf)
    assert torch.equal(out, sf)
    assert deep_gemm.utils.is_col_major_tma_aligned(out)
    mn, sf_k = shape[-2], shape[-1]
    aligned = (mn + 3) // 4 * 4
    if mn > 1 and sf_k > 1:
        assert out.stride()[-2:] == (1, aligned)
    assert deep_gemm.get_mn_major_tma_aligned_tensor(out) is out      # already laid out: no copy
    with pytest.raises(TypeError, match=r"^sf must be float32"):
        deep_gemm.get_mn_major_tma_aligned_tensor(sf.to(torch.int32))
    with pytest.raises(ValueError, match=r"^sf must be 2-D"):
        deep_gemm.get_mn_major_tma_aligned_tensor(sf.flatten())
    with pytest.raises(TypeError, match=r"^sf must be a torch.Tensor"):
        deep_gemm.get_mn_major_tma_aligned_tensor(sf.tolist())


@pytest.mark.parametrize("num_groups", [None, 3])
def test_transform_sf_into_required_layout(num_groups):
    mn_a, mn_b, k = 130, 300, 1000
    lead = (num_groups,) if num_groups else ()
    sfa = torch.rand(*lead, mn_a, 8) + 0.5
    sfb = torch.rand(*lead, 3, 8) + 0.5
    transform = deep_gemm.transform_sf_into_required_layout
    for out in (transform(sfa, mn_a, k, (1, 128, 128), num_groups, True),
                transform(sf=sfa, mn=mn_a, k=k, recipe=(1, 128), num_groups=num_groups),
                transform(sfa, mn_a, k, (1, 128, 128), num_groups=num_groups, is_sfa=True, disable_ue8m0_cast=True)):
        assert torch.equal(out, sfa) and deep_gemm.utils.is_col_major_tma_aligned(out)
        assert out.stride(-1) == 132 and out.stride(-2) == 1
    assert transform(sfb, mn_b, k, (1, 128, 128), num_groups, False) is sfb        # per block: unchanged
    assert transform(sfb, mn_b, k, (128, 128), num_groups=num_groups) is sfb
    col = sfb.transpose(-1, -2).contiguous().transpose(-1, -2)                     # MN-major per-block scales
    row = transform(col, mn_b, k, (128, 128), num_groups=num_groups)
    assert torch.equal(row, sfb) and row.is_contiguous()


TRANSFORM_ERRORS = [
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 128, 128)), ValueError,
     r"^is_sfa must be True \(sf holds A's scales\) or False"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 128), is_sfa=True), ValueError,
     r"^is_sfa must be None with a 2-element"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (128, 128, 128), is_sfa=True), ValueError,
     r"A's scales on Hopper are per 1x128 block"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 64, 128), is_sfa=False), ValueError,
     r"B's scales on Hopper are per 128x128 block"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 32)), ValueError,
     r"^recipe=\(1, 32\) is not a Hopper scale granularity"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, 128), TypeError, r"^recipe must be a 3-tuple"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 128.0)), TypeError,
     r"^recipe must be a tuple of 2 ints"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 131, 1000, (1, 128)), ValueError,
     r"^sf must have shape \(131, 8\)"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 128), num_groups=2), ValueError,
     r"^sf must have shape \(2, 130, 8\)"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf.view(torch.int32), 130, 1000, (1, 128)), ValueError,
     r"^sf holds packed UE8M0 scales \(int32\), Blackwell's format"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf.double(), 130, 1000, (1, 128)), TypeError,
     r"^sf must be float32"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf.tolist(), 130, 1000, (1, 128)), TypeError,
     r"^sf must be a torch.Tensor"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130.0, 1000, (1, 128)), TypeError, r"^mn must be an int"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 0, (1, 128)), ValueError, r"^k must be >= 1"),
    (lambda sf: deep_gemm.transform_sf_into_required_layout(sf, 130, 1000, (1, 128), num_groups=0), ValueError,
     r"^num_groups must be >= 1"),
]


@pytest.mark.parametrize("case", range(len(TRANSFORM_ERRORS)))
def test_transform_sf_errors(case):
    call, exc, pattern = TRANSFORM_ERRORS[case]
    with pytest.raises(exc, match=pattern):
        call(torch.rand(130, 8))


# ---- one pipeline call each; torch.compile ----------------------------------------------------------
def _small_problem(device="cpu"):
    gen = _gen(9)
    sizes = [130, 0, 60]
    ends = _psum_ends(sizes)
    a, b, m_indices = _contiguous_inputs(sizes, n=64, k=128, device=device, seed=9)
    am = _lhs((3, 64, 128), gen, device)
    return (a, (b[0][0], b[1][0]), b, m_indices, torch.tensor(ends, dtype=torch.int32, device=device), am,
            torch.tensor([64, 0, 7], dtype=torch.int32, device=device))


def _all_calls(a, w, b, m_indices, ends, am, masked_m):
    m = a[0].shape[0]
    d = torch.zeros(m, 64, dtype=BF16, device=a[0].device)
    deep_gemm.fp8_gemm_nt(a, w, d, recipe=(1, 128, 128), compiled_dims="nk")
    dc = torch.zeros(m, 64, dtype=BF16, device=a[0].device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, dc, m_indices)
    dp = torch.zeros(m, 64, dtype=BF16, device=a[0].device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, dp, ends, use_psum_layout=True, expected_m_for_psum_layout=64)
    dm = torch.zeros(3, 64, 64, dtype=BF16, device=a[0].device)
    deep_gemm.fp8_m_grouped_gemm_nt_masked(am, b, dm, masked_m, 32)
    return d, dc, dp, dm


def test_each_adapter_is_one_pipeline_call(pipeline_runs):
    runs = pipeline_runs
    d, dc, dp, dm = _all_calls(*_small_problem())
    assert runs == [Layout.DENSE, Layout.CONTIGUOUS, Layout.CONTIGUOUS, Layout.MASKED]
    assert torch.equal(dc, dp)      # the psum layout of the same groups is the same computation


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_adapters_trace_to_custom_ops(_fresh_dynamo):
    inputs = _small_problem()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    got = torch.compile(_all_calls, fullgraph=True, backend=backend)(*inputs)
    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert {"deep_gemm.gemm_fp8_fp8_bf16_nt_out", "deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
            "deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked"} <= targets
    want = _all_calls(*inputs)
    torch._dynamo.reset()
    again = torch.compile(_all_calls, fullgraph=True, backend="aot_eager")(*inputs)
    for x, y, z in zip(got, want, again):
        assert torch.equal(x, y) and torch.equal(z, y)


def test_errors_while_tracing_name_the_argument(_fresh_dynamo):
    a, w, *_ = _small_problem()

    def bad(a, w):
        d = torch.zeros(a[0].shape[0], 64, dtype=torch.float16)
        deep_gemm.fp8_gemm_nt(a, w, d)
        return d
    with pytest.raises(Exception, match=r"d must be torch.bfloat16 or torch.float32"):
        torch.compile(bad, fullgraph=True, backend="aot_eager")(a, w)


# ---- Hopper: CUDA graph capture of the psum layout -----------------------------------------------
@pytest.mark.gpu
def test_psum_layout_cuda_graph_replays_other_group_sizes():
    """Captured once; replayed after other group sizes (empty groups included) are written into
    grouped_layout in place: the rows' groups are recomputed on the device at every replay."""
    g, n, k = 4, 256, 512
    m = 8 * ALIGN
    gen = _gen(42)
    a, b = _lhs((m, k), gen, "cuda"), _rhs((g, n, k), gen, "cuda")
    first = [200, 0, 128, 17]
    grouped_layout = torch.tensor(_psum_ends(first), dtype=torch.int32, device="cuda")
    d = _poisoned((m, n), "cuda")

    def run():
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout=True)

    run()                                   # eager warm-up: compiles and loads the kernel (capture cannot)
    torch.cuda.synchronize()
    _check_grouped_rows(d, a, b, _psum_rows(first, m))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for sizes in ([5, 300, 0, 130], [0, 0, 0, 1], [512, 0, 0, 0], [100, 100, 100, 100]):
        assert _align(_psum_ends(sizes)[-1]) <= m
        grouped_layout.copy_(torch.tensor(_psum_ends(sizes), dtype=torch.int32))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_grouped_rows(d, a, b, _psum_rows(sizes, m))
