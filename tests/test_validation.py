"""Argument checks: each bad input raises the right exception type, naming the argument (CPU)."""
import ast
import pathlib
import subprocess
import sys

import pytest
import torch

from deep_gemm import reference, validation
from deep_gemm.utils import get_tma_aligned_size

FP8 = torch.float8_e4m3fn
ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    args = validation.check_dense(lhs, rhs, out)
    assert args.a is lhs[0] and args.sa is lhs[1] and args.b is rhs[0] and args.sb is rhs[1] and args.out is out
    assert (args.m, args.n, args.k) == (64, 256, 256)


def test_dense_allocates_out_and_normalises_row_major_sa():
    (a, sa), rhs = dense(m=33, k=320)
    row_major = sa.contiguous()
    args = validation.check_dense((a, row_major), rhs)
    assert args.out.dtype == torch.bfloat16 and args.out.shape == (33, 256)
    assert args.sa.stride() == (1, get_tma_aligned_size(33, 4))
    assert torch.equal(args.sa, row_major)


def test_dense_out_rows_padded_when_n_breaks_alignment():
    lhs, rhs = dense(n=100)
    args = validation.check_dense(lhs, rhs)
    assert args.out.shape == (64, 100) and args.out.stride(0) * 2 % 16 == 0


def test_dense_m_zero_and_one():
    lhs, rhs = dense(m=0)
    assert validation.check_dense(lhs, rhs).out.shape == (0, 256)
    # A single row whose row stride is meaningless (a [1, K] slice of a wider tensor).
    big = torch.randn(4, 200).to(FP8)
    (a, sa), rhs = dense(m=1, k=112)
    odd = big[:1, :112]
    assert odd.stride(0) == 200
    args = validation.check_dense((odd, sa), rhs)
    assert args.a.stride(0) % 16 == 0 and torch.equal(args.a.float(), odd.float())


# ---------------------------------------------------------------------------------------------
# Dense: every error path.
# ---------------------------------------------------------------------------------------------
def _bad_dense_cases():
    (a, sa), (b, sb) = dense()
    out = torch.empty(64, 256, dtype=torch.bfloat16)
    big_a = torch.randn(64, 256 + 8).to(FP8)
    wide_out = torch.empty(64, 257, dtype=torch.bfloat16)
    odd_sa = torch.rand(64, 3)[:, :2]                      # neither row-major nor col-major
    return [
        # (lhs, rhs, out, exception, message pattern)
        ([a, sa, sa], (b, sb), None, TypeError, r"lhs"),
        (a, (b, sb), None, TypeError, r"lhs"),
        ((a, sa), "rhs", None, TypeError, r"rhs"),
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
    args = validation.check_dense((a, sa), (b, sb), wide_out[:, :256])
    assert args.out.data_ptr() == wide_out.data_ptr() and args.out.stride() == (300, 1)


@pytest.mark.parametrize("case", range(len(_bad_dense_cases())))
def test_dense_errors(case):
    lhs, rhs, out, exc, pattern = _bad_dense_cases()[case]
    with pytest.raises(exc, match=pattern):
        validation.check_dense(lhs, rhs, out)


def test_dense_k_and_n_must_be_positive():
    (a, sa), (b, sb) = dense()
    with pytest.raises(ValueError, match="K >= 1"):
        validation.check_dense((a[:, :0], sa[:, :0]), (b[:, :0], sb[:, :0]))
    with pytest.raises(ValueError, match="N >= 1"):
        validation.check_dense((a, sa), (b[:0], sb[:0]))


def test_dense_device_mismatch():
    (a, sa), (b, sb) = dense()
    b_meta = torch.empty(b.shape, dtype=FP8, device="meta")
    with pytest.raises(ValueError, match=r"rhs\[0\].*device"):
        validation.check_dense((a, sa), (b_meta, sb))
    out_meta = torch.empty(64, 256, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"out.*device"):
        validation.check_dense((a, sa), (b, sb), out_meta)


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
    args = validation.check_contiguous(lhs, rhs, out, idx)
    assert args.a is lhs[0] and args.sa is lhs[1] and args.out is out and args.m_indices is idx
    assert (args.m, args.n, args.k, args.num_groups) == (96, 256, 384, 3)


def test_contiguous_errors():
    (a, sa), (b, sb), out, idx = contiguous()
    cases = [
        (((a, sa), (b[0], sb), out, idx), ValueError, r"rhs\[0\].*3-D"),
        (((a, sa), (b, sb[0]), out, idx), ValueError, r"rhs\[1\].*shape"),
        (((a, sa), (b, sb), None, idx), TypeError, r"out"),
        (((a, sa), (b, sb), out, idx.long()), TypeError, r"m_indices.*int32"),
        (((a, sa), (b, sb), out, idx[:10]), ValueError, r"m_indices.*shape"),
        (((a, sa), (b, sb), out, idx.tolist()), TypeError, r"m_indices"),
        (((a, sa), (b, sb), out, torch.stack([idx, idx], 1)[:, 0]), ValueError, r"m_indices.*contiguous"),
        (((a, sa[:10]), (b, sb), out, idx), ValueError, r"lhs\[1\]"),
        (((a, sa), (b, sb), out[:, :100], idx), ValueError, r"out.*shape"),
        (((a, sa), (b[:0], sb[:0]), out, idx), ValueError, r"rhs\[0\].*group"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            validation.check_contiguous(*args)


def masked(groups=3, max_m=40, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(groups, max_m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(groups, n, k))
    out = torch.empty(groups, max_m, n, dtype=torch.bfloat16)
    masked_m = torch.randint(0, max_m + 1, (groups,), dtype=torch.int32)
    return (a, sa), (b, sb), out, masked_m


def test_masked_happy_path_and_row_major_scales():
    lhs, rhs, out, mm = masked()
    args = validation.check_masked(lhs, rhs, out, mm, 16)
    assert args.sa is lhs[1] and (args.num_groups, args.max_m, args.n, args.k, args.expected_m) == (3, 40, 256, 384, 16)
    row_major = lhs[1].contiguous()
    args = validation.check_masked((lhs[0], row_major), rhs, out, mm, 16)
    am = get_tma_aligned_size(40, 4)
    assert args.sa.stride() == (am * 3, 1, am) and torch.equal(args.sa, row_major)


def test_masked_errors():
    (a, sa), (b, sb), out, mm = masked()
    cases = [
        (((a, sa), (b, sb), out, mm.long(), 16), TypeError, r"masked_m.*int32"),
        (((a, sa), (b, sb), out, mm[:2], 16), ValueError, r"masked_m.*shape"),
        (((a, sa), (b, sb), out, mm, 16.0), TypeError, r"expected_m"),
        (((a, sa), (b, sb), out, mm, True), TypeError, r"expected_m"),
        (((a, sa), (b, sb), out, mm, 0), ValueError, r"expected_m"),
        (((a[:2], sa[:2]), (b, sb), out, mm, 16), ValueError, r"lhs\[0\].*groups"),
        (((a, sa[0]), (b, sb), out, mm, 16), ValueError, r"lhs\[1\].*shape"),
        (((a[0], sa), (b, sb), out, mm, 16), ValueError, r"lhs\[0\].*3-D"),
        (((a, sa), (b, sb), out[0], mm, 16), ValueError, r"out.*shape"),
        (((a, sa), (b, sb), out.float(), mm, 16), TypeError, r"out"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            validation.check_masked(*args)


# ---------------------------------------------------------------------------------------------
# No reliance on assert.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["validation.py", "utils.py", "reference.py"])
def test_library_code_has_no_assert(module):
    tree = ast.parse((ROOT / "deep_gemm" / module).read_text())
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]


def test_errors_survive_python_O():
    script = (
        "import torch\n"
        "from deep_gemm import reference, validation\n"
        "a, sa = reference.per_token_cast_to_fp8(torch.randn(8, 128))\n"
        "b, sb = reference.per_block_cast_to_fp8(torch.randn(16, 128))\n"
        "for bad in [((a, sa), (b[:, :64], sb)), ((a.float(), sa), (b, sb))]:\n"
        "    try:\n"
        "        validation.check_dense(*bad)\n"
        "    except (TypeError, ValueError) as e:\n"
        "        print(type(e).__name__)\n"
        "    else:\n"
        "        print('accepted')\n"
        "assert False, 'asserts are off under -O, this line must not fire'\n"
    )
    res = subprocess.run([sys.executable, "-O", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ValueError", "TypeError"]
