"""CUDA-graph capture and replay of every public GEMM and cast, on two capture streams.

Each case: an eager call first (compiles and loads the kernel, which capture cannot), capture
on torch.cuda.graph's own side stream or on a stream of ours, then fresh random inputs copied
into the captured buffers, outputs poisoned, replay on the default stream or on ours, and the
result compared with the reference computed from the new inputs (float64 for GEMMs,
bit-identical for casts).
"""
import dataclasses

import pytest
import torch

import deep_gemm
from deep_gemm import plan, reference
from deep_gemm.config import max_stages
from deep_gemm.ops import gemm as gemm_ops
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs, rel_error
from deep_gemm.runtime.kernels import prepare_gemm
from deep_gemm.runtime.launch import LaunchCache

pytestmark = pytest.mark.gpu
ALIGN = deep_gemm.get_m_alignment_for_contiguous_layout()
FP8 = torch.float8_e4m3fn


def fresh_fp8_pair(x_shape, cast):
    return cast(torch.randn(x_shape, device="cuda", dtype=torch.bfloat16))


def refill(dst_pair, src_pair):
    for dst, src in zip(dst_pair, src_pair):
        dst.copy_(src)


def check_gemm(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output: the replay did not write it"
    assert rel_error(out, ref) < 4e-3 and calc_diff(out, ref) < 1e-5


# Each case builds its inputs, and returns (run, refresh, verify): run() is what gets captured
# (it returns the outputs), refresh() copies new data into the inputs, verify(outputs) checks.
def dense_case(out_given: bool, m=200, n=2112, k=896, config=None):
    """The dense GEMM; with `config`, that kernel forced through prepare_gemm (out given)."""
    lhs = fresh_fp8_pair((m, k), deep_gemm.per_token_cast_to_fp8)
    rhs = fresh_fp8_pair((n, k), deep_gemm.per_block_cast_to_fp8)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16) if out_given else None

    def run():
        if config is None:
            return deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
        prepare_gemm(config, a=lhs[0], a_rows=m, sa=lhs[1], sa_rows=m, b=rhs[0], b_rows=n, sb=rhs[1], out=out,
                     out_rows=m, shape_m=m, group_info=None, num_sms=deep_gemm.get_num_sms()).fire()
        return out

    def refresh():
        refill(lhs, fresh_fp8_pair((m, k), deep_gemm.per_token_cast_to_fp8))
        refill(rhs, fresh_fp8_pair((n, k), deep_gemm.per_block_cast_to_fp8))

    def verify(result):
        ref = dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T
        check_gemm(result, ref)
    return run, refresh, verify


def split_k_case():
    """Split-K (forced; the planner does not choose it today): the capture stream's workspace is
    first allocated during capture, and every replay must find the tile counters back at zero."""
    m, n, k = 64, 2112, 7168
    config = dataclasses.replace(plan.plan_dense(m, n, k, 132), block_n=32, split_k=2,
                                 num_stages=max_stages(64, 32, cap=32), stage_k_blocks=1)
    return dense_case(True, m, n, k, config)


def contiguous_case(k=1024):
    sizes, n = [130, 0, 256, 7], 576
    padded = [(s + ALIGN - 1) // ALIGN * ALIGN for s in sizes]
    m = sum(padded)
    m_indices = torch.full((m,), -1, device="cuda", dtype=torch.int32)
    start = 0
    for g, (s, p) in enumerate(zip(sizes, padded)):
        m_indices[start:start + s] = g
        start += p
    lhs = fresh_fp8_pair((m, k), deep_gemm.per_token_cast_to_fp8)
    rhs = fresh_fp8_pair((len(sizes), n, k), deep_gemm.per_block_cast_to_fp8)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

    def run():
        return deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)

    def refresh():
        refill(lhs, fresh_fp8_pair((m, k), deep_gemm.per_token_cast_to_fp8))
        refill(rhs, fresh_fp8_pair((len(sizes), n, k), deep_gemm.per_block_cast_to_fp8))
        out.fill_(float("nan"))

    def verify(result):
        a = dequantize_lhs(*lhs, dtype=torch.float64)
        for g in range(len(sizes)):
            rows = (m_indices == g).nonzero().flatten()
            if rows.numel():
                check_gemm(result[rows], a[rows] @ dequantize_rhs(rhs[0][g], rhs[1][g], dtype=torch.float64).T)
    return run, refresh, verify


def masked_case(k=1024):
    groups, max_m, n = 3, 256, 576
    lhs = fresh_fp8_pair((groups, max_m, k), deep_gemm.per_token_cast_to_fp8)
    rhs = fresh_fp8_pair((groups, n, k), deep_gemm.per_block_cast_to_fp8)
    out = torch.empty(groups, max_m, n, device="cuda", dtype=torch.bfloat16)
    masked_m = torch.tensor([100, 0, 256], device="cuda", dtype=torch.int32)

    def run():
        return deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 128)

    def refresh():
        refill(lhs, fresh_fp8_pair((groups, max_m, k), deep_gemm.per_token_cast_to_fp8))
        refill(rhs, fresh_fp8_pair((groups, n, k), deep_gemm.per_block_cast_to_fp8))
        # New counts, read by the replayed kernel on the device (never on the host).
        masked_m.copy_(torch.randint(0, max_m + 1, (groups,), device="cuda", dtype=torch.int32))
        out.fill_(float("nan"))

    def verify(result):
        for g, rows in enumerate(masked_m.tolist()):
            a = dequantize_lhs(lhs[0][g, :rows], lhs[1][g, :rows], dtype=torch.float64)
            check_gemm(result[g, :rows], a @ dequantize_rhs(rhs[0][g], rhs[1][g], dtype=torch.float64).T)
            assert torch.isnan(result[g, rows:]).all(), f"group {g}: rows past masked_m were written"
    return run, refresh, verify


def cast_case(cast, ref_cast, shape):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def run():
        return cast(x)

    def refresh():
        x.copy_(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 100)

    def verify(result):
        q, s = result
        q_ref, s_ref = ref_cast(x)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), "fp8 values differ after replay"
        assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32)), "scales differ after replay"
    return run, refresh, verify


CASES = {
    "dense": lambda: dense_case(out_given=True),
    "dense_out_none": lambda: dense_case(out_given=False),
    "dense_split_k": lambda: split_k_case(),
    "contiguous": contiguous_case,
    "masked": masked_case,
    # K % 16 != 0: the padding kernel (ops/pad.py) is captured too, reading the caller's tensors.
    "dense_odd_k": lambda: dense_case(out_given=True, k=1000),
    "contiguous_odd_k": lambda: contiguous_case(k=1001),
    "masked_odd_k": lambda: masked_case(k=1001),
    "per_token_2d": lambda: cast_case(deep_gemm.per_token_cast_to_fp8, reference.per_token_cast_to_fp8, (333, 7168)),
    "per_token_masked_3d": lambda: cast_case(deep_gemm.per_token_cast_to_fp8, reference.per_token_cast_to_fp8,
                                             (4, 96, 576)),
    "per_block_2d": lambda: cast_case(deep_gemm.per_block_cast_to_fp8, reference.per_block_cast_to_fp8, (1000, 576)),
    "per_block_3d": lambda: cast_case(deep_gemm.per_block_cast_to_fp8, reference.per_block_cast_to_fp8,
                                      (3, 256, 1024)),
}


@pytest.mark.parametrize("stream_kind", ["graph_default_stream", "user_stream"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_capture_and_replay(case, stream_kind):
    run, refresh, verify = CASES[case]()
    run()                                   # eager: compile + load (capture cannot)
    torch.cuda.synchronize()
    user = torch.cuda.Stream() if stream_kind == "user_stream" else None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=user):
        outputs = run()
    refresh()
    torch.cuda.synchronize()
    # Poison what the graph writes, so a replay that does nothing cannot pass.
    for t in (outputs if isinstance(outputs, tuple) else (outputs,)):
        if t.dtype == FP8:
            t.view(torch.uint8).fill_(0x7F)
        elif not case.startswith(("masked", "contiguous")):   # grouped outputs were poisoned by refresh()
            t.fill_(float("nan"))
    if user is not None:
        user.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(user):
            graph.replay()
        user.synchronize()
    else:
        graph.replay()
    torch.cuda.synchronize()
    verify(outputs)
    # A second replay after new inputs: the graph keeps reading the same buffers.
    refresh()
    graph.replay()
    torch.cuda.synchronize()
    verify(outputs)


CACHED_CASES = ["contiguous", "dense", "masked"]


def _poison(outputs, case):
    if case == "dense":   # the grouped cases' refresh() poisons their outputs
        outputs.fill_(float("nan"))


@pytest.mark.parametrize("case", CACHED_CASES)
def test_cached_launch_graph_then_capture_on_the_same_stream(case, monkeypatch):
    """From its second identical call on, a cached launch also holds a one-kernel CUDA graph that
    later calls launch instead of the kernel (runtime/launch.py). Every call must still compute
    from its inputs' current contents, and capturing the same call on the same stream must launch
    the kernel (a graph launched into a capturing stream would void the capture)."""
    # The GEMMs' one launch cache (every layout), empty for this test: what it holds afterwards
    # was made here (torch hands out pooled streams, so an earlier test's launch may carry the
    # same stream handle).
    cache = LaunchCache()
    monkeypatch.setattr(gemm_ops, "_launches", cache)
    run, refresh, verify = CASES[case]()
    user = torch.cuda.Stream()
    user.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(user):
        outputs = run()
        for _ in range(4):
            refresh()
            _poison(outputs, case)
            assert run() is outputs
            verify(outputs)
    user.synchronize()
    prepared = [launch for entries in cache._entries.values() for _, launch in entries
                if launch.stream == user.cuda_stream]
    assert prepared and all(p._graph is not None for p in prepared), "no launch graph was built"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=user):
        captured = run()
    refresh()
    _poison(captured, case)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    verify(captured)
