"""BF16 GEMMs: the DeepGEMM 2.x API surface. CPU: results against a float64 reference, every
validation error, the 2.x signatures and torch.compile tracing. GPU (`gpu` marker): the same on CUDA,
the BF16 kernel's calls (dense NT, M up to 128: which calls take it, odd shapes, fp32 and
accumulated outputs, the launch cache and its templates, CUDA-graph capture), CUDA-graph capture
of the masked call."""
from __future__ import annotations

import inspect

import pytest
import torch

import deep_gemm
from deep_gemm import reference
from deep_gemm.reference import calc_diff

TOL = 1e-5
_OP_SHAPE = {"nt": ("mk", "nk"), "nn": ("mk", "kn"), "tn": ("km", "kn"), "tt": ("km", "nk")}


def _rand(*shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, torch.bfloat16)


def _operand(spec: str, m: int, n: int, k: int, transposed_view: bool, device, seed):
    sizes = {"m": m, "n": n, "k": k}
    shape = (sizes[spec[0]], sizes[spec[1]])
    if transposed_view:   # the same logical shape, held as the transpose of a contiguous tensor
        return _rand(shape[1], shape[0], device=device, seed=seed).T
    return _rand(*shape, device=device, seed=seed)


def _poisoned(*shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ---- signatures ------------------------------------------------------------------------------------
SIGNATURES = {
    "bf16_gemm_nt": ("a", "b", "d", ("c", None), ("compiled_dims", "nk")),
    "bf16_gemm_nn": ("a", "b", "d", ("c", None), ("compiled_dims", "nk")),
    "bf16_gemm_tn": ("a", "b", "d", ("c", None), ("compiled_dims", "mn")),
    "bf16_gemm_tt": ("a", "b", "d", ("c", None), ("compiled_dims", "mn")),
    "m_grouped_bf16_gemm_nt_contiguous": ("a", "b", "d", "grouped_layout", ("compiled_dims", "nk"),
                                          ("use_psum_layout", False), ("expected_m_for_psum_layout", None)),
    "m_grouped_bf16_gemm_nt_masked": ("a", "b", "d", "masked_m", "expected_m", ("compiled_dims", "nk")),
    "k_grouped_bf16_gemm_tn_contiguous": ("a", "b", "d", "ks_cpu", "grouped_layout", ("c", None),
                                          ("compiled_dims", "mn"), ("use_psum_layout", False)),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures_match_deepgemm_2x(name):
    fn = getattr(deep_gemm, name)
    assert name in deep_gemm.__all__
    got = []
    for p in inspect.signature(fn).parameters.values():
        got.append(p.name if p.default is inspect.Parameter.empty else (p.name, p.default))
    assert tuple(got) == SIGNATURES[name]
    assert fn.__doc__ and "through torch" in " ".join(fn.__doc__.split())   # says how it runs


def test_legacy_alias():
    assert deep_gemm.bf16_m_grouped_gemm_nt_masked is deep_gemm.m_grouped_bf16_gemm_nt_masked


# ---- dense ------------------------------------------------------------------------------------------
def _dense_case(layout, m, n, k, views, out_dtype, addend, device="cpu"):
    sa, sb = _OP_SHAPE[layout]
    a = _operand(sa, m, n, k, views[0], device, 1)
    b = _operand(sb, m, n, k, views[1], device, 2)
    d = _poisoned(m, n, dtype=out_dtype, device=device)
    c = None
    if addend == "separate":
        c = torch.randn(m, n, device=device)
    elif addend == "d":
        d = torch.randn(m, n, device=device)
        c = d
    want = reference.bf16_gemm(a, b, torch.empty(m, n, dtype=torch.float64, device=device), layout,
                               None if c is None else c.clone())
    getattr(deep_gemm, f"bf16_gemm_{layout}")(a, b, d, c)
    return d, want


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("views", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("out_dtype, addend", [(torch.bfloat16, None), (torch.float32, None),
                                               (torch.float32, "separate"), (torch.float32, "d")])
def test_dense_layouts(layout, views, out_dtype, addend):
    # Odd M and N; K a multiple of 8. M and N multiples of 8 only where they are a contiguous dimension.
    m = 40 if (layout[0] == "t") != views[0] else 37
    n = 48 if (layout[1] == "n") != views[1] else 53
    d, want = _dense_case(layout, m, n, 200, views, out_dtype, addend)
    assert d.dtype == out_dtype and not d.isnan().any()
    assert calc_diff(d, want) <= TOL
    if out_dtype == torch.float32:
        assert torch.allclose(d.double(), want, rtol=1e-5, atol=1e-3)


def test_dense_returns_none_and_writes_in_place():
    a, b = _rand(5, 16, seed=1), _rand(8, 16, seed=2)
    d = _poisoned(5, 8, dtype=torch.bfloat16)
    assert deep_gemm.bf16_gemm_nt(a, b, d) is None
    want = reference.bf16_gemm(a, b, torch.empty(5, 8, dtype=torch.float64))
    assert calc_diff(d, want) <= TOL


def test_dense_empty():
    a, b = _rand(0, 16), _rand(8, 16)
    d = torch.empty(0, 8, dtype=torch.bfloat16)
    deep_gemm.bf16_gemm_nt(a, b, d)
    a, b = _rand(4, 0), _rand(8, 0)
    d = _poisoned(4, 8, dtype=torch.float32)
    deep_gemm.bf16_gemm_nt(a, b, d)
    assert torch.equal(d, torch.zeros(4, 8))


# ---- M-grouped ---------------------------------------------------------------------------------------
def _contiguous_inputs(device="cpu", g=3, n=72, k=136):
    sizes = [128, 256, 0][:g]
    m = sum(sizes) + 128
    a, b = _rand(m, k, device=device, seed=3), _rand(g, n, k, device=device, seed=4)
    idx = torch.cat([torch.full((s,), i, dtype=torch.int32) for i, s in enumerate(sizes)] +
                    [torch.full((128,), -1, dtype=torch.int32)])
    idx[120:128] = -1    # padding at the end of group 0's block
    return a, b, idx.to(device)


def test_m_grouped_contiguous():
    a, b, idx = _contiguous_inputs()
    d = _poisoned(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, idx)
    valid = idx >= 0
    assert d[~valid].isnan().all()           # padding rows untouched
    want = reference.m_grouped_bf16_gemm_nt_contiguous(a, b, torch.zeros(d.shape, dtype=torch.float64), idx)
    assert calc_diff(d[valid], want[valid]) <= TOL


@pytest.mark.parametrize("m, n, k, g", [(300, 64, 128, 5), (1, 16, 8, 3), (1000, 208, 72, 8)])
def test_grouped_rows_product(m, n, k, g):
    """The GPU path of the contiguous call (one torch._grouped_mm over the rows sorted by group, each
    group padded to 16 rows), on the GPU where there is one, else on CPU tensors: every row of a group
    right, whatever the order of the groups, rows of no group (-1, G) between them, empty groups.
    B lies at the start of a zeroed buffer: torch 2.11's CPU grouped GEMM reads past B's end and drew
    NaN from there into the last columns now and then (N = 200 and 208, on some CPUs)."""
    from deep_gemm.ops import bf16 as ops_bf16
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = _rand(m, k, device=device, seed=1)
    b = torch.zeros(g * n * k + 4096, dtype=torch.bfloat16, device=device)[:g * n * k].view(g, n, k)
    b.copy_(_rand(g, n, k, device=device, seed=2))
    idx = torch.randint(-1, g + 1, (m,), generator=torch.Generator().manual_seed(m), dtype=torch.int32).to(device)
    idx[idx == 1] = 2   # group 1 empty
    got = ops_bf16.grouped_rows_product(a, b, idx)
    if got is None:
        pytest.skip("torch._grouped_mm refuses these operands on this machine")
    valid = (idx >= 0) & (idx < g)
    want = torch.einsum("mk,mnk->mn", a.double(), b.double()[idx.clamp(0, g - 1).long()])
    assert got.shape == (m, n) and calc_diff(got[valid], want[valid]) <= TOL


def test_m_grouped_contiguous_psum_layout():
    a, b, _ = _contiguous_inputs()
    ends = torch.tensor([100, 356, 356], dtype=torch.int32)   # group 0: rows 0..99, group 1: 128..355
    d = _poisoned(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, ends, use_psum_layout=True)
    idx = torch.full((a.shape[0],), -1, dtype=torch.int32)
    idx[:100], idx[128:356] = 0, 1
    want = reference.m_grouped_bf16_gemm_nt_contiguous(a, b, torch.zeros(d.shape, dtype=torch.float64), idx)
    assert d[idx < 0].isnan().all() and calc_diff(d[idx >= 0], want[idx >= 0]) <= TOL


@pytest.mark.parametrize("masked", [[64, 3, 0], [70, -5, 9]])
def test_m_grouped_masked(masked):
    g, max_m, n, k = 3, 64, 40, 96
    a, b = _rand(g, max_m, k, seed=5), _rand(g, n, k, seed=6)
    masked_m = torch.tensor(masked, dtype=torch.int32)
    d = _poisoned(g, max_m, n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 32)
    want = reference.m_grouped_bf16_gemm_nt_masked(a, b, torch.zeros(d.shape, dtype=torch.float64), masked_m)
    for i, m in enumerate(masked_m.clamp(0, max_m).tolist()):
        assert d[i, m:].isnan().all()
        if m:
            assert calc_diff(d[i, :m], want[i, :m]) <= TOL


# ---- K-grouped ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("addend", [None, "separate", "d"])
def test_k_grouped(addend):
    ks, m, n = [24, 0, 136, 8], 40, 24
    a, b = _rand(sum(ks), m, seed=7), _rand(sum(ks), n, seed=8)
    d = _poisoned(len(ks), m, n, dtype=torch.float32)
    c = None
    if addend == "separate":
        c = torch.randn(len(ks), m, n)
    elif addend == "d":
        d = torch.randn(len(ks), m, n)
        c = d
    want = reference.k_grouped_bf16_gemm_tn(a, b, torch.empty(d.shape, dtype=torch.float64), ks,
                                            None if c is None else c.clone())
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32), c)
    assert not d.isnan().any()
    assert calc_diff(d, want) <= TOL
    assert torch.allclose(d.double(), want, rtol=1e-5, atol=1e-3)
    if addend is None:
        assert torch.equal(d[1], torch.zeros(m, n))    # the empty group


# ---- validation ---------------------------------------------------------------------------------------
def _dense_error(exc, match, a=None, b=None, d=None, c=None, fn=deep_gemm.bf16_gemm_nt, **kw):
    a = _rand(8, 16) if a is None else a
    b = _rand(24, 16) if b is None else b
    d = torch.empty(8, 24, dtype=torch.bfloat16) if d is None else d
    with pytest.raises(exc, match=match):
        fn(a, b, d, c, **kw)


def test_dense_errors():
    _dense_error(TypeError, "a must be a torch.Tensor", a=[1])
    _dense_error(TypeError, "a must be torch.bfloat16", a=torch.randn(8, 16))
    _dense_error(TypeError, "b must be torch.bfloat16", b=torch.randn(24, 16, dtype=torch.float16))
    _dense_error(ValueError, "a must be 2-D", a=_rand(2, 8, 16))
    _dense_error(ValueError, "must agree on K", b=_rand(24, 24))
    _dense_error(ValueError, "K = 12 .* multiple of 8", a=_rand(12, 8).T, b=_rand(12, 24).T)
    _dense_error(ValueError, "a .* one contiguous dimension", a=_rand(16, 32)[::2, ::2])
    _dense_error(ValueError, "b has strides .* 16-byte", b=_rand(24, 20)[:, :16])
    _dense_error(ValueError, "a must start at a 16-byte aligned", a=_rand(8 * 16 + 1)[1:].view(8, 16))
    _dense_error(TypeError, "d must be a torch.Tensor", d=3)
    _dense_error(TypeError, "d must be torch.bfloat16 or torch.float32", d=torch.empty(8, 24, dtype=torch.float16))
    _dense_error(ValueError, r"d must have shape \(8, 24\)", d=torch.empty(24, 8, dtype=torch.bfloat16))
    _dense_error(ValueError, r"b \[K, N\] must have one contiguous", fn=deep_gemm.bf16_gemm_nn, b=_rand(16, 48)[:, ::2])
    _dense_error(ValueError, "must agree on K", fn=deep_gemm.bf16_gemm_nn)   # b [24, 16] read as [K, N]
    _dense_error(TypeError, "c must be a torch.Tensor", c=3, d=torch.empty(8, 24))
    _dense_error(TypeError, "c .* and d must both be torch.float32", c=torch.zeros(8, 24))
    _dense_error(ValueError, "c must have d's shape", c=torch.zeros(8, 23), d=torch.empty(8, 24))
    d = torch.empty(8, 48)
    _dense_error(ValueError, "c shares memory with d", c=d[:, 24:], d=d[:, :24])
    _dense_error(TypeError, "compiled_dims must be a str", d=torch.empty(8, 24, dtype=torch.bfloat16), compiled_dims=1)
    _dense_error(ValueError, "compiled_dims must be made of", compiled_dims="xy")


def test_addend_copied_only_after_validation():
    d, c = torch.full((8, 24), 7.0), torch.zeros(8, 24)
    with pytest.raises(ValueError):
        deep_gemm.bf16_gemm_nt(_rand(8, 16), _rand(24, 24), d, c)
    assert (d == 7).all()


def test_grouped_errors():
    a, b, idx = _contiguous_inputs()
    d = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    fn = deep_gemm.m_grouped_bf16_gemm_nt_contiguous
    with pytest.raises(ValueError, match="b must be 3-D"):
        fn(a, b[0], d, idx)
    with pytest.raises(TypeError, match="d must be torch.bfloat16, got torch.float32"):
        fn(a, b, d.float(), idx)
    with pytest.raises(TypeError, match="grouped_layout must be torch.int32"):
        fn(a, b, d, idx.long())
    with pytest.raises(ValueError, match="grouped_layout must have shape"):
        fn(a, b, d, idx[:-1])
    with pytest.raises(ValueError, match="b must have K = 136"):
        fn(a, b[:, :, :128], d, idx)
    with pytest.raises(ValueError, match="expected_m_for_psum_layout is only meaningful"):
        fn(a, b, d, idx, expected_m_for_psum_layout=4)
    with pytest.raises(TypeError, match="use_psum_layout must be a bool"):
        fn(a, b, d, idx, use_psum_layout="yes")
    g, max_m, n, k = 2, 16, 16, 32
    am, bm = _rand(g, max_m, k), _rand(g, n, k)
    dm = torch.empty(g, max_m, n, dtype=torch.bfloat16)
    masked_m = torch.tensor([3, 4], dtype=torch.int32)
    fm = deep_gemm.m_grouped_bf16_gemm_nt_masked
    with pytest.raises(ValueError, match="a must hold G = 2 groups"):
        fm(am[:1], bm, dm[:1], masked_m, 4)
    with pytest.raises(ValueError, match="masked_m must have shape"):
        fm(am, bm, dm, masked_m[:1], 4)
    with pytest.raises(TypeError, match="expected_m must be a Python int"):
        fm(am, bm, dm, masked_m, 4.0)
    with pytest.raises(ValueError, match="d must have shape"):
        fm(am, bm, dm[:, :8], masked_m, 4)
    with pytest.raises(ValueError, match="a .* one contiguous dimension"):
        fm(am.transpose(1, 2).contiguous().transpose(1, 2), bm, dm, masked_m, 4)


def test_k_grouped_errors():
    ks, m, n = [16, 8], 16, 24
    a, b = _rand(24, m), _rand(24, n)
    d = torch.empty(2, m, n)
    gl = torch.tensor(ks, dtype=torch.int32)
    fn = deep_gemm.k_grouped_bf16_gemm_tn_contiguous
    with pytest.raises(TypeError, match="ks_cpu must be a list"):
        fn(a, b, d, gl, gl)
    with pytest.raises(TypeError, match=r"ks_cpu\[1\] must be a Python int"):
        fn(a, b, d, [16, 8.0], gl)
    with pytest.raises(ValueError, match=r"ks_cpu\[0\] must be a non-negative multiple of 8"):
        fn(a, b, d, [12, 12], gl)
    with pytest.raises(ValueError, match="ks_cpu must name at least one group"):
        fn(a, b, d[:0], [], gl[:0])
    with pytest.raises(ValueError, match=r"a must have sum\(ks_cpu\) = 32 rows"):
        fn(a, b, d, [16, 16], gl)
    with pytest.raises(TypeError, match="d must be torch.float32"):
        fn(a, b, d.bfloat16(), ks, gl)
    with pytest.raises(ValueError, match=r"d must have shape \(2, 16, 24\)"):
        fn(a, b, d[:, :8], ks, gl)
    with pytest.raises(ValueError, match="grouped_layout must have shape"):
        fn(a, b, d, ks, gl[:1])
    with pytest.raises(ValueError, match="use_psum_layout=True is not supported"):
        fn(a, b, d, ks, gl, use_psum_layout=True)
    with pytest.raises(ValueError, match="b has strides"):
        fn(a, _rand(24, 12), torch.empty(2, m, 12), ks, gl)
    with pytest.raises(TypeError, match="c .* must both be torch.float32"):
        fn(a, b, d, ks, gl, d.bfloat16())


def test_k_grouped_cache_lookup_takes_only_what_validation_accepts(monkeypatch):
    """The K-grouped call looks its launch up before validating: only sizes given as plain ints reach
    the cache (a bool or numpy int equal to a cached size must go the long way, where validation
    refuses it), and grouped_layout, which the key does not cover, is checked first."""
    import numpy as np
    from deep_gemm.ops import bf16 as ops_bf16
    looked_up = []

    def try_fire(tensors, extra):
        looked_up.append(extra)
        return False, None
    monkeypatch.setattr(ops_bf16._launches, "try_fire", try_fire)
    a, b, d = _rand(24, 16), _rand(24, 24), torch.empty(2, 16, 24)
    gl = torch.tensor([16, 8], dtype=torch.int32)
    for sizes in ([16, True], (16, np.int64(8)), [16.0, 8], gl):
        assert ops_bf16.try_fire_k_grouped(a, b, d, sizes, gl, False) == (False, None)
    assert looked_up == []
    with pytest.raises(TypeError, match="grouped_layout must be torch.int32"):
        ops_bf16.try_fire_k_grouped(a, b, d, [16, 8], gl.long(), False)
    assert ops_bf16.try_fire_k_grouped(a, b, d, [16, 8], gl, True) == (False, None)
    assert looked_up == [("k_grouped", (16, 8), True, None)]


# ---- torch.compile ------------------------------------------------------------------------------------
def test_compile_traces_custom_ops():
    a, b = _rand(24, 64, seed=1), _rand(40, 64, seed=2)
    ab, bb, idx = _contiguous_inputs(n=32, k=64)
    am, bm = _rand(2, 16, 32, seed=3), _rand(2, 24, 32, seed=4)
    masked_m = torch.tensor([5, 16], dtype=torch.int32)
    ks = [16, 0, 8]
    ka, kb = _rand(24, 16, seed=5), _rand(24, 8, seed=6)

    def fn(a, b, ab, bb, idx, am, bm, masked_m, ka, kb):
        d1 = torch.zeros(24, 40)
        deep_gemm.bf16_gemm_nt(a, b, d1)
        d2 = torch.zeros(24, 40, dtype=torch.bfloat16)
        deep_gemm.bf16_gemm_tn(a.T, b.T, d2)
        d3 = torch.zeros(ab.shape[0], 32, dtype=torch.bfloat16)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(ab, bb, d3, idx)
        d4 = torch.zeros(2, 16, 24, dtype=torch.bfloat16)
        deep_gemm.m_grouped_bf16_gemm_nt_masked(am, bm, d4, masked_m, 8)
        d5 = torch.ones(3, 16, 8)
        deep_gemm.k_grouped_bf16_gemm_tn_contiguous(ka, kb, d5, ks, torch.tensor(ks, dtype=torch.int32), d5)
        return d1 * 2, d2, d3, d4, d5

    args = (a, b, ab, bb, idx, am, bm, masked_m, ka, kb)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert {"deep_gemm.bf16_gemm_nt", "deep_gemm.m_grouped_bf16_gemm_nt_contiguous",
            "deep_gemm.m_grouped_bf16_gemm_nt_masked", "deep_gemm.k_grouped_bf16_gemm_tn"} <= targets
    torch._dynamo.reset()
    again = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    torch._dynamo.reset()
    want = fn(*args)
    for x, y, z in zip(got, want, again):
        assert torch.equal(x, y) and torch.equal(z, y)


# ---- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("out_dtype, addend", [(torch.bfloat16, None), (torch.float32, "separate"),
                                               (torch.float32, "d")])
def test_dense_gpu(layout, out_dtype, addend):
    for views in ((False, False), (True, True)):
        d, want = _dense_case(layout, 264, 520, 776, views, out_dtype, addend, device="cuda")
        assert calc_diff(d, want) <= TOL


@pytest.mark.gpu
def test_grouped_gpu():
    a, b, idx = _contiguous_inputs(device="cuda", n=256, k=512)
    d = _poisoned(a.shape[0], 256, dtype=torch.bfloat16, device="cuda")
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, idx)
    want = reference.m_grouped_bf16_gemm_nt_contiguous(a, b, torch.zeros(d.shape, dtype=torch.float64,
                                                                         device="cuda"), idx)
    valid = idx >= 0
    # The last 128-row block holds no group: untouched. Rows 120..127 (padding inside group 0's
    # block) are unspecified.
    assert d[-128:].isnan().all() and calc_diff(d[valid], want[valid]) <= TOL
    ks = [128, 0, 256]
    ka, kb = _rand(384, 256, device="cuda"), _rand(384, 128, device="cuda")
    dk = _poisoned(3, 256, 128, dtype=torch.float32, device="cuda")
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(ka, kb, dk, ks, torch.tensor(ks, dtype=torch.int32, device="cuda"))
    want = reference.k_grouped_bf16_gemm_tn(ka, kb, torch.empty(dk.shape, dtype=torch.float64, device="cuda"), ks)
    assert calc_diff(dk, want) <= TOL


@pytest.mark.gpu
def test_masked_cuda_graph_capture():
    g, max_m, n, k = 4, 128, 256, 512
    a, b = _rand(g, max_m, k, device="cuda"), _rand(g, n, k, device="cuda")
    masked_m = torch.tensor([128, 7, 0, 64], dtype=torch.int32, device="cuda")
    d = _poisoned(g, max_m, n, dtype=torch.bfloat16, device="cuda")
    deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 64)   # warm-up (cuBLAS handles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 64)
    for counts in ([5, 128, 1, 0], [300, -1, 17, 99]):   # replays read masked_m's current contents
        d.fill_(float("nan"))
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.m_grouped_bf16_gemm_nt_masked(a, b, torch.zeros(d.shape, dtype=torch.float64,
                                                                         device="cuda"), masked_m)
        for i, m in enumerate(masked_m.clamp(0, max_m).tolist()):
            assert d[i, m:].isnan().all()
            if m:
                assert calc_diff(d[i, :m], want[i, :m]) <= TOL


# ---- GPU: the BF16 kernel (dense NT, M up to plan.BF16_DENSE_KERNEL_MAX_M, on Hopper) ----------------
def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _kernel_launches():
    from deep_gemm.ops import bf16 as ops_bf16
    return ops_bf16.launch_count


def _nt_case(m, n, k, out_dtype=torch.bfloat16, seed=0):
    a, b = _rand(m, k, device="cuda", seed=seed), _rand(n, k, device="cuda", seed=seed + 1)
    d = _poisoned(m, n, dtype=out_dtype, device="cuda")
    want = a.double() @ b.double().T
    return a, b, d, want


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1, 256, 64), (7, 200, 8), (64, 7168, 576), (65, 2112, 7168), (100, 1000, 1032),
                                     (128, 4096, 7168), (128, 24, 4104), (33, 4104, 16)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_bf16_kernel_dense_nt(m, n, k, out_dtype):
    """Odd M, N and K (a multiple of 8, not of 64), one row to 128: every call runs the kernel and
    matches float64 on the bf16 inputs; the rows past N are not written (d is an exact-size tensor)."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b, d, want = _nt_case(m, n, k, out_dtype)
    before = _kernel_launches()
    deep_gemm.bf16_gemm_nt(a, b, d)
    torch.cuda.synchronize()
    assert _kernel_launches() == before + 1
    assert not d.isnan().any() and calc_diff(d, want) <= TOL


@pytest.mark.gpu
def test_bf16_kernel_accumulates_into_fp32_d():
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b, _, want = _nt_case(96, 520, 1024)
    d = torch.randn(96, 520, device="cuda")
    want = want + d.double()
    before = _kernel_launches()
    deep_gemm.bf16_gemm_nt(a, b, d, c=d)
    deep_gemm.bf16_gemm_nt(a, b, d, c=d)            # the cached launch: adds once more
    torch.cuda.synchronize()
    assert _kernel_launches() == before + 2
    want = want + a.double() @ b.double().T
    assert calc_diff(d, want) <= TOL


@pytest.mark.gpu
def test_bf16_calls_the_kernel_does_not_take_stay_correct():
    """M above 128 and rows of d not 16-byte aligned go to cuBLAS: no kernel launch, the same results."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    before = _kernel_launches()
    a, b, d, want = _nt_case(129, 256, 512)
    deep_gemm.bf16_gemm_nt(a, b, d)
    assert calc_diff(d, want) <= TOL
    a, b, _, want = _nt_case(64, 256, 512)
    wide = _poisoned(64, 260, dtype=torch.bfloat16, device="cuda")[:, 1:257]   # rows start 2 bytes in
    deep_gemm.bf16_gemm_nt(a, b, wide)
    assert calc_diff(wide, want) <= TOL
    torch.cuda.synchronize()
    assert _kernel_launches() == before


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("m, n, k", [(8, 200, 72), (40, 4104, 1032), (64, 7168, 576), (128, 2112, 7168),
                                     (96, 1000, 4160)])   # split over K: uneven shares, partial tiles
@pytest.mark.parametrize("out_dtype, addend", [(torch.bfloat16, None), (torch.float32, "d")])
def test_bf16_kernel_mn_major(layout, m, n, k, out_dtype, addend):
    """Every layout, as given and as transposed views, runs the kernel where the planner says it pays
    (MN-major operands through wgmma's transpose bits, B in 64-column boxes past N), fp32
    accumulation included, else cuBLAS; the results are right either way."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    from deep_gemm.plan import bf16_dense_kernel_pays
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for views in ((False, False), (True, True)):
        b_mn_major = (layout[1] == "n") != views[1]
        before = _kernel_launches()
        d, want = _dense_case(layout, m, n, k, views, out_dtype, addend, device="cuda")
        torch.cuda.synchronize()
        runs = bf16_dense_kernel_pays(m, n, k, b_mn_major, sms)
        assert _kernel_launches() == before + runs, (layout, views)
        assert not d.isnan().any() and calc_diff(d, want) <= TOL, (layout, views)


@pytest.mark.gpu
@pytest.mark.parametrize("ks, m, n", [([256, 0, 136, 8, 1000], 128, 256), ([64] * 3, 40, 72),
                                      ([4096, 2048], 512, 2112), ([0, 0], 64, 64)])
@pytest.mark.parametrize("addend", [None, "d"])
def test_bf16_kernel_k_grouped(ks, m, n, addend):
    """K-grouped weight gradients on the kernel: groups of K 0, 8, not a multiple of 64, long; M and N
    not multiples of the tile; written or accumulated, and the second call (cached) adds again."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b = _rand(sum(ks), m, device="cuda", seed=7), _rand(sum(ks), n, device="cuda", seed=8)
    d = torch.randn(len(ks), m, n, device="cuda") if addend else _poisoned(len(ks), m, n, dtype=torch.float32,
                                                                             device="cuda")
    c = d if addend else None
    layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
    want = reference.k_grouped_bf16_gemm_tn(a, b, torch.empty(d.shape, dtype=torch.float64, device="cuda"), ks,
                                            None if c is None else c.double())
    before = _kernel_launches()
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, c)
    torch.cuda.synchronize()
    assert _kernel_launches() == before + (1 if any(ks) else 0)
    assert not d.isnan().any() and calc_diff(d, want) <= TOL
    if addend:
        deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, c)
        want = reference.k_grouped_bf16_gemm_tn(a, b, torch.empty(d.shape, dtype=torch.float64, device="cuda"), ks,
                                                want)
        torch.cuda.synchronize()
        assert calc_diff(d, want) <= TOL
    elif any(ks):   # tensors of that layout at new addresses: its template, re-addressed per group
        for seed in (1, 2):
            a2, b2 = _rand(sum(ks), m, device="cuda", seed=seed), _rand(sum(ks), n, device="cuda", seed=seed + 5)
            d2 = _poisoned(len(ks), m, n, dtype=torch.float32, device="cuda")
            deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a2, b2, d2, ks, layout)
            want = reference.k_grouped_bf16_gemm_tn(a2, b2, torch.empty(d2.shape, dtype=torch.float64, device="cuda"),
                                                    ks)
            torch.cuda.synchronize()
            assert calc_diff(d2, want) <= TOL, seed


@pytest.mark.gpu
def test_bf16_kernel_cached_and_new_addresses():
    """The same tensors again hit the launch cache; tensors of that layout at new addresses take its
    template; a new M is planned; every result is right (d poisoned before each call)."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    from deep_gemm.ops import bf16 as ops_bf16
    b = _rand(2112, 7168, device="cuda", seed=5)
    for m in (64, 64, 128, 64, 17):
        for fresh in range(3):
            a = _rand(m, 7168, device="cuda", seed=10 * m + fresh)
            d = _poisoned(m, 2112, dtype=torch.bfloat16, device="cuda")
            deep_gemm.bf16_gemm_nt(a, b, d)
            assert calc_diff(d, a.double() @ b.double().T) <= TOL
    assert len(ops_bf16._launches) > 0 and ops_bf16._launches._templates


@pytest.mark.gpu
def test_bf16_kernel_cuda_graph():
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b, d, _ = _nt_case(64, 4096, 7168)
    deep_gemm.bf16_gemm_nt(a, b, d)   # warm-up: compile and load before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.bf16_gemm_nt(a, b, d)
    for seed in (3, 4):
        a.copy_(_rand(64, 7168, device="cuda", seed=seed))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert calc_diff(d, a.double() @ b.double().T) <= TOL


# ---- GPU: the BF16 kernel on the masked layout ---------------------------------------------------------
def _masked_case(g, max_m, n, k, counts, seed=0):
    a, b = _rand(g, max_m, k, device="cuda", seed=seed), _rand(g, n, k, device="cuda", seed=seed + 1)
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    d = _poisoned(g, max_m, n, dtype=torch.bfloat16, device="cuda")
    return a, b, d, masked_m


def _check_masked(a, b, d, masked_m):
    """Each group's rows up to masked_m (clamped to [0, max_m]) match float64; later rows keep their poison."""
    torch.cuda.synchronize()
    for i, m in enumerate(masked_m.clamp(0, a.shape[1]).tolist()):
        assert d[i, m:].isnan().all(), (i, m)
        if m:
            assert calc_diff(d[i, :m], a[i, :m].double() @ b[i].double().T) <= TOL, (i, m)


@pytest.mark.gpu
@pytest.mark.parametrize("g, max_m, n, k, expected_m, counts", [
    (4, 100, 256, 512, 64, [100, 0, 37, 64]), (3, 256, 2112, 7168, 128, [256, 129, 1]),
    (32, 64, 7168, 2048, 32, [(7 * i) % 65 for i in range(32)]), (2, 9, 40, 8, 1, [9, 4]),
    (3, 128, 4104, 1032, 100, [300, -5, 77])])
def test_bf16_kernel_masked(g, max_m, n, k, expected_m, counts):
    """Odd max_m, N and K, empty and full groups, masked_m past max_m and below 0: the kernel runs and
    writes each group's valid rows only."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b, d, masked_m = _masked_case(g, max_m, n, k, counts)
    before = _kernel_launches()
    deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    torch.cuda.synchronize()
    assert _kernel_launches() == before + 1
    _check_masked(a, b, d, masked_m)


@pytest.mark.gpu
def test_bf16_kernel_masked_cached_and_new_addresses():
    """The same tensors hit the launch cache, tensors of that layout at new addresses take its template,
    with the group sizes read on the device each time."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    from deep_gemm.ops import bf16 as ops_bf16
    before, keys = _kernel_launches(), len(ops_bf16._launches)
    a, b, d, masked_m = _masked_case(8, 64, 4096, 7168, [64, 3, 0, 17, 50, 64, 1, 33])
    for counts in ([64, 3, 0, 17, 50, 64, 1, 33], [1, 2, 3, 4, 5, 6, 7, 8]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        d.fill_(float("nan"))
        deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 32)
        _check_masked(a, b, d, masked_m)
    assert len(ops_bf16._launches) == keys + 1
    for seed in (1, 2, 3):
        a2, _, d2, m2 = _masked_case(8, 64, 4096, 7168, [seed * 7 % 65] * 8, seed=seed)
        deep_gemm.m_grouped_bf16_gemm_nt_masked(a2, b, d2, m2, 32)
        _check_masked(a2, b, d2, m2)
    assert _kernel_launches() == before + 5 and ops_bf16._launches._templates


@pytest.mark.gpu
@pytest.mark.parametrize("expected_m, n", [(129, 2112), (512, 2112), (300, 7168)])
def test_bf16_kernel_masked_compute_bound(expected_m, n):
    """expected_m above 128 plans 128-row compute-bound tiles: full, partial and empty groups; D
    staged through one buffer (192 columns) or two (256), a partial tile's rows copied chunk by chunk."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b, d, masked_m = _masked_case(3, 520, n, 1032, [520, 131, 0])
    before = _kernel_launches()
    deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    assert _kernel_launches() == before + 1
    _check_masked(a, b, d, masked_m)


@pytest.mark.gpu
def test_bf16_masked_calls_the_kernel_does_not_take_stay_correct():
    """A strided a goes to torch: no kernel launch, the same results."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    before = _kernel_launches()
    a, b, d, masked_m = _masked_case(3, 256, 512, 256, [256, 200, 0])
    wide = _rand(3, 256, 264, device="cuda")[:, :, :256]   # rows 528 bytes apart: not contiguous
    deep_gemm.m_grouped_bf16_gemm_nt_masked(wide, b, d, masked_m, 64)
    _check_masked(wide, b, d, masked_m)
    assert _kernel_launches() == before


# ---- GPU: the BF16 kernel on the contiguous layout ----------------------------------------------------
def _contiguous_case(counts, n, k, seed=0):
    """Each group's rows padded to the layout's alignment (-1), then one block of no group."""
    from deep_gemm.bench_bf16 import contiguous_layout
    align = deep_gemm.get_m_alignment_for_contiguous_layout()
    m_indices, _ = contiguous_layout(counts, align, "cuda")
    m_indices = torch.cat([m_indices, m_indices.new_full((align,), -1)])
    rows = m_indices.numel()
    a, b = _rand(rows, k, device="cuda", seed=seed), _rand(len(counts), n, k, device="cuda", seed=seed + 1)
    return a, b, _poisoned(rows, n, dtype=torch.bfloat16, device="cuda"), m_indices


def _check_contiguous(a, b, d, m_indices):
    """Rows of a group match float64; blocks of no group keep their poison."""
    torch.cuda.synchronize()
    idx = m_indices.long()
    for g in range(b.shape[0]):
        rows = idx == g
        if rows.any():
            assert calc_diff(d[rows], a[rows].double() @ b[g].double().T) <= TOL, g
    align = deep_gemm.get_m_alignment_for_contiguous_layout()
    empty = (idx.view(-1, align) < 0).all(dim=1)
    assert d.view(-1, align, d.shape[1])[empty].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("counts, n, k", [([300, 0, 17, 128], 2112, 1032), ([1, 2, 3], 256, 72),
                                          ([1024, 640], 4096, 7168), ([40] * 32, 7168, 2048)])
def test_bf16_kernel_contiguous(counts, n, k):
    """Groups of every size (empty, partial blocks, many blocks), memory- and compute-bound plans:
    one kernel launch, each group's rows right, blocks of no group untouched."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b, d, m_indices = _contiguous_case(counts, n, k)
    before = _kernel_launches()
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
    assert _kernel_launches() == before + 1
    _check_contiguous(a, b, d, m_indices)


@pytest.mark.gpu
def test_bf16_kernel_contiguous_cached_and_new_addresses():
    """The same tensors hit the launch cache with the indices read on the device each time; tensors of
    that layout at new addresses take its template; the psum layout runs the kernel too."""
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    from deep_gemm.ops import bf16 as ops_bf16
    a, b, d, m_indices = _contiguous_case([200, 56, 300], 512, 1024)
    before, keys = _kernel_launches(), len(ops_bf16._launches)
    for order in ([0, 1, 2], [2, 0, 1]):
        groups = torch.tensor(order, dtype=torch.int32, device="cuda")
        idx = torch.where(m_indices >= 0, groups[m_indices.clamp(min=0).long()], m_indices)
        m_indices.copy_(idx)
        d.fill_(float("nan"))
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
        _check_contiguous(a, b, d, m_indices)
    assert len(ops_bf16._launches) == keys + 1
    for seed in (1, 2):
        a2, b2, d2, idx2 = _contiguous_case([200, 56, 300], 512, 1024, seed=seed)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a2, b2, d2, idx2)
        _check_contiguous(a2, b2, d2, idx2)
    ends = torch.tensor([200, 456, 812], dtype=torch.int32, device="cuda")   # groups start 256, 512 rows in
    d.fill_(float("nan"))
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a[:812], b, d[:812], ends, use_psum_layout=True)
    torch.cuda.synchronize()
    for g, (lo, hi) in enumerate(((0, 200), (256, 456), (512, 812))):
        assert calc_diff(d[lo:hi], a[lo:hi].double() @ b[g].double().T) <= TOL
    assert _kernel_launches() == before + 5 and ops_bf16._launches._templates


# ---- K-grouped with the sizes on the device (ks_cpu=None) ----------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ks, m, n, spare", [([256, 0, 136, 8, 1000], 128, 256, 0), ([64] * 3, 40, 72, 200),
                                             ([0, 0], 64, 64, 64)])
@pytest.mark.parametrize("addend", [None, "d"])
def test_k_grouped_sizes_on_the_device(device, ks, m, n, spare, addend):
    """grouped_layout read where the GEMM runs (the kernel on a Hopper GPU: CUDA-graph safe), a and b
    holding `spare` rows of NaN past the groups (a buffer sized for more tokens)."""
    if device == "cuda" and not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b = _rand(sum(ks) + spare, m, device=device, seed=7), _rand(sum(ks) + spare, n, device=device, seed=8)
    a[sum(ks):], b[sum(ks):] = float("nan"), float("nan")
    d = torch.randn(len(ks), m, n, device=device) if addend else _poisoned(len(ks), m, n, dtype=torch.float32,
                                                                             device=device)
    c = d if addend else None
    want = reference.k_grouped_bf16_gemm_tn(a[:sum(ks)], b[:sum(ks)], torch.empty(d.shape, dtype=torch.float64,
                                                                                  device=device), ks,
                                            None if c is None else c.double())
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None, torch.tensor(ks, dtype=torch.int32, device=device), c)
    assert not d.isnan().any() and calc_diff(d, want) <= TOL


@pytest.mark.gpu
def test_k_grouped_device_sizes_change_between_graph_replays():
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    m, n, capacity = 128, 192, 3072
    a = torch.empty(capacity, m, dtype=torch.bfloat16, device="cuda")
    b = torch.empty(capacity, n, dtype=torch.bfloat16, device="cuda")
    sizes = torch.tensor([512, 0, 1024], dtype=torch.int32, device="cuda")
    d = torch.zeros(3, m, n, device="cuda")
    a.normal_(), b.normal_()
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None, sizes, d)   # load the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None, sizes, d)
    for ks, seed in (([1024, 8, 2040], 1), ([0, 3072, 0], 2)):
        a.copy_(_rand(capacity, m, device="cuda", seed=seed)), b.copy_(_rand(capacity, n, device="cuda", seed=seed + 9))
        sizes.copy_(torch.tensor(ks, dtype=torch.int32))
        d.zero_()
        graph.replay()
        want = reference.k_grouped_bf16_gemm_tn(a[:sum(ks)], b[:sum(ks)], torch.empty(d.shape, dtype=torch.float64,
                                                                                      device="cuda"), ks)
        torch.cuda.synchronize()
        assert calc_diff(d, want) <= TOL, ks


@pytest.mark.gpu
def test_k_grouped_bad_device_sizes_fill_nan():
    if not _hopper():
        pytest.skip("the BF16 kernel runs on Hopper GPUs")
    a, b = _rand(256, 64, device="cuda", seed=3), _rand(256, 32, device="cuda", seed=4)
    for ks, first_bad in (([64, 12, 64], 1), ([128, 64, 72], 2), ([64, -8, 0], 1)):
        d = torch.zeros(3, 64, 32, device="cuda")
        deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None, torch.tensor(ks, dtype=torch.int32, device="cuda"))
        torch.cuda.synchronize()
        assert not d[:first_bad].isnan().any() and d[first_bad:].isnan().all(), ks


def test_k_grouped_device_sizes_errors():
    a, b, d = _rand(64, 16), _rand(64, 8), torch.zeros(2, 16, 8)
    fn = deep_gemm.k_grouped_bf16_gemm_tn_contiguous
    sizes = torch.tensor([16, 8], dtype=torch.int32)
    cases = [
        (lambda: fn(a, b, d, None, [16, 8]), TypeError, r"^grouped_layout must be a torch.Tensor"),
        (lambda: fn(a, b, d, None, sizes.long()), TypeError, r"^grouped_layout must be torch.int32"),
        (lambda: fn(a, b[:32], d, None, sizes), ValueError, r"^a and b must hold the same number of rows"),
        (lambda: fn(a, b, torch.zeros(3, 16, 8), None, sizes), ValueError, r"^d must"),
        (lambda: fn(a, b, d, None, torch.tensor([16, 4], dtype=torch.int32)), ValueError,
         r"^grouped_layout\[1\] must be a non-negative multiple of 8"),
        (lambda: fn(a, b, d, None, torch.tensor([64, 8], dtype=torch.int32)), ValueError,
         r"^grouped_layout adds up to 72 rows, more than a and b hold \(64\)"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.gpu
@pytest.mark.parametrize("on_device", [False, True])
def test_k_grouped_misaligned_d_runs_through_torch(on_device):
    """d starting off a 16-byte boundary cannot be a TMA destination: the call runs through torch
    (the sizes then read on the host) and is right."""
    ks, m, n = [64, 8], 32, 16
    a, b = _rand(72, m, device="cuda", seed=1), _rand(72, n, device="cuda", seed=2)
    d = torch.zeros(2 * m * n + 1, device="cuda")[1:].view(2, m, n)
    sizes = torch.tensor(ks, dtype=torch.int32, device="cuda")
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, None if on_device else ks, sizes)
    want = reference.k_grouped_bf16_gemm_tn(a, b, torch.empty(d.shape, dtype=torch.float64, device="cuda"), ks)
    assert calc_diff(d, want) <= TOL
