"""torch.compile / torch.library support (deep_gemm/ops/library.py, routed from deep_gemm/api.py).

CPU: the public functions trace to torch.ops.deep_gemm.* under torch.compile(fullgraph=True)
(the reference path runs inside), outputs equal eager, the fake kernels give the real shapes
and strides, and torch.library.opcheck accepts every op. Eager calls never go through the ops,
and the ops' real kernels (ops.gemm.run / ops.cast) never route back to them. GPU: the same on
Hopper kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deep_gemm
from deep_gemm import api, reference
from deep_gemm.config import Layout
from deep_gemm.ops import library

OPS = ("gemm_fp8_fp8_bf16_nt", "gemm_fp8_fp8_bf16_nt_out", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
       "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "per_token_cast_to_fp8", "per_block_cast_to_fp8",
       "fp8_gemm_nt_training", "k_grouped_fp8_gemm_nt", "k_grouped_fp8_gemm_nt_device_sizes",
       "per_token_cast_to_fp8_transposed",
       "k_grouped_per_token_cast_to_fp8_transposed", "bf16_gemm_nt", "m_grouped_bf16_gemm_nt_contiguous",
       "m_grouped_bf16_gemm_nt_masked", "k_grouped_bf16_gemm_tn", "k_grouped_bf16_gemm_tn_device_sizes")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class MLP(torch.nn.Module):
    """x -> gemm(fp8(x), W1) -> act -> gemm(fp8(.), W2), weights cast once at construction."""

    def __init__(self, hidden: int, inner: int, act=F.silu, device="cpu", seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w1 = torch.randn(inner, hidden, generator=g).to(device, torch.bfloat16)
        w2 = torch.randn(hidden, inner, generator=g).to(device, torch.bfloat16)
        self.w1 = deep_gemm.per_block_cast_to_fp8(w1)
        self.w2 = deep_gemm.per_block_cast_to_fp8(w2)
        self.act = act

    def forward(self, x):
        h = deep_gemm.gemm_fp8_fp8_bf16_nt(deep_gemm.per_token_cast_to_fp8(x), self.w1)
        h = self.act(h)
        return deep_gemm.gemm_fp8_fp8_bf16_nt(deep_gemm.per_token_cast_to_fp8(h), self.w2)


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def _targets(gm) -> set:
    # Dynamo records the op packet ("deep_gemm.x"), AOT graphs the overload ("deep_gemm.x.default").
    return {str(node.target).removesuffix(".default") for node in gm.graph.nodes if node.op == "call_function"}


def test_ops_registered():
    assert library.REGISTERED and set(library.OPS) == set(OPS)
    assert api._ops is torch.ops.deep_gemm
    for name in OPS:
        assert hasattr(torch.ops.deep_gemm, name), name
        schema, mutated, real, fake = library.OPS[name]
        assert callable(real) and callable(fake)
        assert set(mutated) == ({"out"} if "Tensor(a!) out" in schema else set()), name


def test_mlp_traces_to_custom_ops_without_breaks():
    model = MLP(256, 384)
    x = torch.randn(48, 256, dtype=torch.bfloat16)
    graphs = []
    out = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))(x)
    assert len(graphs) == 1
    targets = _targets(graphs[0])
    assert "deep_gemm.per_token_cast_to_fp8" in targets
    assert "deep_gemm.gemm_fp8_fp8_bf16_nt" in targets
    assert torch.equal(out, model(x))


@pytest.mark.parametrize("shape", [(48, 256), (1, 256), (130, 256)])
def test_mlp_aot_eager_equals_eager(shape):
    # aot_eager runs functionalisation and the fake kernels, then the very same kernels: bitwise equal.
    model = MLP(256, 200, act=F.gelu)   # N = 200: a padded (non-contiguous) output of the first GEMM
    x = torch.randn(*shape, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))


def test_mlp_dynamic_m():
    model = MLP(256, 128)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (5, 64, 130, 7):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), model(x)), m


def test_mlp_inductor():
    model = MLP(256, 384)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    out = torch.compile(model, fullgraph=True)(x)
    # Inductor may round the activation differently from eager by an ulp, which can move one
    # fp8 value of the second cast: compare with DeepGEMM's metric, not bitwise.
    assert out.shape == (40, 256) and out.dtype == torch.bfloat16
    assert reference.calc_diff(out, model(x)) < 1e-4


def _grouped_inputs(device="cpu", g=3, m_per=128, n=136, k=256):
    gen = torch.Generator().manual_seed(1)
    a = deep_gemm.per_token_cast_to_fp8(torch.randn(g * m_per, k, generator=gen).to(device, torch.bfloat16))
    b = deep_gemm.per_block_cast_to_fp8(torch.randn(g, n, k, generator=gen).to(device, torch.bfloat16))
    m_indices = torch.arange(g, dtype=torch.int32).repeat_interleave(m_per).to(device)
    m_indices[-5:] = -1
    am = deep_gemm.per_token_cast_to_fp8(torch.randn(g, m_per, k, generator=gen).to(device, torch.bfloat16))
    masked_m = torch.tensor([m_per, 3, 0][:g], dtype=torch.int32, device=device)
    return a, b, m_indices, am, masked_m


def test_grouped_and_out_variants_compile():
    a, b, m_indices, am, masked_m = _grouped_inputs()
    g, n = b[0].shape[0], b[0].shape[1]
    w = (b[0][0], b[1][0])

    def fn(a, b, m_indices, am, masked_m):
        out_c = torch.zeros(a[0].shape[0], n, dtype=torch.bfloat16)
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, out_c, m_indices)
        out_m = torch.zeros(g, am[0].shape[1], n, dtype=torch.bfloat16)
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(am, b, out_m, masked_m, 64)
        out_d = torch.empty(a[0].shape[0], n, dtype=torch.bfloat16)
        deep_gemm.fp8_gemm_nt(a, w, out_d)
        return out_c * 2, out_m, out_d

    graphs = []
    compiled = torch.compile(fn, fullgraph=True, backend=_recording_backend(graphs))
    got = compiled(a, b, m_indices, am, masked_m)
    assert {"deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked",
            "deep_gemm.gemm_fp8_fp8_bf16_nt_out"} <= _targets(graphs[0])
    want = fn(a, b, m_indices, am, masked_m)
    torch._dynamo.reset()
    again = torch.compile(fn, fullgraph=True, backend="aot_eager")(a, b, m_indices, am, masked_m)
    for x, y, z in zip(got, want, again):
        assert torch.equal(x, y) and torch.equal(z, y)


def _fake_vs_real(op, *args):
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args])
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(real, fake):
        assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(r.shape), r.stride(), r.dtype), op


CAST_SHAPES = [(1, 1), (1, 128), (3, 100), (4, 129), (8, 256), (5, 300), (0, 256),
               (2, 3, 256), (3, 5, 100), (2, 4, 128), (2, 1, 64), (1, 7, 384)]


@pytest.mark.parametrize("shape", CAST_SHAPES)
def test_fake_casts_match_real(shape):
    x = torch.randn(*shape, dtype=torch.bfloat16)
    _fake_vs_real(torch.ops.deep_gemm.per_token_cast_to_fp8, x)
    _fake_vs_real(torch.ops.deep_gemm.per_block_cast_to_fp8, x)
    q, s = torch.ops.deep_gemm.per_token_cast_to_fp8(x)
    assert deep_gemm.utils.is_col_major_tma_aligned(s)
    assert s.stride() == library.tma_scales_strides(s.shape)  # no size-1 surprises either
    ref_q, ref_s = deep_gemm.per_token_cast_to_fp8(x)
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("m, n, k", [(1, 128, 128), (7, 100, 200), (64, 136, 512), (0, 64, 128)])
def test_fake_gemm_matches_real(m, n, k):
    a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, dtype=torch.bfloat16))
    b = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, dtype=torch.bfloat16))
    _fake_vs_real(torch.ops.deep_gemm.gemm_fp8_fp8_bf16_nt, *a, *b)


def test_fake_kernels_reject_bad_input():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(TypeError, match="x must be"):
            torch.ops.deep_gemm.per_token_cast_to_fp8(torch.empty(4, 128, dtype=torch.int32))
        a, sa = torch.empty(4, 128, dtype=torch.float8_e4m3fn), torch.empty(4, 1)
        b, sb = torch.empty(8, 256, dtype=torch.float8_e4m3fn), torch.empty(1, 2)
        with pytest.raises(ValueError, match="rhs"):
            torch.ops.deep_gemm.gemm_fp8_fp8_bf16_nt(a, sa, b, sb)
        with pytest.raises(ValueError, match="out"):
            torch.ops.deep_gemm.gemm_fp8_fp8_bf16_nt_out(a, sa, b[:, :128], sb[:, :1],
                                                         torch.empty(4, 9, dtype=torch.bfloat16))


def _opcheck_cases():
    a, b, m_indices, am, masked_m = _grouped_inputs(g=2, m_per=128, n=64, k=128)
    n = b[0].shape[1]
    x = torch.randn(6, 200, dtype=torch.bfloat16)
    w = (b[0][0], b[1][0])
    return {
        "gemm_fp8_fp8_bf16_nt": (*a, *w),
        "gemm_fp8_fp8_bf16_nt_out": (*a, *w, torch.empty(a[0].shape[0], n, dtype=torch.bfloat16)),
        "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous": (*a, *b, torch.zeros(a[0].shape[0], n, dtype=torch.bfloat16),
                                                      m_indices, False),
        "m_grouped_gemm_fp8_fp8_bf16_nt_masked": (*am, *b, torch.zeros(2, 128, n, dtype=torch.bfloat16),
                                                  masked_m[:2], 64),
        "per_token_cast_to_fp8": (x,),
        "per_block_cast_to_fp8": (x,),
        "fp8_gemm_nt_training": (*a, *deep_gemm.per_token_cast_to_fp8(torch.randn(n, 128)),
                                 torch.zeros(a[0].shape[0], n), True, True),
        "per_token_cast_to_fp8_transposed": (x,),
        "k_grouped_per_token_cast_to_fp8_transposed": (torch.randn(48, 200, dtype=torch.bfloat16), [16, 0, 32]),
        "k_grouped_fp8_gemm_nt": (a[0].reshape(-1), a[1].T.contiguous(), w[0].reshape(-1),
                                  deep_gemm.per_token_cast_to_fp8(torch.randn(n, 128))[1].T.contiguous(),
                                  torch.zeros(1, a[0].shape[0], n), [128], True),
        "k_grouped_fp8_gemm_nt_device_sizes": (a[0].reshape(-1), a[1].T.contiguous(), w[0].reshape(-1),
                                               deep_gemm.per_token_cast_to_fp8(torch.randn(n, 128))[1].T.contiguous(),
                                               torch.zeros(1, a[0].shape[0], n), torch.tensor([128], dtype=torch.int32),
                                               True),
        "bf16_gemm_nt": (torch.randn(6, 64, dtype=torch.bfloat16), torch.randn(64, 24, dtype=torch.bfloat16).T,
                         torch.randn(6, 24), True),
        "m_grouped_bf16_gemm_nt_contiguous": (torch.randn(256, 64, dtype=torch.bfloat16),
                                              torch.randn(2, 24, 64, dtype=torch.bfloat16),
                                              torch.zeros(256, 24, dtype=torch.bfloat16), m_indices),
        "m_grouped_bf16_gemm_nt_masked": (torch.randn(2, 16, 64, dtype=torch.bfloat16),
                                          torch.randn(2, 24, 64, dtype=torch.bfloat16),
                                          torch.zeros(2, 16, 24, dtype=torch.bfloat16),
                                          torch.tensor([5, 16], dtype=torch.int32), 8),
        "k_grouped_bf16_gemm_tn": (torch.randn(24, 16, dtype=torch.bfloat16), torch.randn(24, 8, dtype=torch.bfloat16),
                                   torch.ones(3, 16, 8), [16, 0, 8], True),
        "k_grouped_bf16_gemm_tn_device_sizes": (torch.randn(32, 16, dtype=torch.bfloat16),
                                                torch.randn(32, 8, dtype=torch.bfloat16), torch.ones(3, 16, 8),
                                                torch.tensor([16, 0, 8], dtype=torch.int32), True),
    }


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    args = _opcheck_cases()[name]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if any(isinstance(x, torch.Tensor) and x.dtype == torch.float8_e4m3fn for x in args):
        # test_schema compares every tensor an inner op touches with allclose, which CPU torch
        # lacks for float8: test_op_schema_claims checks the same claims for these ops.
        utils = utils[1:]
    opcheck(getattr(torch.ops.deep_gemm, name).default, args, test_utils=utils)


@pytest.mark.parametrize("name", OPS[:4])
def test_op_schema_claims(name):
    # What opcheck's test_schema would check: only `out` is written, a returned tensor is new.
    args = _opcheck_cases()[name]
    before = [x.clone() for x in args if isinstance(x, torch.Tensor)]
    result = getattr(torch.ops.deep_gemm, name)(*args)
    tensors = [x for x in args if isinstance(x, torch.Tensor)]
    mutated = {i for i, (x, y) in enumerate(zip(before, tensors))
               if not torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                                  y.view(torch.uint8) if y.element_size() == 1 else y)}
    assert mutated <= {4}, mutated   # argument 4 is `out` in every GEMM schema
    if name == "gemm_fp8_fp8_bf16_nt":
        assert all(result.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for x in tensors)
    else:
        assert result is None and mutated == {4}


class _NoRouting:
    """Stands in for torch.ops.deep_gemm in deep_gemm.api: any use is a failure."""

    def __getattr__(self, name):
        raise AssertionError(f"routed to torch.ops.deep_gemm.{name}")




def _small_calls():
    """(x, w, grouped inputs): small CPU operands of every public GEMM."""
    x = deep_gemm.per_token_cast_to_fp8(torch.randn(4, 128, dtype=torch.bfloat16))
    w = deep_gemm.per_block_cast_to_fp8(torch.randn(16, 128, dtype=torch.bfloat16))
    return x, w, _grouped_inputs(g=2, m_per=128, n=64, k=128)


def test_eager_calls_never_route(monkeypatch, pipeline_runs):
    # Outside tracing the public functions run their own path (no dispatcher round trip).
    assert not library.is_compiling()
    runs = pipeline_runs
    runs.clear()   # count from here on
    monkeypatch.setattr(api, "_ops", _NoRouting())
    x, w, (a, b, m_indices, am, masked_m) = _small_calls()
    assert deep_gemm.gemm_fp8_fp8_bf16_nt(x, w).shape == (4, 16)
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    assert deep_gemm.fp8_gemm_nt(x, w, out) is None   # DeepGEMM 2.x: d is written in place
    out_c = torch.zeros(a[0].shape[0], 64, dtype=torch.bfloat16)
    assert deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, out_c, m_indices) is out_c
    out_m = torch.zeros(2, 128, 64, dtype=torch.bfloat16)
    assert deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(am, b, out_m, masked_m[:2], 64) is out_m
    assert runs == [Layout.DENSE, Layout.DENSE, Layout.CONTIGUOUS, Layout.MASKED]


def _force_compiling(monkeypatch):
    # Inductor may run a real kernel (constant folding) while newer torch keeps is_compiling()
    # True; here the flag is raised by hand.
    if not isinstance(getattr(torch.compiler, "_is_compiling_flag", None), bool):
        pytest.skip("this torch has no is_compiling flag")
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert library.is_compiling() and api._is_compiling()


def test_real_kernels_run_while_compiling_flag_is_up(monkeypatch, pipeline_runs):
    """The ops' real kernels call ops.gemm.run / ops.cast directly: with is_compiling() True they
    still compute, once, and never route back through the public functions to their own op."""
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    want_q, want_s = deep_gemm.per_token_cast_to_fp8(x)
    want_bq, want_bs = deep_gemm.per_block_cast_to_fp8(x)
    w = reference.per_block_cast_to_fp8(torch.randn(16, 128, dtype=torch.bfloat16))
    want = deep_gemm.gemm_fp8_fp8_bf16_nt((want_q, want_s), w)
    _, _, (a, b, m_indices, am, masked_m) = _small_calls()
    want_c = torch.zeros(a[0].shape[0], 64, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, want_c, m_indices)
    want_m = torch.zeros(2, 128, 64, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(am, b, want_m, masked_m[:2], 64)

    runs = pipeline_runs
    runs.clear()   # count from here on
    monkeypatch.setattr(api, "_ops", _NoRouting())   # a real kernel routing back would land here
    _force_compiling(monkeypatch)
    ops = torch.ops.deep_gemm
    q, s = ops.per_token_cast_to_fp8(x)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    bq, bs = ops.per_block_cast_to_fp8(x)
    assert torch.equal(bs, want_bs) and torch.equal(bq.view(torch.uint8), want_bq.view(torch.uint8))
    assert torch.equal(ops.gemm_fp8_fp8_bf16_nt(q, s, *w), want)
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    ops.gemm_fp8_fp8_bf16_nt_out(q, s, *w, out)
    assert torch.equal(out, want)
    out_c = torch.zeros_like(want_c)
    ops.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(*a, *b, out_c, m_indices, False)
    out_m = torch.zeros_like(want_m)
    ops.m_grouped_gemm_fp8_fp8_bf16_nt_masked(*am, *b, out_m, masked_m[:2], 64)
    assert torch.equal(out_c, want_c) and torch.equal(out_m, want_m)
    assert runs == [Layout.DENSE, Layout.DENSE, Layout.CONTIGUOUS, Layout.MASKED]
    assert torch.compiler._is_compiling_flag is True


def test_public_functions_route_to_one_op_while_compiling(monkeypatch, pipeline_runs):
    """While tracing, each public function is one custom op call, whose real kernel runs the
    pipeline exactly once (no recursion through the public function)."""
    x, w, (a, b, m_indices, am, masked_m) = _small_calls()
    want = deep_gemm.gemm_fp8_fp8_bf16_nt(x, w)
    want_c = torch.zeros(a[0].shape[0], 64, dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, want_c, m_indices)
    runs = pipeline_runs
    runs.clear()   # count from here on
    routed = []

    class Recording:
        def __getattr__(self, name):
            routed.append(name)
            return getattr(torch.ops.deep_gemm, name)
    monkeypatch.setattr(api, "_ops", Recording())
    _force_compiling(monkeypatch)
    xb = torch.randn(4, 128, dtype=torch.bfloat16)
    q, s = deep_gemm.per_token_cast_to_fp8(xb)
    assert q.shape == (4, 128) and s.stride() == library.tma_scales_strides(s.shape)
    assert torch.equal(deep_gemm.gemm_fp8_fp8_bf16_nt(x, w), want)
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    assert deep_gemm.gemm_fp8_fp8_bf16_nt(x, w, out) is out and torch.equal(out, want)
    out_c = torch.zeros_like(want_c)
    assert deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, out_c, m_indices) is out_c
    assert torch.equal(out_c, want_c)
    with pytest.raises(TypeError, match="lhs must be a"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(x[0], w)
    assert routed == ["per_token_cast_to_fp8", "gemm_fp8_fp8_bf16_nt", "gemm_fp8_fp8_bf16_nt_out",
                      "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous"]
    assert runs == [Layout.DENSE, Layout.DENSE, Layout.CONTIGUOUS]


# ---- Hopper ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("m", [96, 300])  # 300: the first GEMM's 48 tiles are split over K (workspace)
def test_mlp_compiled_on_gpu(mode, m, tmp_cache_dir):
    model = MLP(7168, 2048, device="cuda")
    x = torch.randn(m, 7168, device="cuda", dtype=torch.bfloat16)
    want = model(x)  # eager first: compiles and loads the kernels (CUDA-graph capture can't)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records a CUDA graph on a later call, then replays it
        out = compiled(x)
    torch.cuda.synchronize()
    assert out.shape == want.shape and out.dtype == torch.bfloat16
    assert reference.calc_diff(out, want) < 1e-4


@pytest.mark.gpu
def test_grouped_compiled_on_gpu(tmp_cache_dir):
    a, b, m_indices, am, masked_m = _grouped_inputs(device="cuda", g=3, m_per=128, n=256, k=512)

    def fn(a, b, m_indices, am, masked_m):
        out_c = torch.zeros(a[0].shape[0], 256, dtype=torch.bfloat16, device="cuda")
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, out_c, m_indices)
        out_m = torch.zeros(3, 128, 256, dtype=torch.bfloat16, device="cuda")
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(am, b, out_m, masked_m, 64)
        return out_c, out_m

    want = fn(a, b, m_indices, am, masked_m)
    got = torch.compile(fn, fullgraph=True)(a, b, m_indices, am, masked_m)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
