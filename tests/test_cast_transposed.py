"""Transposed per-token FP8 casts (x [T, H] -> e4m3 x.T per 1x128 along T), dense and K-grouped: the operands of
weight-gradient GEMMs.

CPU: the reference semantics (equal to per_token_cast_to_fp8 of x.T, per group for the K-grouped layout), input
validation, the kernels' launch parameters, every kernel variant compiling for sm_90a without spills, and the
custom ops under torch.compile. GPU (marked): the kernels bit-identical to the torch reference on the same CUDA
tensor, outputs fully written and nothing else, CUDA-graph capture, the launch cache, torch.compile.
"""
from __future__ import annotations

import struct

import pytest
import torch

import deep_gemm
from deep_gemm import reference
from deep_gemm.jit.cast_source import (DTYPES, TRANSPOSED_MAX_GROUPS, TransposedCastConfig, transposed_cast_source,
                                       transposed_min_blocks)
from deep_gemm.ops import cast, library

FP8 = torch.float8_e4m3fn
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = (bits(got) != bits(want)).nonzero()
    if bad.numel():
        first = [tuple(i.tolist()) for i in bad[:5]]
        detail = ", ".join(f"{i}: {got[i].item()!r} vs {want[i].item()!r}" for i in first)
        raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} elements differ (got vs want) {detail}")


def expected_grouped(x: torch.Tensor, sizes):
    """The K-grouped layout built from the dense per-token cast of each group's x_g.T: the oracle."""
    h = x.shape[1]
    qs, ss, start = [], [], 0
    for k in sizes:
        if k and h:
            q_g, s_g = reference.per_token_cast_to_fp8(x[start:start + k].t().contiguous())
            qs.append(q_g.view(torch.uint8).flatten())
            ss.append(s_g.t())
        elif k:
            ss.append(torch.empty((ceil_div(k, 128), 0), device=x.device))
        start += k
    q = torch.cat(qs) if qs else torch.empty(0, dtype=torch.uint8, device=x.device)
    s = torch.cat(ss) if ss else torch.empty((0, h), device=x.device)
    return q.view(FP8), s


def make_x(shape, dtype, device="cpu", seed=0):
    """Rows whose magnitudes span the dtype's range per token (so amaxes along T mix scales), with exact zeros,
    negative zeros and values 1e-6 times their neighbours (e4m3 subnormals, underflow to +-0)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device)
    lo, hi = (-8, 3) if dtype == torch.float16 else (-30, 30)
    exps = torch.randint(lo, hi + 1, (shape[0], 1), generator=gen, device=device)
    x = x * torch.pow(10.0, exps.float())
    u = torch.rand(shape, generator=gen, device=device)
    x = torch.where(u < 0.02, torch.zeros_like(x), x)
    x = torch.where((u >= 0.02) & (u < 0.03), torch.full_like(x, -0.0), x)
    x = torch.where((u >= 0.03) & (u < 0.06), x * 1e-6, x)
    return x.to(dtype)


# ---- reference semantics (CPU) ----------------------------------------------------------------------------
DENSE_SHAPES = [(1, 1), (1, 128), (7, 100), (128, 64), (129, 200), (300, 576), (256, 7168), (1000, 8), (16, 3)]


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
def test_dense_reference_is_per_token_cast_of_x_t(shape, dtype):
    x = make_x(shape, dtype, seed=shape[0] * 31 + shape[1])
    want_q, want_s = reference.per_token_cast_to_fp8(x.t().contiguous())
    for fn in (reference.per_token_cast_to_fp8_transposed, deep_gemm.per_token_cast_to_fp8_transposed):
        q, s = fn(x)
        assert q.dtype == FP8 and q.is_contiguous() and tuple(q.shape) == (shape[1], shape[0])
        assert_bits_equal(q, want_q, "q")
        assert_bits_equal(s, want_s, "scales")
        assert deep_gemm.utils.is_col_major_tma_aligned(s)
    # The public function's scales have exactly the fake kernel's (and the GPU path's) strides.
    _, s = deep_gemm.per_token_cast_to_fp8_transposed(x)
    assert s.stride() == (1, (shape[1] + 3) // 4 * 4)


def test_dense_reference_reads_row_strided_views():
    base = make_x((300, 600), torch.bfloat16, seed=3)
    x = base[:, 8:8 + 512]                         # rows 600 elements apart
    q, s = deep_gemm.per_token_cast_to_fp8_transposed(x)
    want_q, want_s = reference.per_token_cast_to_fp8(x.t().contiguous())
    assert_bits_equal(q, want_q, "q")
    assert_bits_equal(s, want_s, "scales")


@pytest.mark.parametrize("t,h", [(0, 5), (5, 0), (0, 0)])
def test_dense_empty(t, h):
    q, s = deep_gemm.per_token_cast_to_fp8_transposed(torch.randn(t, h))
    assert tuple(q.shape) == (h, t) and q.dtype == FP8
    assert tuple(s.shape) == (h, ceil_div(t, 128)) and s.dtype == torch.float32


GROUPINGS = [[256], [16], [0, 128, 0], [48, 128, 272, 0, 1024], [16] * 20, [0], [], [128 * 3 + 16, 16, 4096]]


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
@pytest.mark.parametrize("sizes", GROUPINGS, ids=str)
@pytest.mark.parametrize("h", [200, 64])
def test_k_grouped_reference_is_per_group_cast(sizes, dtype, h):
    x = make_x((sum(sizes), h), dtype, seed=len(sizes) + h)
    want_q, want_s = expected_grouped(x, sizes)
    for fn in (reference.k_grouped_per_token_cast_to_fp8_transposed, deep_gemm.k_grouped_per_token_cast_to_fp8_transposed):
        q, s = fn(x, sizes)
        assert q.dtype == FP8 and q.dim() == 1 and q.is_contiguous()
        assert s.is_contiguous() and tuple(s.shape) == (sum(ceil_div(k, 128) for k in sizes), h)
        assert_bits_equal(q, want_q, "q")
        assert_bits_equal(s, want_s, "scales")


def test_one_group_is_the_dense_cast_with_row_major_scales():
    x = make_x((272, 96), torch.bfloat16, seed=9)
    q, s = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [272])
    dq, ds = deep_gemm.per_token_cast_to_fp8_transposed(x)
    assert_bits_equal(q.view(96, 272), dq, "q")
    assert_bits_equal(s, ds.t(), "scales")


# ---- validation (CPU, and the same checks run before any kernel) ------------------------------------------
BAD_DENSE = [
    ("not a tensor", TypeError, "torch.Tensor"),
    (torch.zeros(4, 128, dtype=torch.int32), TypeError, "bfloat16, float16 or float32"),
    (torch.zeros(4, 128, dtype=torch.float64), TypeError, "bfloat16, float16 or float32"),
    (torch.zeros(2, 4, 128), ValueError, "2-D"),
    (torch.zeros(128), ValueError, "2-D"),
    (torch.zeros(128, 64).t(), ValueError, "adjacent columns"),
    (torch.zeros(64, 256)[:, ::2], ValueError, "adjacent columns"),
]


@pytest.mark.parametrize("x,error,match", BAD_DENSE, ids=lambda v: getattr(v, "__name__", None) or str(getattr(v, "shape", v)))
def test_bad_input_raises(x, error, match):
    for fn in (deep_gemm.per_token_cast_to_fp8_transposed, reference.per_token_cast_to_fp8_transposed,
               lambda x: deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [x.shape[0]] if
                                                                               isinstance(x, torch.Tensor) else [0])):
        with pytest.raises(error, match=match):
            fn(x)


@pytest.mark.parametrize("sizes,error,match", [
    ([16, 16], ValueError, "sum to the 48 rows"),
    ([64, -16], ValueError, "non-negative multiple of 16"),
    ([40, 8], ValueError, "multiple of 16"),
    ([16, 32.0], TypeError, r"k_sizes\[1\] must be an int"),
    ([True, 47], TypeError, r"k_sizes\[0\] must be an int"),
    ("48", TypeError, "list of ints"),
    (48, TypeError, "list of ints"),
    (torch.tensor([48]), TypeError, "list of ints"),
    (None, TypeError, "list of ints"),
])
def test_bad_k_sizes_raise(sizes, error, match):
    x = torch.zeros(48, 128, dtype=torch.bfloat16)
    for fn in (deep_gemm.k_grouped_per_token_cast_to_fp8_transposed,
               reference.k_grouped_per_token_cast_to_fp8_transposed):
        with pytest.raises(error, match=match):
            fn(x, sizes)


def test_k_sizes_as_tuple():
    x = make_x((64, 32), torch.bfloat16)
    q, s = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, (16, 48))
    want_q, want_s = expected_grouped(x, [16, 48])
    assert_bits_equal(q, want_q, "q")
    assert_bits_equal(s, want_s, "scales")


def test_cast_into_needs_a_hopper_gpu():
    x = torch.randn(32, 128)
    with pytest.raises(ValueError, match="CUDA tensor on a Hopper GPU"):
        cast.per_token_cast_transposed_into(x, torch.empty(128, 32, dtype=FP8), torch.empty(128, 1))
    with pytest.raises(ValueError, match="CUDA tensor on a Hopper GPU"):
        cast.k_grouped_per_token_cast_transposed_into(x, [16, 16], torch.empty(32 * 128, dtype=FP8),
                                                      torch.empty(2, 128))


def test_cpu_tensors_never_launch(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a cast kernel was launched for a CPU tensor")
    monkeypatch.setattr(cast, "_launch_transposed", no_kernel)
    monkeypatch.setattr(cast, "runs_on_hopper", lambda device: True)
    x = make_x((64, 64), torch.bfloat16)
    deep_gemm.per_token_cast_to_fp8_transposed(x)
    deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [32, 32])


# ---- the kernels' launch parameters (CPU: pointers are only arithmetic here) ---------------------------------
def _decode(config, params: bytes) -> dict:
    m = config.max_groups + 1
    fields = struct.unpack(f"<QQQq4i{m}i{m}i", params)
    assert len(params) == 56 + 8 * config.max_groups   # cast_transposed.cuh's static_assert on sizeof(Params)
    g = fields[5]
    return {"x": fields[0], "q": fields[1], "s": fields[2], "row_stride": fields[3], "s_ld": fields[4],
            "groups": g, "blocks": fields[6], "q_vec": fields[7], "token_start": list(fields[8:8 + g + 1]),
            "block_start": list(fields[8 + m:8 + m + g + 1])}


def test_dense_launch_parameters():
    x = torch.empty(1000, 7168, dtype=torch.bfloat16)
    q, s = cast.dense_transposed_outputs(x)
    config, launches = cast._transposed_launches(x, q, s, [1000], grouped=False)
    assert config == TransposedCastConfig(7168, "bf16", True, False)
    assert len(launches) == 1
    grid, params = launches[0]
    p = _decode(config, params)
    assert grid == 8 * 7168 // 64
    assert (p["x"], p["q"], p["s"]) == (x.data_ptr(), q.data_ptr(), s.data_ptr())
    assert (p["row_stride"], p["s_ld"], p["groups"], p["blocks"]) == (7168, 7168, 1, 8)
    assert p["q_vec"] == 0                          # 1000 % 16 != 0: output rows are not 16-byte aligned
    assert p["token_start"] == [0, 1000] and p["block_start"] == [0, 8]
    # H % 4 != 0: the scales' column stride is rounded up; 16-bit H % 8 != 0: element-wise loads.
    x = torch.empty(4096, 100, dtype=torch.float16)
    config, launches = cast._transposed_launches(x, *cast.dense_transposed_outputs(x), [4096], grouped=False)
    p = _decode(config, launches[0][1])
    assert not config.vec and p["s_ld"] == 100 and p["q_vec"] == 1
    assert launches[0][0] == 32 * 2
    # Row-strided x: 16-byte loads when the row stride keeps rows 16-byte aligned.
    base = torch.empty(64, 520, dtype=torch.bfloat16)
    for view, vec in ((base[:, 8:8 + 256], True), (base[:, 1:1 + 256], False), (base[:, :500][:, :496], True)):
        config, launches = cast._transposed_launches(view, *cast.dense_transposed_outputs(view), [64], grouped=False)
        assert config.vec == vec and _decode(config, launches[0][1])["row_stride"] == 520


def test_k_grouped_launch_parameters_split_past_the_group_limit():
    groups = TRANSPOSED_MAX_GROUPS + 44
    sizes = [(g % 5) * 48 for g in range(groups)]   # empty groups, partial blocks
    h = 96
    x = torch.empty(sum(sizes), h, dtype=torch.float32)
    q, s = cast.k_grouped_transposed_outputs(x, sizes)
    config, launches = cast._transposed_launches(x, q, s, sizes, grouped=True)
    assert config == TransposedCastConfig(h, "fp32", True, True)
    assert len(launches) == 2
    token_start = [sum(sizes[:g]) for g in range(groups + 1)]
    block_start = [sum(ceil_div(k, 128) for k in sizes[:g]) for g in range(groups + 1)]
    for (grid, params), first in zip(launches, (0, TRANSPOSED_MAX_GROUPS)):
        last = min(first + TRANSPOSED_MAX_GROUPS, groups)
        p = _decode(config, params)
        t0, b0 = token_start[first], block_start[first]
        assert p["groups"] == last - first and p["blocks"] == block_start[last] - b0
        assert grid == p["blocks"] * ceil_div(h, 32)
        assert p["x"] == x.data_ptr() + t0 * h * 4 and p["q"] == q.data_ptr() + t0 * h
        assert p["s"] == s.data_ptr() + b0 * h * 4 and p["s_ld"] == h and p["q_vec"] == 1
        assert p["token_start"] == [t - t0 for t in token_start[first:last + 1]]
        assert p["block_start"] == [b - b0 for b in block_start[first:last + 1]]


def test_k_grouped_without_tokens_launches_nothing():
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    _, launches = cast._transposed_launches(x, *cast.k_grouped_transposed_outputs(x, [0, 0]), [0, 0], grouped=True)
    assert launches == []


# ---- compilation (CPU: NVRTC for sm_90a) ------------------------------------------------------------------------
@pytest.fixture
def _nvrtc(monkeypatch, tmp_cache_dir):
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)


VARIANTS = [(h, vec) for h in (7168, 4096, 2048, 576, 64) for vec in (True, False)] + [(100, False), (3, False),
                                                                                        (1, False), (200, True)]


@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "k_grouped"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,vec", VARIANTS, ids=str)
def test_transposed_variant_compiles_clean(_nvrtc, h, vec, dtype, grouped):
    from deep_gemm.jit import compile_kernel
    if vec and h * (4 if dtype == "fp32" else 2) % 16:
        pytest.skip("no 16-byte variant for this H")
    config = TransposedCastConfig(h, dtype, vec, grouped)
    kernel = compile_kernel(transposed_cast_source(config), config.kernel_name, arch="sm_90a", name=config.name)
    r = kernel.resources
    assert (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes) == (0, 0, 0), kernel.log
    assert not r.warnings, r.warnings
    # The register budget that lets the intended number of CTAs share an SM, and one 16 KB tile each.
    assert r.registers <= 65536 // (config.num_threads * transposed_min_blocks(dtype, vec)), r.registers
    assert r.shared_bytes == 128 * 128


def test_transposed_source_constants():
    source = transposed_cast_source(TransposedCastConfig(7168, "bf16", True, True))
    inv = (torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32)).item()
    assert f"#define CAST_INV_FP8_MAX_BITS 0x{struct.unpack('<I', struct.pack('<f', inv))[0]:08X}u" in source
    assert "#define CAST_K 7168" in source and "#define CAST_VEC 1" in source
    assert f"#define CAST_MAX_GROUPS {TRANSPOSED_MAX_GROUPS}" in source
    assert source.rstrip().endswith('#include "cast_transposed.cuh"')
    assert "#define CAST_MAX_GROUPS 1" in transposed_cast_source(TransposedCastConfig(7168, "bf16", True, False))
    configs = [TransposedCastConfig(h, d, v, g) for h, v in VARIANTS for d in DTYPES for g in (False, True)
               if not (v and h * (4 if d == "fp32" else 2) % 16)]
    assert len({c.name for c in configs}) == len(configs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(h=0, dtype="bf16", vec=False, grouped=False), "h must"),
    (dict(h=True, dtype="bf16", vec=False, grouped=False), "h must"),
    (dict(h=128, dtype="fp8", vec=False, grouped=False), "dtype"),
    (dict(h=100, dtype="bf16", vec=True, grouped=False), "vec"),
])
def test_bad_transposed_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransposedCastConfig(**kwargs)


# ---- torch.compile and the custom ops (CPU) ----------------------------------------------------------------------
OP_NAMES = ("per_token_cast_to_fp8_transposed", "k_grouped_per_token_cast_to_fp8_transposed")


def _compiled_targets(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    try:
        out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    targets = {str(n.target).removesuffix(".default") for gm in graphs for n in gm.graph.nodes
               if n.op == "call_function"}
    return out, targets


def test_torch_compile_traces_the_ops():
    assert library.REGISTERED
    x = make_x((272, 96), torch.bfloat16, seed=4)

    def both(x):
        dense = deep_gemm.per_token_cast_to_fp8_transposed(x)
        grouped = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [16, 0, 256])
        return dense, grouped

    (dense, grouped), targets = _compiled_targets(both, x)
    assert {f"deep_gemm.{name}" for name in OP_NAMES} <= targets, targets
    for (q, s), (want_q, want_s) in ((dense, deep_gemm.per_token_cast_to_fp8_transposed(x)),
                                     (grouped, deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [16, 0, 256]))):
        assert_bits_equal(q, want_q, "q")
        assert_bits_equal(s, want_s, "scales")
        assert s.stride() == want_s.stride()


@pytest.mark.parametrize("shape", [(1, 1), (7, 100), (128, 64), (300, 576), (0, 64), (64, 0)], ids=str)
def test_fake_kernels_match_real(shape):
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(*shape, dtype=torch.bfloat16)
    sizes = [shape[0]] if shape[0] % 16 == 0 else None
    calls = [(torch.ops.deep_gemm.per_token_cast_to_fp8_transposed, (x,))]
    if sizes is not None:
        calls.append((torch.ops.deep_gemm.k_grouped_per_token_cast_to_fp8_transposed, (x, sizes)))
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for r, f in zip(real, fake):
            assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(r.shape), r.stride(), r.dtype), op


def test_fake_kernels_reject_bad_input():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(TypeError, match="x must be"):
            torch.ops.deep_gemm.per_token_cast_to_fp8_transposed(torch.empty(4, 128, dtype=torch.int32))
        with pytest.raises(ValueError, match="sum to"):
            torch.ops.deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(torch.empty(48, 128), [16, 16])


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    x = make_x((48, 200), torch.bfloat16, seed=2)
    args = (x,) if name == OP_NAMES[0] else (x, [16, 0, 32])
    # test_schema compares outputs with allclose, which CPU torch lacks for float8.
    opcheck(getattr(torch.ops.deep_gemm, name).default, args,
            test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_bench_rows_are_valid_casts():
    from deep_gemm import bench_casts as bench
    sizes = bench._cast_k_sizes(8192)
    assert len(sizes) == 8 and sum(sizes) == 8192 and all(k % 16 == 0 for k in sizes)
    assert bench._cast_k_sizes(bench.CAST_HOST_SHAPE[0]) == [16] * 8
    kinds = {kind for _, kind, _, _ in bench.CAST_CASES}
    assert {"transposed", "k_grouped_transposed"} <= kinds
    x = torch.empty(8192, 7168, dtype=torch.bfloat16)
    scales = 7168 * sum(ceil_div(k, 128) for k in sizes)
    assert bench._moved_bytes("k_grouped_transposed", x) == 3 * x.numel() + 4 * scales
    assert bench._moved_bytes("transposed", x) == 3 * x.numel() + 4 * 7168 * 64


def test_exported_and_documented():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in OP_NAMES:
        assert name in deep_gemm.__all__ and callable(getattr(deep_gemm, name))
        assert f"`{name}(" in readme, name


# =================================================================================================================
# GPU: the kernels against the torch reference run on the same CUDA tensor.
# =================================================================================================================
def _tma_scales(h: int, t: int, fill: float = float("nan")) -> torch.Tensor:
    """Dense scales [H, ceil(T/128)] in their column-major TMA-aligned storage, poisoned (padding included)."""
    storage = torch.full((ceil_div(t, 128), (h + 3) // 4 * 4), fill, device="cuda")
    return storage.t()[:h]


def check_dense(x: torch.Tensor) -> None:
    t, h = x.shape
    want_q, want_s = reference.per_token_cast_to_fp8_transposed(x)
    if t and h:   # the reference is the per-token cast of x.T itself
        q_t, s_t = reference.per_token_cast_to_fp8(x.t().contiguous())
        assert_bits_equal(want_q, q_t, "reference q")
        assert_bits_equal(want_s, s_t, "reference scales")
    q = torch.full((h, t), 0x7F, dtype=torch.uint8, device="cuda").view(FP8)   # e4m3 NaN bytes
    s = _tma_scales(h, t)
    cast.per_token_cast_transposed_into(x, q, s)
    assert_bits_equal(q, want_q, "q")
    assert_bits_equal(s, want_s, "scales")
    if s.numel():   # the storage's padding rows (H .. H rounded up to 4) are not written
        padding = s.as_strided((s.shape[1], s.stride(1)), (s.stride(1), 1))[:, h:]
        assert padding.isnan().all()
    q2, s2 = deep_gemm.per_token_cast_to_fp8_transposed(x)
    assert q2.is_contiguous() and s2.stride() == (1, (h + 3) // 4 * 4)
    assert_bits_equal(q2, want_q, "q (public)")
    assert_bits_equal(s2, want_s, "scales (public)")


def check_grouped(x: torch.Tensor, sizes) -> None:
    t, h = x.shape
    want_q, want_s = reference.k_grouped_per_token_cast_to_fp8_transposed(x, sizes)
    oracle_q, oracle_s = expected_grouped(x, sizes)
    assert_bits_equal(want_q, oracle_q, "reference q")
    assert_bits_equal(want_s, oracle_s, "reference scales")
    # Poisoned outputs inside larger buffers: nothing before or after them may be written.
    q_buf = torch.full((t * h + 64,), 0x7F, dtype=torch.uint8, device="cuda")
    s_buf = torch.full((want_s.numel() + 8,), float("nan"), device="cuda")
    q = q_buf[32:32 + t * h].view(FP8)
    s = s_buf[4:4 + want_s.numel()].view(want_s.shape)
    cast.k_grouped_per_token_cast_transposed_into(x, sizes, q, s)
    assert_bits_equal(q, want_q, "q")
    assert_bits_equal(s, want_s, "scales")
    assert (q_buf[:32] == 0x7F).all() and (q_buf[32 + t * h:] == 0x7F).all()
    assert s_buf[:4].isnan().all() and s_buf[4 + want_s.numel():].isnan().all()
    q2, s2 = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, sizes)
    assert_bits_equal(q2, want_q, "q (public)")
    assert_bits_equal(s2, want_s, "scales (public)")


GPU_DENSE_SHAPES = [(1, 1), (7, 100), (128, 64), (129, 200), (1000, 7168), (4096, 2048), (333, 576), (16, 3),
                    (2048, 4096), (130, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
@pytest.mark.parametrize("shape", GPU_DENSE_SHAPES, ids=str)
def test_gpu_dense_matches_reference(shape, dtype):
    check_dense(make_x(shape, dtype, device="cuda", seed=shape[0] * 7 + shape[1]))


@pytest.mark.gpu
def test_gpu_dense_strided_and_misaligned():
    base = make_x((600, 7168 + 24), torch.bfloat16, device="cuda", seed=5)
    for x in (base[:, 8:8 + 7168],          # rows 16-byte aligned, longer stride: 16-byte loads
              base[:, 1:1 + 576],           # rows 2 bytes off: element-wise loads
              base[:500, :4096],
              base[:1, :7168],
              base[:, :7168 + 24][:, :1000]):
        check_dense(x)


GPU_GROUPINGS = [[4096], [16], [0, 128, 0], [48, 128, 272, 0, 1024], [976, 1072, 1024, 1008, 1040, 960, 1088, 1024],
                 [0, 0], [16] * 40, [(g % 5) * 48 for g in range(TRANSPOSED_MAX_GROUPS + 44)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
@pytest.mark.parametrize("sizes", GPU_GROUPINGS, ids=lambda s: f"{len(s)}groups_{sum(s)}")
@pytest.mark.parametrize("h", [7168, 200, 100])
def test_gpu_k_grouped_matches_reference(sizes, dtype, h):
    if h == 7168 and (dtype != torch.bfloat16 or sum(sizes) > 8192):
        pytest.skip("large H: bf16 up to 8192 tokens suffices (the other H cover the rest)")
    check_grouped(make_x((sum(sizes), h), dtype, device="cuda", seed=len(sizes) * 13 + h), sizes)


@pytest.mark.gpu
def test_gpu_nan_and_inf_propagate_like_the_reference():
    x = make_x((300, 200), torch.float32, device="cuda", seed=11)
    x[5, 3] = float("inf")
    x[200, 10] = float("-inf")
    x[130, 20] = float("nan")
    x[0:128, 30] = float("inf")
    for (q, s), (want_q, want_s) in (
            (deep_gemm.per_token_cast_to_fp8_transposed(x), reference.per_token_cast_to_fp8_transposed(x)),
            (deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x[:288], [160, 128]),
             reference.k_grouped_per_token_cast_to_fp8_transposed(x[:288], [160, 128]))):
        qn, qn_ref = q.float().isnan(), want_q.float().isnan()
        assert torch.equal(qn, qn_ref) and torch.equal(s.isnan(), want_s.isnan())
        assert_bits_equal(q.view(torch.uint8)[~qn], want_q.view(torch.uint8)[~qn], "q")
        assert_bits_equal(s[~s.isnan()], want_s[~want_s.isnan()], "scales")


@pytest.mark.gpu
def test_gpu_kernel_path_is_taken(monkeypatch):
    x = make_x((256, 576), torch.bfloat16, device="cuda", seed=1)
    want = reference.per_token_cast_to_fp8_transposed(x), reference.k_grouped_per_token_cast_to_fp8_transposed(
        x, [128, 128])

    def no_reference(*args):
        raise AssertionError("the torch reference ran instead of the cast kernel")
    monkeypatch.setattr(reference, "per_token_cast_to_fp8_transposed", no_reference)
    monkeypatch.setattr(reference, "k_grouped_per_token_cast_to_fp8_transposed", no_reference)
    before = cast.launch_count
    got = deep_gemm.per_token_cast_to_fp8_transposed(x), deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(
        x, [128, 128])
    assert cast.launch_count == before + 2
    for (q, s), (want_q, want_s) in zip(got, want):
        assert_bits_equal(q, want_q, "q")
        assert_bits_equal(s, want_s, "scales")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    x = make_x((1024, 2048), torch.bfloat16, device="cuda", seed=21)
    sizes = [256, 0, 400, 368]
    deep_gemm.per_token_cast_to_fp8_transposed(x)     # warm-up: compile and load before capture
    deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, sizes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dq, ds = deep_gemm.per_token_cast_to_fp8_transposed(x)
        gq, gs = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, sizes)
    for seed in (22, 23):
        x.copy_(make_x(x.shape, x.dtype, device="cuda", seed=seed))
        for t in (dq, gq):
            t.view(torch.uint8).fill_(0x7F)
        for t in (ds, gs):
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for (q, s), (want_q, want_s) in (((dq, ds), reference.per_token_cast_to_fp8_transposed(x)),
                                         ((gq, gs), reference.k_grouped_per_token_cast_to_fp8_transposed(x, sizes))):
            assert_bits_equal(q, want_q, "q after replay")
            assert_bits_equal(s, want_s, "scales after replay")


@pytest.mark.gpu
def test_gpu_capture_without_warmup_says_how_to_fix(monkeypatch):
    from deep_gemm.runtime.kernels import KernelNotReadyError
    from deep_gemm.runtime.launch import LaunchCache
    monkeypatch.setattr(cast, "_loaded", {})
    monkeypatch.setattr(cast, "_launches", LaunchCache())
    x = make_x((64, 256), torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(KernelNotReadyError, match="before capture"):
        with torch.cuda.graph(graph):
            deep_gemm.per_token_cast_to_fp8_transposed(x)


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True], ids=["dense", "k_grouped"])
def test_gpu_repeated_casts_through_the_launch_cache(grouped, monkeypatch):
    """The same x into the same outputs on one stream: the first call's launch is cached, the second builds a
    one-kernel graph of it, later ones launch that graph; each must read x's current contents. Other group sizes
    on the same pointers are another launch."""
    from deep_gemm.runtime.launch import LaunchCache
    monkeypatch.setattr(cast, "_launches", LaunchCache())
    x = make_x((1024, 4096), torch.bfloat16, device="cuda", seed=31)
    sizes = [512, 256, 256]
    if grouped:
        q = torch.empty(x.numel(), dtype=FP8, device="cuda")
        s = torch.empty((8, 4096), device="cuda")
    else:
        q = torch.empty((4096, 1024), dtype=FP8, device="cuda")
        s = _tma_scales(4096, 1024)

    def call(k_sizes):
        if grouped:
            cast.k_grouped_per_token_cast_transposed_into(x, k_sizes, q, s)
            return reference.k_grouped_per_token_cast_to_fp8_transposed(x, k_sizes)
        cast.per_token_cast_transposed_into(x, q, s)
        return reference.per_token_cast_to_fp8_transposed(x)

    for seed in range(40, 44):
        x.copy_(make_x(x.shape, x.dtype, device="cuda", seed=seed))
        q.view(torch.uint8).fill_(0x7F)
        s.fill_(float("nan"))
        want_q, want_s = call(sizes)
        assert_bits_equal(q, want_q, f"q (call {seed - 39})")
        assert_bits_equal(s, want_s, f"scales (call {seed - 39})")
    cached = [launch for entries in cast._launches._entries.values() for _, launch in entries]
    assert len(cached) == 1 and cached[0]._graph is not None
    if grouped:   # same pointers and shapes, other sizes: not the cached launch
        want_q, want_s = call([256, 512, 256])
        assert_bits_equal(q, want_q, "q (other sizes)")
        assert_bits_equal(s, want_s, "scales (other sizes)")


@pytest.mark.gpu
def test_gpu_bad_outputs_raise():
    x = make_x((256, 512), torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="q must have shape"):
        cast.per_token_cast_transposed_into(x, torch.empty((256, 512), dtype=FP8, device="cuda"), _tma_scales(512, 256))
    with pytest.raises(ValueError, match="scales must have strides"):
        cast.per_token_cast_transposed_into(x, torch.empty((512, 256), dtype=FP8, device="cuda"),
                                            torch.empty((512, 2), device="cuda"))
    with pytest.raises(TypeError, match="scales must be torch.float32"):
        cast.k_grouped_per_token_cast_transposed_into(x, [256], torch.empty(256 * 512, dtype=FP8, device="cuda"),
                                                      torch.empty((2, 512), dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="scales must have shape"):
        cast.k_grouped_per_token_cast_transposed_into(x, [128, 128], torch.empty(256 * 512, dtype=FP8, device="cuda"),
                                                      torch.empty((1, 512), device="cuda"))


@pytest.mark.gpu
def test_gpu_torch_compile_runs_the_kernels():
    x = make_x((1024, 2048), torch.bfloat16, device="cuda", seed=8)
    sizes = [512, 0, 512]

    def both(x):
        return (deep_gemm.per_token_cast_to_fp8_transposed(x),
                deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, sizes))

    before = cast.launch_count
    (dense, grouped), targets = _compiled_targets(both, x)
    assert {f"deep_gemm.{name}" for name in OP_NAMES} <= targets, targets
    assert cast.launch_count >= before + 2
    for (q, s), (want_q, want_s) in ((dense, reference.per_token_cast_to_fp8_transposed(x)),
                                     (grouped, reference.k_grouped_per_token_cast_to_fp8_transposed(x, sizes))):
        assert_bits_equal(q, want_q, "q")
        assert_bits_equal(s, want_s, "scales")
    # Through AOT autograd's functionalisation too, which relies on the fake kernels' shapes and strides.
    torch._dynamo.reset()
    (dense2, grouped2) = torch.compile(both, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    for (q, s), (want_q, want_s) in ((dense2, dense), (grouped2, grouped)):
        assert_bits_equal(q, want_q, "q (aot_eager)")
        assert_bits_equal(s, want_s, "scales (aot_eager)")
        assert s.stride() == want_s.stride()
