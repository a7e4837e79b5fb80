"""FP8 cast kernels on the GPU: bit-identical to deep_gemm.reference run on the same CUDA tensor."""
from __future__ import annotations

import pytest
import torch

import deep_gemm
from deep_gemm import reference
from deep_gemm.ops import cast
from deep_gemm.runtime.kernels import KernelNotReadyError
from deep_gemm.runtime.launch import LaunchCache
from deep_gemm.utils import is_col_major_tma_aligned

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KS = [128, 576, 7168, 100, 200]
FP8 = torch.float8_e4m3fn


def make_x(shape, dtype, seed=0):
    """Random rows whose magnitudes span the dtype's range (tiny rows fall under the 1e-4 amax
    floor, huge ones scale far up), with exact zeros, negative zeros and values 1e-6 times their
    neighbours (e4m3 subnormals and underflow to +-0) sprinkled in. Never all zeros."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    x = torch.randn(shape, generator=gen, device="cuda")
    lo, hi = (-8, 3) if dtype == torch.float16 else (-30, 30)
    exps = torch.randint(lo, hi + 1, tuple(shape[:-1]) + (1,), generator=gen, device="cuda")
    x = x * torch.pow(10.0, exps.float())
    u = torch.rand(shape, generator=gen, device="cuda")
    x = torch.where(u < 0.02, torch.zeros_like(x), x)
    x = torch.where((u >= 0.02) & (u < 0.03), torch.full_like(x, -0.0), x)
    x = torch.where((u >= 0.03) & (u < 0.06), x * 1e-6, x)
    return x.to(dtype)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    as_int = torch.uint8 if got.element_size() == 1 else torch.int32
    g, w = got.view(as_int), want.view(as_int)
    bad = (g != w).nonzero()
    if bad.numel():
        first = [tuple(i.tolist()) for i in bad[:5]]
        detail = ", ".join(f"{i}: {got[i].item()!r} vs {want[i].item()!r}" for i in first)
        raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} elements differ (got vs reference) {detail}")


def token_scale_strides(shape):
    m, kb = shape[-2], shape[-1]
    aligned_m = (m + 3) // 4 * 4
    return ((kb * aligned_m,) if len(shape) == 3 else ()) + (1, aligned_m)


def check_token(x):
    q_ref, s_ref = reference.per_token_cast_to_fp8(x)
    # Poisoned outputs (e4m3 NaN bytes, NaN scales) through the launch-into entry point...
    q = torch.full(x.shape, 0x7F, dtype=torch.uint8, device="cuda").view(FP8)
    strides = token_scale_strides(s_ref.shape)
    storage = torch.full((s_ref.numel() // s_ref.shape[-2] * ((s_ref.shape[-2] + 3) // 4 * 4),),
                         float("nan"), device="cuda")
    s = storage.as_strided(s_ref.shape, strides)
    cast.per_token_cast_into(x, q, s)
    assert_bits_equal(q, q_ref, "q")
    assert_bits_equal(s, s_ref, "scales")
    # ...and the public function, whose scales must be in the GEMM's layout.
    q2, s2 = deep_gemm.per_token_cast_to_fp8(x)
    assert q2.dtype == FP8 and q2.is_contiguous()
    assert_bits_equal(q2, q_ref, "q (public)")
    assert_bits_equal(s2, s_ref, "scales (public)")
    assert is_col_major_tma_aligned(s2)
    expected = deep_gemm.get_col_major_tma_aligned_tensor(s_ref.contiguous())
    for size, got, want in zip(s2.shape, s2.stride(), expected.stride()):
        assert size <= 1 or got == want, (s2.stride(), expected.stride())
    assert s2.stride() == strides


def check_block(x):
    q_ref, s_ref = reference.per_block_cast_to_fp8(x)
    q = torch.full(x.shape, 0x7F, dtype=torch.uint8, device="cuda").view(FP8)
    s = torch.full(s_ref.shape, float("nan"), device="cuda")
    cast.per_block_cast_into(x, q, s)
    assert_bits_equal(q, q_ref, "q")
    assert_bits_equal(s, s_ref, "scales")
    q2, s2 = deep_gemm.per_block_cast_to_fp8(x)
    assert q2.is_contiguous() and s2.is_contiguous()
    assert_bits_equal(q2, q_ref, "q (public)")
    assert_bits_equal(s2, s_ref, "scales (public)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 7, 4096])
@pytest.mark.parametrize("k", KS)
def test_per_token_matches_reference(dtype, m, k):
    check_token(make_x((m, k), dtype, seed=m * 100003 + k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 7, 576), (8, 1024, 7168), (3, 130, 200), (2, 1, 128), (5, 64, 100)])
def test_per_token_masked_3d(dtype, shape):
    check_token(make_x(shape, dtype, seed=sum(shape)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 129, 4096])
@pytest.mark.parametrize("k", KS)
def test_per_block_matches_reference(dtype, n, k):
    check_block(make_x((n, k), dtype, seed=n * 7919 + k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 300, 576), (2, 256, 7168), (3, 7, 100)])
def test_per_block_3d(dtype, shape):
    check_block(make_x(shape, dtype, seed=sum(shape) + 1))


def test_strided_and_misaligned_inputs():
    big = make_x((3, 300, 7168 + 24), torch.bfloat16, seed=5)
    cases = [
        big[0, :, 8:8 + 7168],          # 16-byte aligned rows with a longer row stride: 16-byte path
        big[0, :, 1:1 + 576],           # rows start 2 bytes off: element-wise path
        big[:, :200, :576],             # groups not uniformly strided with the rows: copied
        big[0, :256, :512].t(),         # column stride != 1: copied
        big[0, :1, :7168].expand(5, 7168),   # row stride 0
    ]
    for x in cases:
        check_token(x)
        check_block(x)


def test_nan_and_inf_propagate_like_the_reference():
    x = make_x((64, 576), torch.float32, seed=11)
    x[3, 5] = float("inf")
    x[10, 200] = float("-inf")
    x[20, 300] = float("nan")
    x[30, 0:128] = float("inf")
    for (q, s), (q_ref, s_ref) in ((deep_gemm.per_token_cast_to_fp8(x), reference.per_token_cast_to_fp8(x)),
                                   (deep_gemm.per_block_cast_to_fp8(x), reference.per_block_cast_to_fp8(x))):
        # NaN payloads and signs are not specified; compare NaN positions, then every other bit.
        qn, qn_ref = q.float().isnan(), q_ref.float().isnan()
        assert torch.equal(qn, qn_ref) and torch.equal(s.isnan(), s_ref.isnan())
        assert_bits_equal(q.view(torch.uint8)[~qn], q_ref.view(torch.uint8)[~qn], "q")
        assert_bits_equal(s[~s.isnan()], s_ref[~s.isnan()], "scales")


DIV_CHECK = r"""
#define CAST_K 128
#define CAST_IN_DTYPE 0
#define CAST_VEC 1
#define CAST_PER_BLOCK 0
#define CAST_THREADS 256
#define CAST_AMAX_FLOOR_BITS %(floor)s
#define CAST_INV_FP8_MAX_BITS %(inv)s
#include "cast.cuh"

// For every x (thread) and every amax: the kernel's division against div.rn.f32, over the
// divisors the kernel can meet (s = block_scale(amax)) and the x it divides (|x| <= amax).
// counts[0]: e4m3 bytes that differ; counts[1]: fp32 quotients that differ where |x/s| >= 2^-24.
extern "C" __global__ void cast_div_check(const float* xs, int num_x, const float* amaxes, int num_amax,
                                          unsigned long long* counts, unsigned int* example) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= num_x) return;
    const float x = xs[i];
    for (int j = 0; j < num_amax; ++j) {
        const float amax = amaxes[j];
        if (!(cast::abs_f32(x) <= amax) && amax == amax) continue;   // outside the domain
        const float s = cast::block_scale(amax);
        const float fast = cast::Divisor(s).divide(x);
        float exact;
        asm("div.rn.f32 %%0, %%1, %%2;" : "=f"(exact) : "f"(x), "f"(s));
        const bool byte_differs = cast::e4m3x2(fast, 0.0f) != cast::e4m3x2(exact, 0.0f);
        const bool f32_differs = __float_as_uint(fast) != __float_as_uint(exact) && !(exact != exact && fast != fast)
                                 && cast::abs_f32(exact) >= 5.9604645e-08f;
        if (byte_differs) atomicAdd(&counts[0], 1ull);
        if (f32_differs) atomicAdd(&counts[1], 1ull);
        if ((byte_differs || f32_differs) && atomicCAS(&example[0], 0u, 1u) == 0u) {
            example[1] = __float_as_uint(x);
            example[2] = __float_as_uint(amax);
        }
    }
}
"""


def test_division_matches_div_rn():
    """Every bf16 value (and a million random fp32 values) against 4096 block amaxes: the kernel's
    reciprocal-based division gives the same e4m3 byte as div.rn.f32 everywhere, and the same
    fp32 quotient wherever |x / s| >= 2^-24."""
    import struct

    from deep_gemm.jit import compile_kernel
    from deep_gemm.jit.cast_source import AMAX_FLOOR, f32_bits, _f32
    from deep_gemm.runtime.driver import LoadedKernel
    from deep_gemm.runtime.kernels import device_arch

    index = torch.cuda.current_device()
    source = DIV_CHECK % {"floor": f32_bits(AMAX_FLOOR), "inv": f32_bits(_f32(1.0) / _f32(448.0))}
    compiled = compile_kernel(source, "cast_div_check", arch=device_arch(index), name="cast_div_check")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    every_bf16 = (torch.arange(65536, dtype=torch.int32, device="cuda") - 32768).to(torch.int16).view(torch.bfloat16).float()
    random_f32 = torch.randint(-2**31, 2**31 - 1, (1 << 20,), dtype=torch.int32, device="cuda", generator=gen).view(torch.float32)
    xs = torch.cat([every_bf16, random_f32]).contiguous()
    log_uniform = torch.pow(2.0, torch.empty(2048, device="cuda").uniform_(-130, 127.9, generator=gen))
    bf16_values = every_bf16[torch.randint(0, 65536, (1900,), device="cuda", generator=gen)].abs()
    special = torch.tensor([0.0, 1e-4, 1e-4 * 1.0000001, 1.0, 448.0, 2.0**-126, 1e-45, 3.4028235e38,
                            float("inf"), float("nan")], device="cuda")
    amaxes = torch.cat([log_uniform, bf16_values, special]).contiguous()
    counts = torch.zeros(2, dtype=torch.int64, device="cuda")
    example = torch.zeros(3, dtype=torch.int32, device="cuda")
    with torch.cuda.device(index):   # the module is loaded into the current device's context
        kernel = LoadedKernel(compiled.cubin, compiled.symbol or "cast_div_check", 256)
    # The parameters as the C ABI lays them out: pointer, int (padded to 8), pointer, int
    # (padded), pointer, pointer.
    params = struct.pack("<Qi4xQi4xQQ", xs.data_ptr(), xs.numel(), amaxes.data_ptr(), amaxes.numel(),
                         counts.data_ptr(), example.data_ptr())
    kernel.launch((xs.numel() + 255) // 256, torch.cuda.current_stream(index).cuda_stream, params,
                  (0, 8, 16, 24, 32, 40))
    torch.cuda.synchronize()
    bits = example.tolist()
    assert counts.tolist() == [0, 0], (f"{counts.tolist()} mismatches, e.g. x bits 0x{bits[1] & 0xFFFFFFFF:08x}, "
                                       f"amax bits 0x{bits[2] & 0xFFFFFFFF:08x}")


def test_cuda_graph_capture_and_replay():
    x = make_x((512, 7168), torch.bfloat16, seed=21)
    w = make_x((1024, 576), torch.bfloat16, seed=22)
    deep_gemm.per_token_cast_to_fp8(x)      # warm-up: compile and load before capture
    deep_gemm.per_block_cast_to_fp8(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qx, sx = deep_gemm.per_token_cast_to_fp8(x)
        qw, sw = deep_gemm.per_block_cast_to_fp8(w)
    x.copy_(make_x(x.shape, x.dtype, seed=23))
    w.copy_(make_x(w.shape, w.dtype, seed=24))
    qx.view(torch.uint8).fill_(0x7F)
    qw.view(torch.uint8).fill_(0x7F)
    graph.replay()
    torch.cuda.synchronize()
    for (q, s), (q_ref, s_ref) in (((qx, sx), reference.per_token_cast_to_fp8(x)),
                                   ((qw, sw), reference.per_block_cast_to_fp8(w))):
        assert_bits_equal(q, q_ref, "q after replay")
        assert_bits_equal(s, s_ref, "scales after replay")


def test_capture_without_warmup_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(cast, "_loaded", {})
    monkeypatch.setattr(cast, "_launches", LaunchCache())   # no cached launch to fall back on
    x = make_x((16, 256), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(KernelNotReadyError, match="before capture"):
        with torch.cuda.graph(graph):
            deep_gemm.per_token_cast_to_fp8(x)


def test_kernel_path_is_taken(monkeypatch):
    def no_reference(x):
        raise AssertionError("the torch reference ran instead of the cast kernel")
    x = make_x((33, 576), torch.bfloat16)
    expected_token, expected_block = reference.per_token_cast_to_fp8(x), reference.per_block_cast_to_fp8(x)
    monkeypatch.setattr(reference, "per_token_cast_to_fp8", no_reference)
    monkeypatch.setattr(reference, "per_block_cast_to_fp8", no_reference)
    before = cast.launch_count
    q, s = deep_gemm.per_token_cast_to_fp8(x)
    qb, sb = deep_gemm.per_block_cast_to_fp8(x)
    assert cast.launch_count == before + 2
    assert_bits_equal(q, expected_token[0], "q")
    assert_bits_equal(sb, expected_block[1], "scales")


def test_empty_and_bad_inputs():
    q, s = deep_gemm.per_token_cast_to_fp8(torch.empty((0, 256), device="cuda", dtype=torch.bfloat16))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    q, s = deep_gemm.per_block_cast_to_fp8(torch.empty((2, 0, 256), device="cuda", dtype=torch.bfloat16))
    assert q.shape == (2, 0, 256) and s.shape == (2, 0, 2)
    with pytest.raises(TypeError, match="x must be bfloat16"):
        deep_gemm.per_token_cast_to_fp8(torch.zeros((4, 128), dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="x must be 2-D or 3-D"):
        deep_gemm.per_block_cast_to_fp8(torch.zeros(128, device="cuda"))
    x = make_x((8, 256), torch.bfloat16)
    with pytest.raises(ValueError, match="q must have shape"):
        cast.per_token_cast_into(x, torch.empty((8, 128), dtype=FP8, device="cuda"),
                                 torch.empty((2, 8), device="cuda").t())
    with pytest.raises(ValueError, match="scales must have strides"):
        cast.per_token_cast_into(x, torch.empty((8, 256), dtype=FP8, device="cuda"), torch.empty((8, 2), device="cuda"))
    with pytest.raises(TypeError, match="scales must be torch.float32"):
        cast.per_block_cast_into(x, torch.empty((8, 256), dtype=FP8, device="cuda"),
                                 torch.empty((1, 2), dtype=torch.float16, device="cuda"))


@pytest.mark.parametrize("kind", ["per_token", "per_block"])
def test_repeated_casts_through_the_launch_cache_then_capture(kind, monkeypatch):
    """Casts of the same x into the same outputs on the same stream hit the launch cache (the
    first one's launch is cached), the second builds a one-kernel CUDA graph of it and the later
    ones go out as that graph (runtime/launch.py): each must still read x's current contents. A
    capture of the same cast on that stream then launches the kernel itself (a graph cannot be
    launched into a capturing stream), and its replays read new data too."""
    # An empty launch cache for this test: what it holds afterwards was made here (torch hands out
    # pooled streams, so an earlier test's launch may carry the same stream handle).
    monkeypatch.setattr(cast, "_launches", LaunchCache())
    shape = (333, 7168) if kind == "per_token" else (3, 256, 1024)
    into = cast.per_token_cast_into if kind == "per_token" else cast.per_block_cast_into
    ref = reference.per_token_cast_to_fp8 if kind == "per_token" else reference.per_block_cast_to_fp8
    x = make_x(shape, torch.bfloat16, seed=31)
    s_shape = ref(x)[1].shape
    q = torch.empty(shape, dtype=FP8, device="cuda")
    s = torch.empty_strided(s_shape, token_scale_strides(s_shape) if kind == "per_token" else
                            torch.empty(s_shape).stride(), dtype=torch.float32, device="cuda")

    def check(seed):
        x.copy_(make_x(shape, torch.bfloat16, seed=seed))
        q.view(torch.uint8).fill_(0x7F)
        s.fill_(float("nan"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for seed in range(40, 44):
            check(seed)
            into(x, q, s)
            q_ref, s_ref = ref(x)
            assert_bits_equal(q, q_ref, f"q (call {seed - 39})")
            assert_bits_equal(s, s_ref, f"scales (call {seed - 39})")
    side.synchronize()
    cached = [launch for entries in cast._launches._entries.values() for _, launch in entries
              if launch.stream == side.cuda_stream]
    assert cached and all(launch._graph is not None for launch in cached), "no launch graph was built"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        into(x, q, s)
    check(50)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    q_ref, s_ref = ref(x)
    assert_bits_equal(q, q_ref, "q (replay)")
    assert_bits_equal(s, s_ref, "scales (replay)")
