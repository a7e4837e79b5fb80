"""Programmatic dependent launch (deep_gemm.set_pdl).

CPU: which launches carry CUDA's programmatic-stream-serialization attribute, through the fake
driver of tests/test_host_path.py (PDL on and a PDL-ready module: cuLaunchKernelEx with the
attribute, never a one-kernel graph; anything else: the launch as before), and which kernel
headers declare themselves PDL-ready (those that wait with griddepcontrol before touching memory),
compiled with NVRTC. GPU: the same bits with PDL off and on, eagerly, on dependent chains and in
CUDA graphs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deep_gemm
import test_host_path as hp
from deep_gemm import utils
from deep_gemm.jit import compile_kernel
from deep_gemm.jit.pad_source import KERNEL_NAME, NAME, pad_source
from deep_gemm.runtime import driver, launch

fake = hp.fake                       # the fake-driver fixture
KERNELS = Path(deep_gemm.__file__).resolve().parent / "kernels"
PDL = (("CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION", 1),)   # the fake's record of the attribute


@pytest.fixture(autouse=True)
def pdl_off(monkeypatch):
    """Every test starts with PDL off and leaves it as it found it."""
    monkeypatch.setattr(utils, "_pdl_enabled", False)


# ---- CPU: the launch path ---------------------------------------------------------------------
def _calls():
    """One call of each layout on the fake's CPU tensors, as the public functions make them."""
    lhs, rhs, out = hp.dense_inputs()
    clhs, crhs, cout, m_indices = hp.contiguous_inputs()
    mlhs, mrhs, mout, masked_m = hp.masked_inputs()
    return {
        "dense": lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out),
        "contiguous": lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(clhs, crhs, cout, m_indices),
        "masked": lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(mlhs, mrhs, mout, masked_m, 32),
    }


@pytest.mark.parametrize("layout", ["dense", "contiguous", "masked"])
def test_pdl_on_launches_ready_kernels_with_the_attribute(fake, layout):
    fake.pdl_ready = True
    call = _calls()[layout]
    deep_gemm.set_pdl(True)
    for _ in range(4):
        call()
    # Every launch through cuLaunchKernelEx with the attribute; no graph (its launch would wait
    # for the previous kernel); one validation and one prepared launch for the four calls.
    assert fake.launch_attrs == [PDL] * 4 and fake.graph_launches == 0
    assert fake.counts() == (1, 1, 4) and len({launch_[4] for launch_ in fake.launches}) == 1

    # Off again: the same cached launch, as before PDL (direct, then through its graph).
    deep_gemm.set_pdl(False)
    for _ in range(4):
        call()
    assert all(attrs == () for attrs in fake.launch_attrs[4:]) and fake.graph_launches >= 1
    assert fake.counts()[:2] == (1, 1) and len({launch_[4] for launch_ in fake.launches}) == 1

    # On once more: the graph exists but is passed over.
    graphs = fake.graph_launches
    deep_gemm.set_pdl(True)
    call()
    assert fake.launch_attrs[-1] == PDL and fake.graph_launches == graphs and fake.counts()[:2] == (1, 1)


def test_pdl_off_is_the_plain_path_for_ready_kernels(fake):
    fake.pdl_ready = True
    call = _calls()["dense"]
    for _ in range(5):
        call()
    assert all(attrs == () for attrs in fake.launch_attrs)
    assert len(fake.launches) == 5 and fake.graph_launches == 3      # as in tests/test_host_path.py


def test_pdl_on_leaves_kernels_that_do_not_wait_alone(fake):
    """A module without DG_PDL_READY (a kernel that may read memory before griddepcontrol.wait)
    never gets the attribute."""
    fake.pdl_ready = False
    call = _calls()["dense"]
    deep_gemm.set_pdl(True)
    for _ in range(5):
        call()
    assert all(attrs == () for attrs in fake.launch_attrs)
    assert len(fake.launches) == 5 and fake.graph_launches == 3


def test_pdl_launch_into_a_capturing_stream(fake, monkeypatch):
    """While the stream captures, the attributed launch is what the capture records."""
    fake.pdl_ready = True
    monkeypatch.setattr(launch, "_stream_capturing", lambda: True)
    deep_gemm.set_pdl(True)
    call = _calls()["dense"]
    for _ in range(3):
        call()
    assert fake.launch_attrs == [PDL] * 3 and fake.graph_launches == 0


def test_pdl_config_is_built_once_per_prepared_launch(fake, monkeypatch):
    fake.pdl_ready = True
    made = []
    real = driver.LoadedKernel.launch_config
    monkeypatch.setattr(driver.LoadedKernel, "launch_config",
                        lambda self, grid, stream, pdl=False: made.append(pdl) or real(self, grid, stream, pdl))
    call = _calls()["dense"]
    call()
    assert made == [False]                # PDL off: no PDL config
    deep_gemm.set_pdl(True)
    for _ in range(6):
        call()
    assert made == [False, True]          # built by the first fire with PDL on, none per call


def test_single_launches_use_the_ex_path_only_with_pdl_on_a_ready_kernel(monkeypatch):
    """LoadedKernel.launch (the K-padding kernel's launch, one per call)."""
    cu = hp.FakeDriver()
    monkeypatch.setattr(driver, "_driver", cu)
    plain, ex = [], []
    monkeypatch.setattr(cu, "cuLaunchKernel", lambda *args: plain.append(args) or (0,))
    monkeypatch.setattr(cu, "cuLaunchKernelEx", lambda config, f, params, extra: ex.append(config) or (0,))
    for ready in (False, True):
        cu.pdl_ready = ready
        kernel = driver.LoadedKernel(b"", "deep_gemm_pad_k16", 256)
        assert kernel.pdl_ready is ready
        for enabled in (False, True):
            deep_gemm.set_pdl(enabled)
            kernel.launch(12, 7, bytes(16), (0, 8))
    assert len(plain) == 3 and len(ex) == 1
    assert [args[1] for args in plain] == [12, 12, 12]
    config = ex[0]
    assert (config.gridDimX, config.blockDimX, config.sharedMemBytes, config.hStream) == (12, 256, 0, 7)
    assert config.numAttrs == 1 and config.attrs[0].id == PDL[0][0]
    assert config.attrs[0].value.programmaticStreamSerializationAllowed == 1


def test_real_bindings_build_the_attribute():
    """The config as cuda-bindings (12.x or 13.x) builds it, without a GPU."""
    cu = pytest.importorskip("cuda.bindings.driver")
    kernel = driver.LoadedKernel.__new__(driver.LoadedKernel)
    kernel.num_threads, kernel.smem_bytes = 384, 1000
    config = kernel.launch_config(132, 0, pdl=True)
    assert config.numAttrs == 1 and config.gridDimX == 132 and config.blockDimX == 384
    attr = config.attrs[0]
    assert attr.id == cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attr.value.programmaticStreamSerializationAllowed == 1
    assert kernel.launch_config(132, 0).numAttrs == 0


# ---- CPU: which kernels may be launched with PDL -------------------------------------------------
def test_headers_declare_pdl_ready_exactly_when_they_wait():
    """DG_PDL_READY promises a griddepcontrol wait before the first global access; a header that
    waits without declaring it gets no attribute (safe, but no overlap)."""
    for header in sorted(KERNELS.glob("*.cuh")):
        if header.name == "ptx.cuh":     # defines both
            continue
        text = header.read_text()
        assert ("\nDG_PDL_READY" in text) == ("griddepcontrol_wait()" in text), header.name
    assert "\nDG_PDL_READY" in (KERNELS / "pad.cuh").read_text()


@pytest.fixture
def nvrtc(monkeypatch, tmp_cache_dir):
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)


def test_wrappers_compile_and_the_marker_reaches_the_cubin(nvrtc):
    body = ('#include "ptx.cuh"\n{marker}\nextern "C" __global__ void probe(int* p) {{\n'
            '    ptx::griddepcontrol_wait();\n    p[threadIdx.x] += 1;\n    ptx::griddepcontrol_launch_dependents();\n}}\n')
    ready = compile_kernel(body.format(marker="DG_PDL_READY"), "probe", arch="sm_90a", name="pdl_probe")
    plain = compile_kernel(body.format(marker=""), "probe", arch="sm_90a", name="pdl_probe_plain")
    assert driver.PDL_READY_SYMBOL in ready.cubin and driver.PDL_READY_SYMBOL not in plain.cubin
    pad = compile_kernel(pad_source(), KERNEL_NAME, arch="sm_90a", name=NAME)
    assert driver.PDL_READY_SYMBOL in pad.cubin


# ---- GPU: the same results with PDL off and on -------------------------------------------------------
def _chain(x, layers):
    """A model's MLP layers as decoding runs them: each kernel reads what the previous one wrote."""
    h = x
    for up, down in layers:
        h = deep_gemm.gemm_fp8_fp8_bf16_nt(deep_gemm.per_token_cast_to_fp8(h), up)
        h = deep_gemm.gemm_fp8_fp8_bf16_nt(deep_gemm.per_token_cast_to_fp8(h), down)
    return h


def _layers(hidden, inter, count):
    def weight(n, k):
        return deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5)
    return [(weight(inter, hidden), weight(hidden, inter)) for _ in range(count)]


@pytest.mark.gpu
def test_gpu_modules_know_whether_they_may_use_pdl():
    from deep_gemm import plan
    from deep_gemm.ops import pad
    from deep_gemm.runtime import kernels
    index = torch.cuda.current_device()
    assert pad.pad_kernel(index).pdl_ready
    gemm = kernels.gemm_kernel(plan.plan_dense(64, 2112, 896, deep_gemm.get_num_sms()), index)
    assert gemm.pdl_ready == ("\nDG_PDL_READY" in (KERNELS / "gemm.cuh").read_text())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 200])
def test_gpu_dependent_chain_same_bits_with_pdl(m):
    torch.manual_seed(m)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    layers = _layers(2048, 1536, 3)
    want = _chain(x, layers)
    deep_gemm.set_pdl(True)
    for _ in range(3):     # the uncached call, then cached launches
        got = _chain(x, layers)
        assert torch.equal(got, want)
    # Buffers reused right away (write-after-read across kernels): still the same bits.
    outs = [_chain(x, layers) for _ in range(8)]
    torch.cuda.synchronize()
    assert all(torch.equal(out, want) for out in outs)


@pytest.mark.gpu
def test_gpu_padding_kernel_then_gemm_with_pdl():
    """K % 16 != 0: the padding kernel (PDL-ready) writes what the GEMM reads next."""
    x = torch.randn(96, 1000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 1000, device="cuda", dtype=torch.bfloat16)
    lhs, rhs = deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_block_cast_to_fp8(w)
    want = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
    deep_gemm.set_pdl(True)
    for _ in range(5):
        assert torch.equal(deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs), want)


@pytest.mark.gpu
def test_gpu_grouped_layouts_same_bits_with_pdl():
    g, max_m, n, k = 4, 128, 1024, 2048
    a = deep_gemm.per_token_cast_to_fp8(torch.randn(g, max_m, k, device="cuda", dtype=torch.bfloat16))
    b = deep_gemm.per_block_cast_to_fp8(torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16))
    masked_m = torch.tensor([0, 17, 128, 64], device="cuda", dtype=torch.int32)
    ca = deep_gemm.per_token_cast_to_fp8(torch.randn(g * max_m, k, device="cuda", dtype=torch.bfloat16))
    m_indices = torch.arange(g * max_m, device="cuda", dtype=torch.int32) // max_m

    def run():
        masked = torch.zeros(g, max_m, n, device="cuda", dtype=torch.bfloat16)
        contiguous = torch.zeros(g * max_m, n, device="cuda", dtype=torch.bfloat16)
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(a, b, masked, masked_m, 64)
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(ca, b, contiguous, m_indices)
        return masked, contiguous
    want = run()
    deep_gemm.set_pdl(True)
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(run(), want))


@pytest.mark.gpu
def test_gpu_cuda_graph_captured_with_pdl():
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    layers = _layers(2048, 1536, 2)
    want = _chain(x, layers)
    deep_gemm.set_pdl(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):     # load kernels and fill the caches on the capture's stream
        _chain(x, layers)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = _chain(x, layers)
    deep_gemm.set_pdl(False)            # the graph keeps what it captured
    for _ in range(5):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
