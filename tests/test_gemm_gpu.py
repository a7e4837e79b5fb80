"""Dense GEMM on the GPU against a float64 reference of the dequantized inputs."""
import pytest
import torch

import deep_gemm
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs, rel_error

pytestmark = pytest.mark.gpu

ANCHOR_SHAPES = [(m, n, k) for m in (64, 128, 4096)
                 for n, k in ((7168, 576), (2112, 7168), (24576, 1536), (32768, 512),
                              (7168, 16384), (4096, 7168), (7168, 2048))]
ODD_SHAPES = [(m, n, k) for m in (1, 7, 63, 65, 200, 1000, 4097) for n in (129, 576, 2112) for k in (576, 896)]
# bf16 output rounding bounds the relative error near 2^-9; allow headroom.
MAX_REL_ERROR = 4e-3
MAX_CALC_DIFF = 1e-5


def make_inputs(m, n, k, device="cuda"):
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    return deep_gemm.per_token_cast_to_fp8(a), deep_gemm.per_block_cast_to_fp8(b)


def reference64(lhs, rhs):
    return dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T


def check_close(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output: some element was not written"
    err, diff = rel_error(out, ref), calc_diff(out, ref)
    assert err < MAX_REL_ERROR and diff < MAX_CALC_DIFF, f"rel_error={err:.3e} calc_diff={diff:.3e}"


@pytest.mark.parametrize("m,n,k", ANCHOR_SHAPES + ODD_SHAPES, ids=lambda v: str(v))
def test_dense_matches_float64(m, n, k):
    lhs, rhs = make_inputs(m, n, k)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    result = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert result is out
    check_close(out, reference64(lhs, rhs))


@pytest.mark.parametrize("m,n,k", [(1000, 4095, 7168), (1000, 4097, 4608), (3000, 7001, 4100), (1000, 4100, 7168)],
                         ids=lambda v: str(v))
def test_tall_tiles_on_odd_shapes(m, n, k):
    """Shapes the planner runs on 256-row tiles (stored straight from registers), with odd N, an
    N that is not a multiple of 8, a partial last M block and K that is not a multiple of 128."""
    from deep_gemm import plan
    if plan.plan_dense(m, n, k, deep_gemm.get_num_sms()).block_m != 256:
        pytest.skip(f"with {deep_gemm.get_num_sms()} SMs the planner picks 128-row tiles here (chosen for 132)")
    lhs, rhs = make_inputs(m, n, k)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    check_close(out, reference64(lhs, rhs))


@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (7, 576, 7168), (65, 576, 7168), (128, 1000, 8192),
                                   (33, 520, 7296), (100, 1001, 7168)], ids=lambda v: str(v))
def test_decode_tiles_split_over_k(m, n, k):
    """Decode shapes whose tiles fill few SMs, split over K: a partial M block, partial last tiles
    (N not a multiple of 32, nor of 8), and K of 57 blocks (shares of unequal length)."""
    from deep_gemm import plan
    if plan.plan_dense(m, n, k, deep_gemm.get_num_sms()).split_k == 1:
        pytest.skip(f"with {deep_gemm.get_num_sms()} SMs the planner does not split this shape (chosen for 132)")
    lhs, rhs = make_inputs(m, n, k)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    check_close(out, reference64(lhs, rhs))


@pytest.mark.parametrize("m,n,k", [(300, 1001, 4352), (64, 1004, 512), (4096, 129, 576), (1000, 4095, 7168)],
                         ids=lambda v: str(v))
def test_out_view_of_a_wider_buffer_is_written_to_n_only(m, n, k):
    """out = a column slice of a wider tensor, N not a multiple of 8: TMA stores write whole
    16-byte chunks, and the columns past N belong to the caller."""
    lhs, rhs = make_inputs(m, n, k)
    # Rows 16-byte aligned, so that the kernel writes into `out` in place (no staging copy).
    wide = torch.full((m, (n + 7) // 8 * 8 + 8), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = wide[:, :n]
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    check_close(out, reference64(lhs, rhs))
    assert torch.isnan(wide[:, n:]).all(), "columns past N were written"


@pytest.mark.parametrize("k", [16, 100, 129, 300])
def test_unaligned_k(k):
    """K that is not a multiple of 16 (or 128) is padded internally, never computed wrong."""
    lhs, rhs = make_inputs(77, 256, k)
    check_close(deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs), reference64(lhs, rhs))


def test_row_major_scales_equal_column_major():
    lhs, rhs = make_inputs(333, 512, 1024)
    row_major = (lhs[0], lhs[1].contiguous())
    a = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
    b = deep_gemm.gemm_fp8_fp8_bf16_nt(row_major, rhs)
    assert torch.equal(a, b)


def test_m_zero():
    lhs, rhs = make_inputs(0, 256, 512)
    out = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
    assert out.shape == (0, 256)


def test_repeated_calls_are_deterministic():
    lhs, rhs = make_inputs(1000, 2112, 7168)
    first = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
    for _ in range(3):
        assert torch.equal(deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs), first)


def test_non_default_stream():
    lhs, rhs = make_inputs(500, 1024, 2048)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
    stream.synchronize()
    check_close(out, reference64(lhs, rhs))


def test_cuda_graph_capture_and_replay():
    m, n, k = 256, 2112, 1024
    lhs, rhs = make_inputs(m, n, k)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)  # warm-up loads the kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    fresh_lhs, _ = make_inputs(m, n, k)
    lhs[0].copy_(fresh_lhs[0])
    lhs[1].copy_(fresh_lhs[1])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_close(out, reference64(lhs, rhs))
