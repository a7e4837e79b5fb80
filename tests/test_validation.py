"""Argument checks: each bad input raises the right exception type, naming the argument (CPU).

deep_gemm.ops.validation.check_gemm(layout, lhs, rhs, out, index, expected_m) is the one check
every GEMM goes through (ops/gemm.run); the public functions are also exercised here, since on
CPU tensors they validate and then run the reference.
"""
import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import deep_gemm
from deep_gemm import reference
from deep_gemm.config import Layout
from deep_gemm.ops import validation
from deep_gemm.ops.validation import GemmArgs, check_gemm
from deep_gemm.utils import get_tma_aligned_size

FP8 = torch.float8_e4m3fn
ROOT = pathlib.Path(__file__).resolve().parents[1]
DENSE, CONTIGUOUS, MASKED = Layout.DENSE, Layout.CONTIGUOUS, Layout.MASKED


def check_dense(lhs, rhs, out=None):
    return check_gemm(DENSE, lhs, rhs, out)


def check_contiguous(lhs, rhs, out, m_indices):
    return check_gemm(CONTIGUOUS, lhs, rhs, out, m_indices)


def check_masked(lhs, rhs, out, masked_m, expected_m):
    return check_gemm(MASKED, lhs, rhs, out, masked_m, expected_m)


def dense(m=64, n=256, k=256):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(n, k))
    return (a, sa), (b, sb)


def misaligned_fp8(m, k):
    """An fp8 [m, k] tensor whose data pointer is 1 byte past a 16-byte boundary."""
    flat = torch.randn(m * k + 16).to(FP8)
    return flat[1:1 + m * k].view(m, k)


# ---------------------------------------------------------------------------------------------
# Dense: happy paths.
# ---------------------------------------------------------------------------------------------
def test_dense_happy_path_keeps_tensors():
    lhs, rhs = dense()
    out = torch.empty(64, 256, dtype=torch.bfloat16)
    args = check_dense(lhs, rhs, out)
    assert isinstance(args, GemmArgs) and args.layout == DENSE
    assert args.a is lhs[0] and args.sa is lhs[1] and args.b is rhs[0] and args.sb is rhs[1] and args.out is out
    assert (args.m, args.n, args.k, args.num_groups, args.expected_m) == (64, 256, 256, 1, 64)
    assert args.index is None


def test_dense_allocates_out_and_normalises_row_major_sa():
    (a, sa), rhs = dense(m=33, k=320)
    row_major = sa.contiguous()
    args = check_dense((a, row_major), rhs)
    assert args.out.dtype == torch.bfloat16 and args.out.shape == (33, 256)
    assert args.sa.stride() == (1, get_tma_aligned_size(33, 4))
    assert torch.equal(args.sa, row_major)


def test_dense_out_rows_padded_when_n_breaks_alignment():
    lhs, rhs = dense(n=100)
    args = check_dense(lhs, rhs)
    assert args.out.shape == (64, 100) and args.out.stride(0) * 2 % 16 == 0


def test_dense_m_zero_and_one():
    lhs, rhs = dense(m=0)
    assert check_dense(lhs, rhs).out.shape == (0, 256)
    # A single row whose row stride is meaningless (a [1, K] slice of a wider tensor).
    big = torch.randn(4, 200).to(FP8)
    (a, sa), rhs = dense(m=1, k=112)
    odd = big[:1, :112]
    assert odd.stride(0) == 200
    args = check_dense((odd, sa), rhs)
    assert args.a.stride(0) % 16 == 0 and torch.equal(args.a.float(), odd.float())
    assert args.a.data_ptr() == odd.data_ptr()          # a relabelled view, not a copy


# ---------------------------------------------------------------------------------------------
# Dense: every error path.
# ---------------------------------------------------------------------------------------------
def _bad_dense_cases():
    (a, sa), (b, sb) = dense()
    out = torch.empty(64, 256, dtype=torch.bfloat16)
    big_a = torch.randn(64, 256 + 8).to(FP8)
    odd_sa = torch.rand(64, 3)[:, :2]                      # neither row-major nor col-major
    return [
        # (lhs, rhs, out, exception, message pattern)
        ([a, sa, sa], (b, sb), None, TypeError, r"lhs.*pair.*3 items"),
        (a, (b, sb), None, TypeError, r"lhs"),
        ((a, sa), "rhs", None, TypeError, r"rhs.*pair"),
        ((1, sa), (b, sb), None, TypeError, r"lhs\[0\]"),
        ((a, sa.tolist()), (b, sb), None, TypeError, r"lhs\[1\]"),
        ((a.float(), sa), (b, sb), None, TypeError, r"lhs\[0\].*float8_e4m3fn"),
        ((a, sa.double()), (b, sb), None, TypeError, r"lhs\[1\].*float32"),
        ((a, sa), (b.to(torch.bfloat16), sb), None, TypeError, r"rhs\[0\]"),
        ((a, sa), (b, sb.half()), None, TypeError, r"rhs\[1\]"),
        ((a[None], sa), (b, sb), None, ValueError, r"lhs\[0\].*2-D"),
        ((a, sa), (b[None], sb), None, ValueError, r"rhs\[0\].*2-D"),
        ((a, sa), (b[:, :128], sb), None, ValueError, r"rhs\[0\].*K = 256"),
        ((a, sa[:, :1]), (b, sb), None, ValueError, r"lhs\[1\].*shape"),
        ((a, sa[None]), (b, sb), None, ValueError, r"lhs\[1\].*shape"),     # wrong rank of scales
        ((a, sa[:, 0]), (b, sb), None, ValueError, r"lhs\[1\].*shape"),
        ((a, sa), (b, sb[:1]), None, ValueError, r"rhs\[1\].*shape"),
        ((a, odd_sa), (b, sb), None, ValueError, r"lhs\[1\].*row-major.*column-major"),
        ((a, sa), (b, sb.t().contiguous().t()), None, ValueError, r"rhs\[1\].*contiguous"),
        ((big_a[:, :256], sa), (b, sb), None, ValueError, r"lhs\[0\].*16 bytes"),
        ((a, sa), (b.t().contiguous().t(), sb), None, ValueError, r"rhs\[0\].*stride"),
        ((misaligned_fp8(64, 256), sa), (b, sb), None, ValueError, r"lhs\[0\].*16-byte aligned"),
        ((a, sa), (b, sb), "out", TypeError, r"out"),
        ((a, sa), (b, sb), out.float(), TypeError, r"out.*bfloat16"),
        ((a, sa), (b, sb), out[:, :128], ValueError, r"out.*shape"),
        # Rows of out must be contiguous (any row stride is fine: the op stages it).
        ((a, sa), (b, sb), torch.empty(256, 64, dtype=torch.bfloat16).t(), ValueError, r"out.*contiguous rows"),
    ]


def test_dense_out_with_unaligned_rows_is_accepted_for_staging():
    """out rows that TMA cannot address directly are written through an aligned buffer."""
    a, sa = reference.per_token_cast_to_fp8(torch.randn(64, 256))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(256, 256))
    wide_out = torch.empty(64, 300, dtype=torch.bfloat16)
    args = check_dense((a, sa), (b, sb), wide_out[:, :256])
    assert args.out.data_ptr() == wide_out.data_ptr() and args.out.stride() == (300, 1)


@pytest.mark.parametrize("case", range(len(_bad_dense_cases())))
def test_dense_errors(case):
    lhs, rhs, out, exc, pattern = _bad_dense_cases()[case]
    with pytest.raises(exc, match=pattern):
        check_dense(lhs, rhs, out)


@pytest.mark.parametrize("case", range(len(_bad_dense_cases())))
def test_public_dense_reports_the_same_errors(case):
    """The public function (CPU: reference path) validates through the same rules, K padding
    included: an fp8 operand with K % 16 != 0 is padded first, never hiding a mismatch."""
    lhs, rhs, out, exc, pattern = _bad_dense_cases()[case]
    with pytest.raises(exc, match=pattern):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)


def test_public_dense_k_mismatch_is_not_hidden_by_padding():
    (a, sa), _ = dense(k=200)                           # K % 16 != 0: would be padded to 208
    _, (b, sb) = dense(k=208)
    with pytest.raises(ValueError, match=r"rhs\[0\].*K = 200"):
        deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb))


def test_dense_k_and_n_must_be_positive():
    (a, sa), (b, sb) = dense()
    with pytest.raises(ValueError, match="K >= 1"):
        check_dense((a[:, :0], sa[:, :0]), (b[:, :0], sb[:, :0]))
    with pytest.raises(ValueError, match="N >= 1"):
        check_dense((a, sa), (b[:0], sb[:0]))


def test_dense_device_mismatch():
    (a, sa), (b, sb) = dense()
    b_meta = torch.empty(b.shape, dtype=FP8, device="meta")
    with pytest.raises(ValueError, match=r"rhs\[0\].*device"):
        check_dense((a, sa), (b_meta, sb))
    sa_meta = torch.empty(sa.shape, device="meta")
    with pytest.raises(ValueError, match=r"lhs\[1\].*device"):
        check_dense((a, sa_meta), (b, sb))
    out_meta = torch.empty(64, 256, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"out.*device"):
        check_dense((a, sa), (b, sb), out_meta)


# ---------------------------------------------------------------------------------------------
# Grouped layouts.
# ---------------------------------------------------------------------------------------------
def contiguous(m=96, groups=3, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(groups, n, k))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    m_indices = torch.randint(-1, groups, (m,), dtype=torch.int32)
    return (a, sa), (b, sb), out, m_indices


def test_contiguous_happy_path():
    lhs, rhs, out, idx = contiguous()
    args = check_contiguous(lhs, rhs, out, idx)
    assert args.layout == CONTIGUOUS
    assert args.a is lhs[0] and args.sa is lhs[1] and args.out is out and args.index is idx
    assert (args.m, args.n, args.k, args.num_groups, args.expected_m) == (96, 256, 384, 3, 96)


def test_contiguous_errors():
    (a, sa), (b, sb), out, idx = contiguous()
    cases = [
        (((a, sa), (b[0], sb), out, idx), ValueError, r"rhs\[0\].*3-D"),
        (((a, sa), (b, sb[0]), out, idx), ValueError, r"rhs\[1\].*shape"),
        (((a, sa), (b, sb), None, idx), TypeError, r"out"),
        (((a, sa), (b, sb), out, idx.long()), TypeError, r"m_indices.*int32"),
        (((a, sa), (b, sb), out, idx[:10]), ValueError, r"m_indices.*shape"),
        (((a, sa), (b, sb), out, idx.tolist()), TypeError, r"m_indices"),
        (((a, sa), (b, sb), out, None), TypeError, r"m_indices"),
        (((a, sa), (b, sb), out, torch.stack([idx, idx], 1)[:, 0]), ValueError, r"m_indices.*contiguous"),
        (((a, sa), (b, sb), out, idx.to("meta")), ValueError, r"m_indices.*device"),
        (((a, sa[:10]), (b, sb), out, idx), ValueError, r"lhs\[1\]"),
        (((a, sa), (b, sb), out[:, :100], idx), ValueError, r"out.*shape"),
        (((a, sa), (b[:0], sb[:0]), out, idx), ValueError, r"rhs\[0\].*group"),
        (((a, sa), (b[:, :, :128], sb), out, idx), ValueError, r"rhs\[0\].*K = 384"),
        (((a, sa), (b, sb), out.t().contiguous().t(), idx), ValueError, r"out"),   # grouped out: no staging
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            check_contiguous(*args)
        with pytest.raises(exc, match=pattern):     # the public function: same rule, same message
            deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(*args)


def masked(groups=3, max_m=40, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(groups, max_m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(groups, n, k))
    out = torch.empty(groups, max_m, n, dtype=torch.bfloat16)
    masked_m = torch.randint(0, max_m + 1, (groups,), dtype=torch.int32)
    return (a, sa), (b, sb), out, masked_m


def test_masked_happy_path_and_row_major_scales():
    lhs, rhs, out, mm = masked()
    args = check_masked(lhs, rhs, out, mm, 16)
    assert args.layout == MASKED and args.sa is lhs[1] and args.index is mm
    assert (args.num_groups, args.m, args.n, args.k, args.expected_m) == (3, 40, 256, 384, 16)
    row_major = lhs[1].contiguous()
    args = check_masked((lhs[0], row_major), rhs, out, mm, 16)
    am = get_tma_aligned_size(40, 4)
    assert args.sa.stride() == (am * 3, 1, am) and torch.equal(args.sa, row_major)


def test_masked_errors():
    (a, sa), (b, sb), out, mm = masked()
    cases = [
        (((a, sa), (b, sb), out, mm.long(), 16), TypeError, r"masked_m.*int32"),
        (((a, sa), (b, sb), out, mm[:2], 16), ValueError, r"masked_m.*shape"),
        (((a, sa), (b, sb), out, mm, 16.0), TypeError, r"expected_m"),
        (((a, sa), (b, sb), out, mm, True), TypeError, r"expected_m"),
        (((a, sa), (b, sb), out, mm, None), TypeError, r"expected_m"),
        (((a, sa), (b, sb), out, mm, 0), ValueError, r"expected_m"),
        (((a, sa), (b, sb), out, mm, -3), ValueError, r"expected_m"),
        (((a[:2], sa[:2]), (b, sb), out, mm, 16), ValueError, r"lhs\[0\].*groups"),
        (((a, sa[0]), (b, sb), out, mm, 16), ValueError, r"lhs\[1\].*shape"),
        (((a[0], sa), (b, sb), out, mm, 16), ValueError, r"lhs\[0\].*3-D"),
        (((a, sa), (b, sb), out[0], mm, 16), ValueError, r"out.*shape"),
        (((a, sa), (b, sb), out.float(), mm, 16), TypeError, r"out"),
        (((a, sa), (b, sb), None, mm, 16), TypeError, r"out"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            check_masked(*args)
        with pytest.raises(exc, match=pattern):     # the public function: same rule, same message
            deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(*args)


def test_numpy_int_expected_m_is_rejected():
    np = pytest.importorskip("numpy")
    lhs, rhs, out, mm = masked()
    with pytest.raises(TypeError, match="expected_m"):
        check_masked(lhs, rhs, out, mm, np.int64(16))


# ---------------------------------------------------------------------------------------------
# The per-operand rules, on their own.
# ---------------------------------------------------------------------------------------------
def test_rules_name_the_argument_they_are_given():
    (a, sa), (b, sb) = dense()
    with pytest.raises(TypeError, match=r"^weights must be a \(tensor, scales\) pair"):
        validation.fp8_operand(a, "weights", 2, "[N, K]")
    with pytest.raises(ValueError, match=r"^x must have contiguous rows"):
        validation.tma_rows(a.t(), 1, "x")
    with pytest.raises(ValueError, match=r"^s must have shape"):
        validation.block_scales(sb[:1], (2, 2), "s")
    with pytest.raises(TypeError, match=r"^idx must be torch.int32"):
        validation.index_tensor(torch.zeros(3, dtype=torch.int64), "idx", 3, a.device, "rows")
    with pytest.raises(TypeError, match=r"^expected_m must be a Python int"):
        validation.host_rows_hint(2.0)
    assert validation.host_rows_hint(5) == 5


def test_tma_rows_relabels_only_unused_strides():
    x = torch.empty(1, 64, dtype=torch.uint8).view(FP8)
    odd = x.as_strided((1, 64), (3, 1))                 # a size-1 dimension: any stride is legal torch
    fixed = validation.tma_rows(odd, 1, "x")
    assert fixed.stride() == (64, 1) and fixed.data_ptr() == x.data_ptr()
    ok = torch.empty(8, 64, dtype=torch.uint8).view(FP8)
    assert validation.tma_rows(ok, 1, "x") is ok        # nothing to fix: the same tensor


# ---------------------------------------------------------------------------------------------
# No reliance on assert.
# ---------------------------------------------------------------------------------------------
LIBRARY_MODULES = ["ops/validation.py", "ops/gemm.py", "ops/cast.py", "ops/library.py", "api.py", "utils.py",
                   "reference.py", "config.py", "plan.py", "runtime/launch.py", "runtime/kernels.py"]


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_library_code_has_no_assert(module):
    tree = ast.parse((ROOT / "deep_gemm" / module).read_text())
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]


def test_errors_survive_python_O():
    script = (
        "import torch\n"
        "import deep_gemm\n"
        "from deep_gemm import reference\n"
        "from deep_gemm.config import Layout\n"
        "from deep_gemm.ops.validation import check_gemm\n"
        "a, sa = reference.per_token_cast_to_fp8(torch.randn(8, 128))\n"
        "b, sb = reference.per_block_cast_to_fp8(torch.randn(16, 128))\n"
        "for bad in [((a, sa), (b[:, :64], sb)), ((a.float(), sa), (b, sb))]:\n"
        "    for fn in (lambda *x: check_gemm(Layout.DENSE, *x), deep_gemm.gemm_fp8_fp8_bf16_nt):\n"
        "        try:\n"
        "            fn(*bad)\n"
        "        except (TypeError, ValueError) as e:\n"
        "            print(type(e).__name__)\n"
        "        else:\n"
        "            print('accepted')\n"
        "assert False, 'asserts are off under -O, this line must not fire'\n"
    )
    res = subprocess.run([sys.executable, "-O", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ValueError", "ValueError", "TypeError", "TypeError"]
