"""The K-padding kernel (ops/pad.py) on the GPU: bit-exact against torch's F.pad (the reference
path, ops/gemm.pad_k_to_16), one launch per GEMM call, and the GEMMs whose K % 16 != 0."""
import random

import pytest
import torch

import deep_gemm
from deep_gemm.ops import pad
from deep_gemm.ops.gemm import pad_k_to_16
from deep_gemm.reference import dequantize_lhs, dequantize_rhs
from deep_gemm.runtime.kernels import KernelNotReadyError
from test_gemm_gpu import check_close, make_inputs, reference64
from test_grouped_gpu import check_masked, contiguous_inputs, masked_inputs, weights

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn
KS = [1, 15, 17, 100, 1000, 1001, 4095]
ROWS = [1, 7, 300]


def random_fp8(shape, offset=0):
    """Fresh random bytes (every fp8 bit pattern, NaNs included) as a contiguous tensor that
    starts `offset` bytes into its buffer: an odd offset forces the kernel's byte-wise reads."""
    numel = 1
    for size in shape:
        numel *= size
    buffer = torch.randint(0, 256, (numel + offset,), dtype=torch.uint8, device="cuda")
    return buffer[offset:].view(FP8).view(shape)


def reference_pad(x):
    return pad_k_to_16((x, None))[0]


def assert_bits_equal(got, want):
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "padded bytes differ from F.pad"


@pytest.mark.parametrize("offset", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", KS)
def test_pad_matches_torch_2d(k, rows, offset):
    x = random_fp8((rows, k), offset)
    (padded,) = pad.pad_k16(x)
    assert_bits_equal(padded, reference_pad(x))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", KS)
def test_pad_into_poisoned_both_operands_3d(k, rows):
    """A 2-D and a 3-D operand in one launch, into destinations pre-filled with 0xFF: every byte,
    zeros included, must be written, and nothing past the destinations."""
    a, b = random_fp8((rows, k)), random_fp8((3, rows, k), offset=3)
    outs = []
    for x in (a, b):
        spare = torch.full((x.numel() // k * ((k + 15) // 16 * 16) + 64,), 0xFF, dtype=torch.uint8, device="cuda")
        outs.append((spare, spare[:-64].view(FP8).view(pad.padded_shape(x))))
    before = pad.launch_count
    pad.pad_k16_into([(a, outs[0][1]), (b, outs[1][1])])
    assert pad.launch_count == before + 1
    for x, (spare, dst) in zip((a, b), outs):
        assert_bits_equal(dst, reference_pad(x))
        assert (spare[-64:] == 0xFF).all(), "bytes past the destination were written"


def test_pad_follows_the_current_stream():
    x, fresh = random_fp8((300, 1001)), random_fp8((300, 1001))
    want = reference_pad(fresh)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        x.copy_(fresh)                       # a padding launched on another stream reads x before this
        (padded,) = pad.pad_k16(x)
    stream.synchronize()
    assert_bits_equal(padded, want)


def test_dense_padded_call_is_one_pad_launch():
    lhs, rhs = make_inputs(1, 3000, 1000)
    out = torch.empty(1, 3000, device="cuda", dtype=torch.bfloat16)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)        # warm-up: compiles and loads
    torch.cuda.synchronize()
    before = pad.launch_count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
        torch.cuda.synchronize()
    assert pad.launch_count == before + 1
    check_close(out, reference64(lhs, rhs))
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:   # none when the profiler has no CUPTI
        assert len(kernels) == 2, f"expected the pad kernel and the GEMM, got {kernels}"


@pytest.mark.parametrize("m,n,k", [(1, 3000, 1000), (300, 2112, 1001), (129, 576, 1000), (4096, 512, 1001)],
                         ids=lambda v: str(v))
def test_dense_odd_k(m, n, k):
    lhs, rhs = make_inputs(m, n, k)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    check_close(out, reference64(lhs, rhs))


@pytest.mark.parametrize("k", [1000, 1001])
def test_contiguous_odd_k(k):
    sizes, n = [300, 0, 77, 128], 576
    lhs, m_indices = contiguous_inputs(sizes, n, k)
    rhs = weights(len(sizes), n, k)
    out = torch.full((lhs[0].shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    before = pad.launch_count
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    assert pad.launch_count == before + 1
    a = dequantize_lhs(*lhs, dtype=torch.float64)
    for g in range(len(sizes)):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            check_close(out[rows], a[rows] @ dequantize_rhs(rhs[0][g], rhs[1][g], dtype=torch.float64).T)


@pytest.mark.parametrize("k", [1000, 1001])
def test_masked_odd_k(k):
    groups, max_m, n = 4, 256, 2112
    lhs, rhs = masked_inputs(groups, max_m, n, k)
    masked_m = torch.tensor([max_m] + [random.randint(0, max_m) for _ in range(groups - 1)],
                            device="cuda", dtype=torch.int32)
    out = torch.full((groups, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    before = pad.launch_count
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 128)
    assert pad.launch_count == before + 1
    check_masked(lhs, rhs, out, masked_m)


def test_capture_without_warmup_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(pad, "_loaded", {})
    x = random_fp8((16, 100))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(KernelNotReadyError, match="before capture"):
        with torch.cuda.graph(graph):
            pad.pad_k16(x)
