"""The plain-torch reference against independent float64 computations (CPU)."""
import math

import pytest
import torch

from deep_gemm import reference as ref
from deep_gemm.utils import get_tma_aligned_size

E4M3_REL = 2.0 ** -4          # 3 mantissa bits: round-to-nearest error <= half an ulp = 2^-4 relative
E4M3_SUBNORMAL_STEP = 2.0 ** -9


def _blocks(n):
    return math.ceil(n / 128)


def _check_round_trip(x, deq, scale_per_elem):
    x = x.double()
    err = (deq.double() - x).abs()
    bound = x.abs() * E4M3_REL + scale_per_elem.double() * E4M3_SUBNORMAL_STEP
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 128), (33, 200), (5, 576), (3, 7), (2, 17, 300)])
def test_per_token_round_trip(shape, dtype):
    x = (torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 10).to(dtype)
    q, s = ref.per_token_cast_to_fp8(x)
    m, k = shape[-2], shape[-1]
    kb = _blocks(k)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == shape[:-1] + (kb,)
    am = get_tma_aligned_size(m, 4)
    if len(shape) == 2:
        assert s.stride() == (1, am) or kb == 1
    else:
        assert s.stride()[1] == 1 and (kb == 1 or s.stride()[2] == am) and s.stride()[0] == am * kb
    # Scale = amax / 448 per 1x128 block (float64 check).
    xd = torch.nn.functional.pad(x.double(), (0, kb * 128 - k))
    amax = xd.unflatten(-1, (kb, 128)).abs().amax(-1).clamp(min=1e-4)
    torch.testing.assert_close(s.double(), amax / 448, rtol=1e-6, atol=0)
    deq = ref.dequantize_lhs(q, s, torch.float64)
    _check_round_trip(x, deq, s.repeat_interleave(128, -1)[..., :k])


@pytest.mark.parametrize("shape", [(256, 384), (130, 200), (7, 5), (3, 129, 257)])
def test_per_block_round_trip(shape):
    x = torch.randn(*shape, dtype=torch.bfloat16) * 3
    q, s = ref.per_block_cast_to_fp8(x)
    n, k = shape[-2], shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == shape[:-2] + (_blocks(n), _blocks(k)) and s.is_contiguous()
    xd = torch.nn.functional.pad(x.double(), (0, -k % 128, 0, -n % 128))
    lead = xd.shape[:-2]
    amax = xd.reshape(*lead, xd.shape[-2] // 128, 128, xd.shape[-1] // 128, 128).abs().amax((-3, -1))
    torch.testing.assert_close(s.double(), amax.clamp(min=1e-4) / 448, rtol=1e-6, atol=0)
    deq = ref.dequantize_rhs(q, s, torch.float64)
    scale = s.repeat_interleave(128, -1)[..., :k].repeat_interleave(128, -2)[..., :n, :]
    _check_round_trip(x, deq, scale)


def test_zero_block_uses_the_amax_floor():
    x = torch.randn(4, 384)
    x[1, 128:256] = 0
    q, s = ref.per_token_cast_to_fp8(x)
    assert float(s[1, 1]) == pytest.approx(1e-4 / 448)
    assert not q[1, 128:256].float().any()
    assert bool(torch.isfinite(ref.dequantize_lhs(q, s)).all())


def test_cast_rejects_bad_input():
    with pytest.raises(TypeError, match="x"):
        ref.per_token_cast_to_fp8(torch.randint(0, 5, (4, 128)))
    with pytest.raises(ValueError, match="x"):
        ref.per_block_cast_to_fp8(torch.randn(128))
    with pytest.raises(TypeError, match="x"):
        ref.per_token_cast_to_fp8([1.0, 2.0])


def _blockwise_reference(a, sa, b, sb):
    """out = sum_kb (A_kb @ B_kb^T) * sa[:, kb] * sb[n // 128, kb], in float64: a different
    formula from dequantize-then-matmul."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.zeros(m, n, dtype=torch.float64)
    row_block = torch.arange(n) // 128
    for kb in range(_blocks(k)):
        cols = slice(kb * 128, min(k, kb * 128 + 128))
        partial = a[:, cols].double() @ b[:, cols].double().T
        out += partial * sa[:, kb].double()[:, None] * sb[row_block, kb].double()[None, :]
    return out


@pytest.mark.parametrize("m, n, k", [(64, 256, 384), (33, 130, 200), (1, 7, 576), (128, 300, 1000)])
def test_dense_gemm_against_float64(m, n, k):
    (a, sa), (b, sb) = ref.per_token_cast_to_fp8(torch.randn(m, k)), ref.per_block_cast_to_fp8(torch.randn(n, k))
    expect = _blockwise_reference(a, sa, b, sb)
    got = ref.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb))
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ref.calc_diff(got, expect) < 1e-5
    assert ref.rel_error(got, expect) < 4e-3
    # Row-major scales give the same result.
    again = ref.gemm_fp8_fp8_bf16_nt((a, sa.contiguous()), (b, sb))
    assert torch.equal(got, again)


def test_dense_gemm_writes_into_out():
    (a, sa), (b, sb) = ref.per_token_cast_to_fp8(torch.randn(16, 256)), ref.per_block_cast_to_fp8(torch.randn(48, 256))
    out = torch.randn(16, 48).to(torch.bfloat16)
    result = ref.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert result is out
    assert torch.equal(out, ref.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb)))
    with pytest.raises(ValueError, match="out"):
        ref.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), torch.empty(16, 47, dtype=torch.bfloat16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contiguous_grouped_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    groups, align, n, k = 4, 32, 160, 320
    counts = torch.randint(0, align + 1, (groups,), generator=gen).tolist()
    m = groups * align
    (a, sa) = ref.per_token_cast_to_fp8(torch.randn(m, k, generator=gen))
    (b, sb) = ref.per_block_cast_to_fp8(torch.randn(groups, n, k, generator=gen))
    m_indices = torch.full((m,), -1, dtype=torch.int32)
    for g, c in enumerate(counts):
        m_indices[g * align:g * align + c] = g
    sentinel = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    out = sentinel.clone()
    result = ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)
    assert result is out
    for g, c in enumerate(counts):
        rows = slice(g * align, g * align + c)
        expect = _blockwise_reference(a[rows], sa[rows], b[g], sb[g])
        if c:
            assert ref.calc_diff(out[rows], expect) < 1e-5
        pad = slice(g * align + c, (g + 1) * align)
        assert torch.equal(out[pad], sentinel[pad]), "padding rows must be left untouched"


def test_contiguous_rejects_bad_indices():
    (a, sa) = ref.per_token_cast_to_fp8(torch.randn(8, 128))
    (b, sb) = ref.per_block_cast_to_fp8(torch.randn(2, 16, 128))
    out = torch.empty(8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="m_indices"):
        ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, torch.full((8,), 2, dtype=torch.int32))


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_grouped_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    groups, max_m, n, k = 4, 40, 136, 200
    counts = [0, max_m] + torch.randint(1, max_m, (groups - 2,), generator=gen).tolist()
    (a, sa) = ref.per_token_cast_to_fp8(torch.randn(groups, max_m, k, generator=gen))
    (b, sb) = ref.per_block_cast_to_fp8(torch.randn(groups, n, k, generator=gen))
    sentinel = torch.randn(groups, max_m, n, generator=gen).to(torch.bfloat16)
    out = sentinel.clone()
    masked_m = torch.tensor(counts, dtype=torch.int32)
    ref.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 20)
    for g, c in enumerate(counts):
        if c:
            expect = _blockwise_reference(a[g, :c], sa[g, :c], b[g], sb[g])
            assert ref.calc_diff(out[g, :c], expect) < 1e-5
        assert torch.equal(out[g, c:], sentinel[g, c:]), "rows past masked_m must be left untouched"
    with pytest.raises(ValueError, match="masked_m"):
        ref.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m + max_m, 20)


def test_calc_diff_and_rel_error():
    x = torch.randn(50, 60, dtype=torch.float64)
    assert abs(ref.calc_diff(x, x)) < 1e-12
    assert ref.calc_diff(x, -x) == pytest.approx(2.0)
    assert ref.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    y = x * 1.01
    assert ref.rel_error(y, x) == pytest.approx(0.01, rel=1e-6)
    assert ref.rel_error(torch.empty(0), torch.empty(0)) == 0.0
    assert ref.rel_error(x, torch.zeros_like(x)) == math.inf
    assert isinstance(ref.calc_diff(x.float(), x.to(torch.bfloat16)), float)
