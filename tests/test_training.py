"""The training GEMMs: wgrad_gemm_fp8_fp8_fp32_nt (per-row scales on both operands, fp32 out
accumulated in place), k_grouped_wgrad_gemm_fp8_fp8_fp32_nt (each group its own K), and their
DeepGEMM 2.x spellings (fp8_gemm_nt with an fp32 d, an addend c and recipe (1, 1, 128);
k_grouped_fp8_gemm_nt_contiguous).

Every result is compared with float64 on the dequantised operands plus the previous out; outputs
start from random values (accumulation) or NaN (plain writes). CPU tensors run the reference
path; the `cuda` parameters run the kernels on a Hopper GPU.
"""
from __future__ import annotations

import pytest
import torch

import deep_gemm
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs, k_grouped_operand

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FP8 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cast_rows(x: torch.Tensor):
    """x [R, K] -> (e4m3, scales [R, ceil(K/128)]) per row and 128-K block (column-major scales)."""
    return deep_gemm.per_token_cast_to_fp8(x)


def _operand(rows, k, gen, device):
    return _cast_rows(torch.randn(rows, k, generator=gen).to(device, torch.bfloat16))


def _ref(a, b, row_scales_b=True):
    rhs = dequantize_lhs(*b, dtype=torch.float64) if row_scales_b else dequantize_rhs(*b, dtype=torch.float64)
    return dequantize_lhs(*a, dtype=torch.float64) @ rhs.T


def _close(out, ref, tol=1e-5):
    assert not torch.isnan(out).any()
    diff = calc_diff(out.cpu(), ref.cpu())
    assert diff < tol, diff


# ---- dense ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(256, 384, 640), (7, 100, 128), (129, 260, 1000), (1000, 2112, 4096),
                                   (64, 7168, 2048), (4096, 1536, 512),
                                   (2048, 2080, 7168)])   # split-K
def test_wgrad_accumulates_in_fp32(device, m, n, k):
    gen = _gen(m * n + k)
    a, b = _operand(m, k, gen, device), _operand(n, k, gen, device)
    out = torch.randn(m, n, generator=gen).to(device)
    before = out.double().cpu()
    assert deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out) is out
    _close(out, before + _ref(a, b).cpu(), 1e-9 if device == "cpu" else 1e-6)
    # A second call adds the product once more.
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out)
    _close(out, before + 2 * _ref(a, b).cpu(), 1e-9 if device == "cpu" else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", [(1, 1, 128), (1, 128, 128)])
@pytest.mark.parametrize("d_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_nt_fp32_out_and_per_row_b(device, recipe, d_dtype):
    gen = _gen(7)
    m, n, k = 200, 320, 768
    a = _operand(m, k, gen, device)
    w = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)
    b = _cast_rows(w) if recipe == (1, 1, 128) else deep_gemm.per_block_cast_to_fp8(w)
    d = torch.full((m, n), float("nan"), dtype=d_dtype, device=device)
    assert deep_gemm.fp8_gemm_nt(a, b, d, recipe=recipe) is None
    _close(d, _ref(a, b, recipe == (1, 1, 128)), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_nt_with_an_addend(device):
    gen = _gen(8)
    m, n, k = 130, 256, 512
    a, b = _operand(m, k, gen, device), _operand(n, k, gen, device)
    c = torch.randn(m, n, generator=gen).to(device)
    d = torch.full((m, n), float("nan"), device=device)
    deep_gemm.fp8_gemm_nt(a, b, d, c=c, recipe=(1, 1, 128))     # d = c + a b^T, c untouched
    _close(d, c.double().cpu() + _ref(a, b).cpu(), 1e-6)
    keep = c.clone()
    deep_gemm.fp8_gemm_nt(a, b, c, c, recipe=(1, 1, 128))       # c = d: in place
    _close(c, keep.double().cpu() + _ref(a, b).cpu(), 1e-6)
    # Per-block B scales with an addend.
    wb = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, generator=gen).to(device, torch.bfloat16))
    d2 = torch.full((m, n), float("nan"), device=device)
    deep_gemm.fp8_gemm_nt(a, wb, d2, c=keep)
    _close(d2, keep.double().cpu() + _ref(a, wb, False).cpu(), 1e-6)


# ---- K-grouped -----------------------------------------------------------------------------------
def _k_grouped(ks, m, n, gen, device):
    """Flat operands of G groups: each group's [M, k_g] / [N, k_g] block cast per row, blocks and
    scales [sum ceil(k_g/128), M or N] concatenated group after group."""
    xs = [torch.randn(m, k, generator=gen).to(device, torch.bfloat16) for k in ks]
    ys = [torch.randn(n, k, generator=gen).to(device, torch.bfloat16) for k in ks]
    qa = [_cast_rows(x) if x.shape[1] else (x.to(FP8), torch.empty(m, 0, device=device)) for x in xs]
    qb = [_cast_rows(y) if y.shape[1] else (y.to(FP8), torch.empty(n, 0, device=device)) for y in ys]
    a, b = k_grouped_operand(qa), k_grouped_operand(qb)
    refs = [_ref(x, y).cpu() for x, y in zip(qa, qb)]
    return a, b, refs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks,m,n", [([256, 0, 384, 128], 64, 96), ([1024, 896, 1152, 1008], 256, 512),
                                    ([0, 0], 128, 128), ([4096, 4224, 3968, 4096], 512, 384),
                                    ([144, 16, 4112], 100, 132)])
def test_k_grouped_wgrad(device, ks, m, n):
    gen = _gen(sum(ks) + m)
    a, b, refs = _k_grouped(ks, m, n, gen, device)
    out = torch.randn(len(ks), m, n, generator=gen).to(device)
    before = out.double().cpu()
    assert deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, b, out, ks) is out
    for g in range(len(ks)):
        if ks[g] == 0:
            assert torch.equal(out[g].cpu().double(), before[g]), "a group without K adds nothing"
        else:
            _close(out[g], before[g] + refs[g], 1e-9 if device == "cpu" else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_2x_writes_or_accumulates(device):
    gen = _gen(3)
    ks, m, n = [384, 0, 256], 128, 64
    a, b, refs = _k_grouped(ks, m, n, gen, device)
    d = torch.full((3, m, n), float("nan"), device=device)
    layout = torch.tensor(ks, dtype=torch.int32, device=device)
    assert deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout) is None
    for g in range(3):
        _close(d[g], refs[g] if ks[g] else torch.zeros(m, n, dtype=torch.float64), 1e-6)
    c = torch.randn(3, m, n, generator=gen).to(device)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks, layout, c=c)
    for g in range(3):
        _close(d[g], c[g].double().cpu() + (refs[g] if ks[g] else 0), 1e-6)


# ---- validation ----------------------------------------------------------------------------------
def _dense():
    gen = _gen(1)
    return _operand(64, 256, gen, "cpu"), _operand(96, 256, gen, "cpu"), torch.zeros(64, 96)


DENSE_ERRORS = [
    (lambda a, b, o: deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, o.bfloat16()), TypeError,
     r"^out must be torch.float32 to accumulate into, got torch.bfloat16"),
    (lambda a, b, o: deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, deep_gemm.per_block_cast_to_fp8(b[0].float()), o),
     ValueError, r"^rhs\[1\] must have shape \(96, 2\) \(one scale per row"),
    (lambda a, b, o: deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, o[:, :50]), ValueError, r"^out must have shape"),
    (lambda a, b, o: deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, torch.zeros(64, 98)[:, :96]), ValueError,
     r"^out has stride 98 on dimension 0 \(392 bytes\) but TMA needs 16-byte aligned rows"),
    (lambda a, b, o: deep_gemm.gemm_fp8_fp8_bf16_nt(a, deep_gemm.per_block_cast_to_fp8(b[0].float()), o), TypeError,
     r"^out must be torch.bfloat16, got torch.float32"),
    (lambda a, b, o: deep_gemm.fp8_gemm_nt(a, b, o, c=o[:, :3], recipe=(1, 1, 128)), ValueError,
     r"^c must have d's shape"),
    (lambda a, b, o: deep_gemm.fp8_gemm_nt(a, b, o, c=o.t().contiguous().t(), recipe=(1, 1, 128)), None, None),
    (lambda a, b, o: deep_gemm.fp8_gemm_nt(a, b, o[:32], c=o[32:], recipe=(1, 1, 128)), ValueError,
     r"^d must have shape|^c shares memory with d"),
]


@pytest.mark.parametrize("case", range(len(DENSE_ERRORS)))
def test_dense_training_errors(case):
    call, exc, pattern = DENSE_ERRORS[case]
    a, b, o = _dense()
    if exc is None:
        call(a, b, o)     # a separate tensor of another layout is a fine addend
        return
    with pytest.raises(exc, match=pattern):
        call(a, b, o)


def test_an_overlapping_addend_is_refused_before_anything_is_written():
    a, b, _ = _dense()
    buf = torch.zeros(64, 192)
    d, c = buf[:, :96], buf[:, 96:]
    with pytest.raises(ValueError, match=r"^c shares memory with d"):
        deep_gemm.fp8_gemm_nt(a, b, d, c=c, recipe=(1, 1, 128))
    d = torch.full((64, 96), float("nan"))
    with pytest.raises(ValueError, match=r"^b\[1\] must have shape"):   # validation first, then the copy of c
        deep_gemm.fp8_gemm_nt(a, (b[0], b[1][:, :1]), d, c=torch.zeros(64, 96), recipe=(1, 1, 128))
    assert torch.isnan(d).all()


def _k_grouped_errors():
    gen = _gen(2)
    ks, m, n = [128, 256], 64, 32
    a, b, _ = _k_grouped(ks, m, n, gen, "cpu")
    out = torch.zeros(2, m, n)
    fn = deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt
    return [
        (lambda: fn(a, b, out, [128, 255]), ValueError, r"^k_sizes\[1\] must be a non-negative multiple of 16"),
        (lambda: fn(a, b, out, [128, 256.0]), TypeError, r"^k_sizes\[1\] must be a Python int"),
        (lambda: fn(a, b, out, 384), TypeError, r"^k_sizes must be a list of Python ints"),
        (lambda: fn(a, b, out, [256, 256]), ValueError, r"^lhs\[0\] must hold 64 x sum\(k_sizes\) = 32768 elements"),
        (lambda: fn(a, b, out, [128, 128, 128]), ValueError, r"^out must be \[G, M, N\] with G = 3"),
        (lambda: fn(a, b, out.bfloat16(), [128, 256]), TypeError, r"^out must be torch.float32"),
        (lambda: fn(a, b, torch.zeros(2, 62, 32), [128, 256]), ValueError, r"^out must have M and N positive "
                                                                            r"multiples of 4"),
        (lambda: fn((a[0], a[1][:2]), b, out, [128, 256]), ValueError, r"^lhs\[1\] must have shape \(3, 64\)"),
        (lambda: fn(a, (b[0], b[1].T.contiguous().T), out, [128, 256]), ValueError, r"^rhs\[1\] must be contiguous"),
        (lambda: fn((a[0].float(), a[1]), b, out, [128, 256]), TypeError, r"^lhs\[0\] must be torch.float8_e4m3fn"),
        (lambda: fn(a, b, out, []), ValueError, r"^out must be \[G, M, N\] with G = 0|^k_sizes must name at least"),
        (lambda: deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, out, [128, 256], torch.zeros(3, dtype=torch.int32)),
         ValueError, r"^grouped_layout must have shape \(2,\)"),
        (lambda: deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, out, [128, 256], torch.zeros(2, dtype=torch.int32),
                                                            recipe=(1, 128, 128)),
         ValueError, r"^recipe=\(1, 128, 128\) is not supported for K-grouped GEMMs"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_k_grouped_errors(case):
    call, exc, pattern = _k_grouped_errors()[case]
    with pytest.raises(exc, match=pattern):
        call()


# ---- torch.compile, CUDA graphs --------------------------------------------------------------------
def test_training_calls_trace_to_custom_ops():
    torch._dynamo.reset()
    gen = _gen(5)
    a, b = _operand(64, 256, gen, "cpu"), _operand(32, 256, gen, "cpu")
    ka, kb, refs = _k_grouped([128, 256], 64, 32, gen, "cpu")

    def step(a, b, ka, kb, out, kout):
        deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out)
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(ka, kb, kout, [128, 256])
        return out, kout

    out, kout = torch.zeros(64, 32), torch.zeros(2, 64, 32)
    torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, ka, kb, out, kout)
    _close(out, _ref(a, b), 1e-9)
    _close(kout[1], refs[1], 1e-9)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_training_gemms_in_a_cuda_graph():
    gen = _gen(6)
    a, b = _operand(512, 4096, gen, "cuda"), _operand(384, 4096, gen, "cuda")
    ks = [1024, 0, 512]
    ka, kb, refs = _k_grouped(ks, 256, 128, gen, "cuda")
    out, kout = torch.zeros(512, 384, device="cuda"), torch.zeros(3, 256, 128, device="cuda")
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out)          # load the kernels before capture
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(ka, kb, kout, ks)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out)
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(ka, kb, kout, ks)
    out.zero_()
    kout.zero_()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    _close(out, 3 * _ref(a, b).cpu(), 1e-6)
    _close(kout[0], 3 * refs[0], 1e-6)
    _close(kout[2], 3 * refs[2], 1e-6)
    assert not kout[1].any()


def test_k_grouped_group_limit_is_a_clear_error():
    from deep_gemm.config import K_GROUPED_MAX_GROUPS
    ks = [0] * (K_GROUPED_MAX_GROUPS + 1)
    a = (torch.empty(0, dtype=FP8), torch.empty(0, 8))
    with pytest.raises(ValueError, match=rf"^k_sizes has {len(ks)} groups; one K-grouped call takes at most"):
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, a, torch.zeros(len(ks), 8, 8), ks)


# ---- K-grouped with the group sizes on the device (CUDA-graph safe) --------------------------------
POISON_FP8 = 0x7F   # e4m3fn NaN: a byte read past the groups turns its whole output row into NaN


def _with_capacity(pair, rows, extra_k):
    """An operand of the K-grouped layout followed by `extra_k` more K (and its scale rows) of NaN:
    the spare capacity of a buffer sized for more tokens than the groups use."""
    q, s = pair
    spare = torch.full((rows * extra_k,), POISON_FP8, dtype=torch.uint8, device=q.device).view(FP8)
    spare_scales = torch.full(((extra_k + 127) // 128, rows), float("nan"), device=q.device)
    return torch.cat([q, spare]), torch.cat([s, spare_scales])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks,m,n,extra_k", [([256, 0, 384, 128], 64, 96, 0), ([1024, 896, 1152, 1008], 256, 512, 384),
                                            ([144, 16, 4112], 100, 132, 2048), ([0, 0], 128, 128, 256)])
def test_k_grouped_sizes_on_the_device(device, ks, m, n, extra_k):
    gen = _gen(sum(ks) + extra_k)
    a, b, refs = _k_grouped(ks, m, n, gen, device)
    a, b = _with_capacity(a, m, extra_k), _with_capacity(b, n, extra_k)
    sizes = torch.tensor(ks, dtype=torch.int32, device=device)
    out = torch.randn(len(ks), m, n, generator=gen).to(device)
    before = out.double().cpu()
    assert deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, b, out, sizes) is out
    d = torch.full((len(ks), m, n), float("nan"), device=device)
    assert deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, d, None, sizes) is None
    for g in range(len(ks)):
        _close(out[g], before[g] + (refs[g] if ks[g] else 0), 1e-9 if device == "cpu" else 1e-6)
        _close(d[g], refs[g] if ks[g] else torch.zeros(m, n, dtype=torch.float64), 1e-9 if device == "cpu" else 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_k_grouped_device_sizes_change_between_graph_replays(pdl):
    """One capture, replayed after the routing changed: each replay uses the sizes and operands
    written into the captured buffers since (capacity 6144 tokens, 4 groups)."""
    m, n, capacity = 256, 384, 6144
    a = torch.empty(m * capacity, dtype=FP8, device="cuda")
    b = torch.empty(n * capacity, dtype=FP8, device="cuda")
    sa = torch.empty(capacity // 128, m, device="cuda")
    sb = torch.empty(capacity // 128, n, device="cuda")
    sizes = torch.zeros(4, dtype=torch.int32, device="cuda")
    out = torch.zeros(4, m, n, device="cuda")

    def route(ks, seed):
        (qa, qsa), (qb, qsb), refs = _k_grouped(ks, m, n, _gen(seed), "cuda")
        for dst, src in ((a, qa), (b, qb)):   # fp8 bytes past the groups: NaN
            dst.view(torch.uint8)[src.numel():] = POISON_FP8
            dst.view(torch.uint8)[:src.numel()] = src.view(torch.uint8)
        for dst, src in ((sa, qsa), (sb, qsb)):
            dst.view(-1)[src.numel():] = float("nan")
            dst.view(-1)[:src.numel()] = src.view(-1)
        sizes.copy_(torch.tensor(ks, dtype=torch.int32))
        return refs

    deep_gemm.set_pdl(pdl)
    try:
        route([1024, 0, 512, 2048], 1)
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, sizes)   # load before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, sizes)
        for seed, ks in enumerate(([128, 2048, 0, 3968], [0, 0, 6144, 0], [1040, 16, 2000, 128]), 2):
            refs = route(ks, seed)
            out.zero_()
            graph.replay()
            graph.replay()
            torch.cuda.synchronize()
            for g in range(4):
                if ks[g]:
                    _close(out[g], 2 * refs[g], 1e-6)
                else:
                    assert not out[g].any(), "a group without K adds nothing"
    finally:
        deep_gemm.set_pdl(False)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [[256, 120, 128], [256, -16, 128], [256, 128, 512], [256, 0, 384]])
def test_k_grouped_bad_device_sizes_fill_nan(bad):
    """Sizes the host cannot see are checked by the kernels: from the first group that is not a
    non-negative multiple of 16 or does not fit in the operands (here K = 640), D is NaN; the groups
    before it are right, and nothing outside the tensors is read (compute-sanitizer's sweep)."""
    m, n = 128, 64
    good = [256, 128, 256]
    (a, sa), (b, sb), refs = _k_grouped(good, m, n, _gen(9), "cuda")
    out = torch.zeros(3, m, n, device="cuda")
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), out, torch.tensor(bad, dtype=torch.int32,
                                                                                    device="cuda"))
    torch.cuda.synchronize()
    # ([256, 0, 384] fits: K = 640 exactly; its groups' products differ from `good`'s.)
    first_bad = next((g for g in range(3) if bad[g] < 0 or bad[g] % 16 or sum(bad[:g + 1]) > 640), 3)
    _close(out[0], refs[0], 1e-6)
    for g in range(1, 3):
        assert torch.isnan(out[g]).all() == (g >= first_bad), (g, bad)


def test_k_grouped_device_sizes_validation():
    """What the host can check of a sizes tensor without reading it (check_k_grouped)."""
    from deep_gemm.ops.validation import check_k_grouped
    gen = _gen(4)
    a, b, _ = _k_grouped([128, 256], 64, 32, gen, "cpu")
    out = torch.zeros(2, 64, 32)
    sizes = torch.tensor([128, 256], dtype=torch.int32)
    args = check_k_grouped(_with_capacity(a, 64, 256), _with_capacity(b, 32, 256), out, sizes, True)
    assert args.k_sizes is sizes and args.k == 640 and args.sa.shape == (64, 5)
    cases = [
        ((a, b, out, sizes.long()), TypeError, r"^k_sizes must be torch.int32"),
        ((a, b, out, sizes[:, None]), ValueError, r"^k_sizes must have shape \(G,\) with 1 <= G <= 1024"),
        ((a, b, out, torch.zeros(0, dtype=torch.int32)), ValueError, r"^k_sizes must have shape \(G,\)"),
        ((a, b, out, torch.zeros(4, dtype=torch.int32)[::2]), ValueError, r"^k_sizes must be contiguous"),
        ((a, b, torch.zeros(3, 64, 32), sizes), ValueError, r"^out must be \[G, M, N\] with G = 2"),
        (((a[0][:-16], a[1]), b, out, sizes), ValueError, r"^lhs\[0\] must hold M x \(its K capacity\)"),
        ((a, _with_capacity(b, 32, 128), out, sizes), ValueError, r"^rhs\[0\] must hold 32 x lhs\[0\]'s K capacity"),
        ((a, (b[0], b[1][:2]), out, sizes), ValueError, r"^rhs\[1\] must have shape \(3, 32\)"),
    ]
    for call_args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            check_k_grouped(*call_args, True)
    with pytest.raises(ValueError, match=r"^k_sizes adds up to K = 512 in 4 blocks of 128, more than the operands"):
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, b, out, torch.tensor([256, 256], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^grouped_layout must be a torch.Tensor"):
        deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a, b, out, None, [128, 256])


def test_k_grouped_device_sizes_trace_to_a_custom_op():
    torch._dynamo.reset()
    a, b, refs = _k_grouped([128, 256], 64, 32, _gen(8), "cpu")

    def step(a, b, out, sizes):
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(a, b, out, sizes)
        return out

    out = torch.zeros(2, 64, 32)
    torch.compile(step, fullgraph=True, backend="aot_eager")(a, b, out, torch.tensor([128, 256], dtype=torch.int32))
    _close(out[0], refs[0], 1e-9)
    _close(out[1], refs[1], 1e-9)
    torch._dynamo.reset()
