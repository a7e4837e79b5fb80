"""CPU tests of the per-call host path: the plan cache, the launch caches of the public GEMMs
and the grouped validation fast paths.

The CUDA driver is replaced by a fake that records every launch, reading the parameters back
through the pointer array exactly as cuLaunchKernel would, and whose tensor maps are bytes
derived from every argument of cuTensorMapEncodeTiled (so a stale pointer, shape or stride
shows up as different bytes). CPU tensors stand in for GPU ones.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import types

import pytest
import torch

import deep_gemm
from deep_gemm import plan, reference, utils, validation
from deep_gemm.ops import gemm as gemm_ops
from deep_gemm.ops import grouped as grouped_ops
from deep_gemm.plan import LAYOUT_CONTIGUOUS, LAYOUT_DENSE, LAYOUT_MASKED
from deep_gemm.runtime import driver, kernels, launch, tma, workspace

FP8 = torch.float8_e4m3fn
PARAM_SIZES = [ctypes.sizeof(t) for t in kernels.GEMM_PARAM_TYPES]
PARAM = dict(zip(launch.GEMM_PARAM_NAMES, launch.GEMM_PARAM_OFFSETS))   # byte offset by name


# ---------------------------------------------------------------------------------------------
# Plan cache.
# ---------------------------------------------------------------------------------------------
def _plan_args():
    ms = (0, 1, 63, 64, 65, 128, 129, 1000, 4096, 4097)
    nks = ((7168, 576), (2112, 7168), (24576, 1536), (4096, 7168), (100, 200), (1, 1))
    layouts = ((LAYOUT_DENSE, 1), (LAYOUT_CONTIGUOUS, 8), (LAYOUT_MASKED, 32))
    for m, (n, k), sms, (layout, groups) in itertools.product(ms, nks, (132, 78, 1), layouts):
        yield m, n, k, sms, layout, groups


def test_plan_cache_matches_plan_dense(monkeypatch):
    monkeypatch.setattr(plan, "_plan_cache", {})
    for args in _plan_args():
        m, n, k, sms, layout, groups = args
        want = plan.plan_dense(m, n, k, sms, layout=layout, num_groups=groups)
        got = plan.plan_cached(*args)
        assert got == want and got.name == want.name, args
        assert plan.plan_cached(*args) is got, args          # second call: the memo
    assert len(plan._plan_cache) == len(set(_plan_args()))


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(plan, "_plan_cache", {})
    monkeypatch.setattr(plan, "PLAN_CACHE_SIZE", 5)
    for m in range(1, 40):
        assert plan.plan_cached(m * 64, 4096, 7168, 132) == plan.plan_dense(m * 64, 4096, 7168, 132)
        assert len(plan._plan_cache) <= 5
    # The newest entries survive, the oldest are gone.
    assert (39 * 64, 4096, 7168, 132, LAYOUT_DENSE, 1) in plan._plan_cache
    assert (64, 4096, 7168, 132, LAYOUT_DENSE, 1) not in plan._plan_cache
    plan.clear_plan_cache()
    assert not plan._plan_cache


# ---------------------------------------------------------------------------------------------
# A fake driver that records launches.
# ---------------------------------------------------------------------------------------------
class _AnyEnum:
    def __getattr__(self, name):
        return name


class FakeDriver:
    class CUresult:
        CUDA_SUCCESS = 0

    CUtensorMapDataType = CUtensorMapInterleave = CUtensorMapSwizzle = _AnyEnum()
    CUtensorMapL2promotion = CUtensorMapFloatOOBfill = _AnyEnum()
    CUfunction_attribute = CUlaunchAttributeID = CUstreamCaptureMode = _AnyEnum()
    cuuint64_t = cuuint32_t = CUstream = int

    class CUlaunchConfig(types.SimpleNamespace):
        pass

    def __init__(self):
        self.launches = []       # (grid, threads, smem, stream, parameter bytes)
        self.graph_launches = 0  # how many of them came from cuGraphLaunch
        self.encodes = 0
        self.fail_instantiate = False
        self._keep = []
        self._capturing = {}     # private stream -> launches captured on it
        self._next_stream = 1000

    # Graphs, as far as PreparedLaunch uses them: a stream captures the launches made on it, an
    # instantiated graph replays them (on the stream it is launched on) with the parameter bytes
    # read at capture time, as the real driver copies them into the kernel node.
    def cuStreamCreate(self, flags):
        self._next_stream += 1
        return 0, self._next_stream

    def cuStreamDestroy(self, stream):
        return (0,)

    def cuStreamBeginCapture(self, stream, mode):
        self._capturing[stream] = []
        return (0,)

    def cuStreamEndCapture(self, stream):
        return 0, tuple(self._capturing.pop(stream))

    def cuGraphInstantiate(self, graph, flags):
        return (999, None) if self.fail_instantiate else (0, ("exec", graph))

    def cuGraphDestroy(self, graph):
        return (0,)

    def cuGraphExecDestroy(self, graph_exec):
        return (0,)

    def cuGraphLaunch(self, graph_exec, stream):
        for grid, threads, smem, _, data in graph_exec[1]:
            self.launches.append((grid, threads, smem, stream, data))
            self.graph_launches += 1
        return (0,)

    def cuTensorMapEncodeTiled(self, *args):
        self.encodes += 1
        digest = hashlib.sha512(repr(args).encode()).digest()       # 64 bytes from every argument
        buf = ctypes.create_string_buffer(digest * 2, 128)
        self._keep.append(buf)
        return 0, types.SimpleNamespace(getPtr=lambda: ctypes.addressof(buf))

    def cuModuleLoadData(self, cubin):
        return 0, object()

    def cuModuleGetFunction(self, module, name):
        return 0, object()

    def cuFuncSetAttribute(self, *args):
        return (0,)

    def cuLaunchKernel(self, *args):
        raise AssertionError("GEMM launches go through cuLaunchKernelEx")

    def cuLaunchKernelEx(self, config, f, params, extra):
        # Read every parameter back through the pointer array, as the driver does.
        # Kept as the kernel's parameter space: each at its offset, zero padding between.
        pointers = (ctypes.c_void_p * len(PARAM_SIZES)).from_address(params)
        space = bytearray(launch.GEMM_PARAM_OFFSETS[-1] + PARAM_SIZES[-1])
        for offset, p, size in zip(launch.GEMM_PARAM_OFFSETS, pointers, PARAM_SIZES):
            space[offset:offset + size] = ctypes.string_at(p, size)
        data = bytes(space)
        record = (config.gridDimX, config.blockDimX, config.sharedMemBytes, config.hStream, data)
        if config.hStream in self._capturing:
            self._capturing[config.hStream].append(record)
        else:
            self.launches.append(record)
        return (0,)

    def cuGetErrorName(self, err):
        return 0, b"CUDA_ERROR_FAKE"

    def cuGetErrorString(self, err):
        return 0, b"fake"


@pytest.fixture
def fake(monkeypatch):
    """Route the Hopper path of the public GEMMs onto FakeDriver with CPU tensors; fresh caches."""
    cu = FakeDriver()
    monkeypatch.setattr(driver, "_driver", cu)
    monkeypatch.setattr(gemm_ops, "runs_on_hopper", lambda device: True)
    monkeypatch.setattr(grouped_ops, "runs_on_hopper", lambda device: True)
    monkeypatch.setattr(kernels, "compile_kernel", lambda *a, **k: types.SimpleNamespace(cubin=b""))
    monkeypatch.setattr(kernels, "device_arch", lambda device: "sm_90a")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch, "_stream_capturing", lambda: False)
    monkeypatch.setattr(utils, "device_sm_count", lambda index: 132)
    monkeypatch.setattr(utils, "_num_sms_override", None)
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 7)
    monkeypatch.setattr(gemm_ops, "_dense_launches", launch.LaunchCache())
    monkeypatch.setattr(grouped_ops, "_contiguous_launches", launch.LaunchCache())
    monkeypatch.setattr(grouped_ops, "_masked_launches", launch.LaunchCache())
    monkeypatch.setattr(workspace, "_workspaces", {})
    monkeypatch.setattr(workspace, "_outgrown", [])
    tma.tensor_map.cache_clear()
    yield cu
    tma.tensor_map.cache_clear()


def dense_inputs(m=128, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(n, k))
    return (a, sa), (b, sb), torch.empty(m, n, dtype=torch.bfloat16)


def uncached_dense_params(lhs, rhs, out, num_sms=132):
    """The packed parameters of a dense launch built from scratch: no plan, tensor-map or launch
    cache involved."""
    tma.tensor_map.cache_clear()
    args = validation.check_dense(lhs, rhs, out)
    assert args.a is lhs[0] and args.sa is lhs[1] and args.out is out, "inputs must be kernel-ready"
    (a, sa), (b, sb) = lhs, rhs
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    config = plan.plan_dense(m, n, k, num_sms)
    prepared = kernels.prepare_gemm(config, a, m, sa, m, b, n, sb, out, m, m, None, num_sms)
    return prepared.params


def legacy_params(prepared_args):
    """The same parameters written the pre-cache way: into the ctypes buffers of an ArgPack,
    each placed at its offset in the kernel's parameter space (zero padding between)."""
    pack = driver.ArgPack(kernels.GEMM_PARAM_TYPES)
    maps, *scalars = prepared_args
    for i, descriptor in enumerate(maps):
        ctypes.memmove(pack.buffers[i], descriptor, 128)
    for i, value in enumerate(scalars, start=len(maps)):
        pack.buffers[i].value = value
    space = bytearray(launch.GEMM_PARAM_OFFSETS[-1] + PARAM_SIZES[-1])
    for offset, buf in zip(launch.GEMM_PARAM_OFFSETS, pack.buffers):
        space[offset:offset + len(bytes(buf))] = bytes(buf)
    return bytes(space)


# ---------------------------------------------------------------------------------------------
# Parameter packing.
# ---------------------------------------------------------------------------------------------
def test_param_layout_matches_kernel_signature():
    offsets, at = [], 0
    for size in PARAM_SIZES:
        at = (at + size - 1) // size * size if size <= 8 else at
        offsets.append(at)
        at += size
    assert tuple(offsets) == launch.GEMM_PARAM_OFFSETS and len(launch.GEMM_PARAM_NAMES) == len(offsets)
    maps = [bytes([i]) * 128 for i in range(6)]
    args = (0x1000, 0x2000, 0x3000, 4096, 77, 200, 204, 77, 0x4000, 0x5000, 0x6000)
    packed = launch.pack_gemm_params(maps, *args)
    assert len(packed) == launch.GEMM_PARAM_OFFSETS[-1] + PARAM_SIZES[-1]
    assert packed == legacy_params((maps, *args))
    # Without split-K the workspace pointers are null.
    assert launch.pack_gemm_params(maps, *args[:9]) == legacy_params((maps, *args[:9], 0, 0))
    with pytest.raises(Exception):          # int32 overflow is an error, never a silent wrap
        launch.pack_gemm_params(maps, 0, 0, 0, 2 ** 31, 1, 1, 4, 64, 0)
    with pytest.raises(ValueError):
        launch.pack_gemm_params(maps[:5], 0, 0, 0, 0, 1, 1, 4, 64, 0)


# ---------------------------------------------------------------------------------------------
# Dense launch cache.
# ---------------------------------------------------------------------------------------------
def test_dense_hit_launches_the_uncached_parameters(fake, monkeypatch):
    lhs, rhs, out = dense_inputs()
    assert deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out) is out
    assert len(gemm_ops._dense_launches) == 1
    # A hit must not plan, validate, encode or load anything (so it is also safe while a CUDA
    # graph is being captured, where loading a module is not allowed).
    encodes = fake.encodes

    def boom(*args, **kwargs):
        raise AssertionError("the cache hit went the long way")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemm_ops, "check_dense", boom)
        mp.setattr(gemm_ops, "plan_cached", boom)
        mp.setattr(kernels, "gemm_kernel", boom)
        for _ in range(3):
            assert deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out) is out
    assert fake.encodes == encodes and len(fake.launches) == 4
    first = fake.launches[0]
    assert all(launch_ == first for launch_ in fake.launches)
    assert first[3] == 7                                   # the current stream, read at each launch
    assert first[4] == uncached_dense_params(lhs, rhs, out)


@pytest.mark.parametrize("m,n,k", [(200, 256, 384), (1, 7168, 2048), (77, 512, 384), (256, 256, 384),
                                   (4097, 7168, 2048)])
def test_partial_last_m_block_loads_through_short_boxes(fake, monkeypatch, m, n, k):
    """A dense M whose last block is partial gets a second pair of maps for A and its scales,
    boxes of just the tail rows (16-byte scale boxes); a whole last block gets none."""
    encoded = {}
    real = kernels.tensor_map_2d

    def recording(*args):
        descriptor = real(*args)
        encoded[descriptor] = args
        return descriptor
    monkeypatch.setattr(kernels, "tensor_map_2d", recording)
    lhs, rhs, out = dense_inputs(m, n, k)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    params = fake.launches[-1][4]
    config = plan.plan_dense(m, n, k, 132)
    tail = m % config.block_m
    field = lambda name, size=128: params[PARAM[name]:PARAM[name] + size]
    assert int.from_bytes(field("a_tail_rows", 4), "little") == tail
    a, sa = encoded[field("tma_a")], encoded.get(field("tma_sa"))
    assert a[0] == lhs[0].data_ptr() and a[6] == config.block_m
    assert (sa is None) == config.sa_loader_warp and (sa is None or sa[5] == config.block_m)
    if not tail:
        assert field("tma_a_tail") == field("tma_sa_tail") == bytes(128)
        return
    a_tail = encoded[field("tma_a_tail")]
    assert a_tail[:6] == a[:6] and a_tail[6] == tail and a_tail[7] == a[7]     # same view, tail rows
    if config.sa_loader_warp:
        assert field("tma_sa_tail") == bytes(128)
    else:
        sa_tail = encoded[field("tma_sa_tail")]
        assert sa_tail[:5] == sa[:5] and sa_tail[5] == (tail + 3) // 4 * 4


def test_split_k_launches_are_keyed_on_the_stream(fake, monkeypatch):
    """A split-K launch carries its stream's workspace: the same call on another stream must
    not reuse it (two streams running at once would share tile counters)."""
    # The planner does not choose split-K today: force it.
    monkeypatch.setattr(gemm_ops, "plan_cached", lambda *args: dataclasses.replace(
        plan.plan_dense(*args), block_n=32, split_k=2, num_stages=plan.max_stages(64, 32), stage_k_blocks=1))
    lhs, rhs, out = dense_inputs(64, 2112, 7168)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    first = fake.launches[-1]
    workspace_first = first[4][PARAM['workspace']:]
    assert first[3] == 7 and workspace_first != bytes(16)
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 9)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._dense_launches) == 2
    assert fake.launches[-1][3] == 9 and fake.launches[-1][4][PARAM['workspace']:] != workspace_first
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 7)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._dense_launches) == 2 and fake.launches[-1] == first


def test_split_k_workspace_per_stream_grows_and_keeps_old_buffers(monkeypatch):
    monkeypatch.setattr(workspace, "_workspaces", {})
    monkeypatch.setattr(workspace, "_outgrown", [])
    cpu = torch.device("cpu")
    counters, partials = workspace.split_k_workspace(cpu, 1, 10, 1000)
    assert (partials - counters) % 256 == 0 and partials - counters >= 40
    assert workspace.split_k_workspace(cpu, 1, 5, 10) == (counters, partials)      # fits: same buffer
    other = workspace.split_k_workspace(cpu, 2, 10, 1000)
    assert other[0] != counters                                                     # per stream
    buffer = workspace._workspaces[(cpu, 1)][0]
    assert not buffer.tensor.any()                                                  # zeroed once
    grown = workspace.split_k_workspace(cpu, 1, 10, 5000)
    assert grown != (counters, partials) and workspace._outgrown == [buffer]        # old one kept alive
    assert workspace._workspaces[(cpu, 1)][2] >= 5000


def _same_ptr_variants(lhs, rhs, out):
    """Pairs of calls that share every data pointer but differ in one shape or stride."""
    (a, sa), (b, sb) = lhs, rhs
    m, k = a.shape
    n = b.shape[0]
    wide = torch.empty(m, k + 16, dtype=torch.uint8).view(FP8)
    yield "a row stride", ((wide.view(-1)[:m * k].view(m, k), sa), rhs, out), ((wide[:, :k], sa), rhs, out)
    sa_short = sa.as_strided((m - 8, sa.shape[1]), (1, m - 8))       # column-major for M - 8 rows
    yield "m", ((a[:m - 8], sa_short), rhs, out[:m - 8]), (lhs, rhs, out)
    yield "n", (lhs, (b[:n - 128], sb[:sb.shape[0] - 1]), out[:, :n - 128]), (lhs, rhs, out)
    big_out = torch.empty(m, n + 64, dtype=torch.bfloat16)
    yield "out row stride", (lhs, rhs, big_out[:, :n]), (lhs, rhs, big_out.view(-1)[:m * n].view(m, n))


def test_dense_misses_on_any_pointer_shape_or_stride_change(fake):
    lhs, rhs, out = dense_inputs()
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    (a, sa), (b, sb) = lhs, rhs
    changed = {
        "a": ((a.clone(), sa), rhs, out),
        "sa": ((a, deep_gemm.get_col_major_tma_aligned_tensor(sa.clone())), rhs, out),
        "b": (lhs, (b.clone(), sb), out),
        "sb": (lhs, (b, sb.clone()), out),
        "out": (lhs, rhs, torch.empty_like(out)),
    }
    for name, call in changed.items():
        before = len(gemm_ops._dense_launches)
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
        assert len(gemm_ops._dense_launches) == before + 1, f"{name}: a new pointer must miss"
        assert fake.launches[-1][4] == uncached_dense_params(*call), name
    for name, first, second in _same_ptr_variants(lhs, rhs, out):
        before = len(gemm_ops._dense_launches)
        deep_gemm.gemm_fp8_fp8_bf16_nt(*first)
        deep_gemm.gemm_fp8_fp8_bf16_nt(*second)
        assert fake.launches[-2][4] == uncached_dense_params(*first), name
        assert fake.launches[-1][4] == uncached_dense_params(*second), name
        assert fake.launches[-1][4] != fake.launches[-2][4], name


def test_dense_layouts_at_one_address_each_get_a_launch(fake, monkeypatch):
    """A buffer viewed with different M (or strides) at the same address: one key, one guarded
    launch per layout, each hit launching its own parameters without validating again; more
    layouts than MAX_LAYOUTS_PER_KEY evict the oldest, which is then rebuilt, still right."""
    lhs, rhs, out = dense_inputs(m=128)
    (a, sa), (b, sb) = lhs, rhs
    calls = []
    for m in (128, 96, 64, 32, 16, 8):
        sa_m = sa.as_strided((m, sa.shape[1]), (1, m)) if m < 128 else sa
        calls.append(((a[:m], sa_m), rhs, out[:m]))
    validated = []
    check = gemm_ops.check_dense
    monkeypatch.setattr(gemm_ops, "check_dense", lambda *args: validated.append(1) or check(*args))
    for call in calls[:2] * 3:
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
        assert fake.launches[-1][4] == uncached_dense_params(*call)
    assert len(validated) == 2 and len(gemm_ops._dense_launches) == 1    # two layouts, one key
    for call in calls:                                                   # six layouts: the first two go
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
    key = gemm_ops._dense_key(*calls[0])[0]
    assert len(gemm_ops._dense_launches.get(key)) == launch.MAX_LAYOUTS_PER_KEY
    assert gemm_ops._dense_launches.find(key, gemm_ops._dense_key(*calls[0])[1]) is None
    assert gemm_ops._dense_launches.find(key, gemm_ops._dense_key(*calls[-1])[1]) is not None
    deep_gemm.gemm_fp8_fp8_bf16_nt(*calls[0])
    assert fake.launches[-1][4] == uncached_dense_params(*calls[0])


@pytest.mark.parametrize("native", [True, False], ids=["TensorGuards", "python"])
def test_layout_guard_checks_type_dtype_device_shape_strides(native, monkeypatch):
    if not native:
        monkeypatch.setattr(launch, "_TensorGuards", None)
    elif launch._TensorGuards is None:
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards")
    x = torch.empty(64, 64)
    guard = launch.layout_guard((x, torch.empty(8, dtype=torch.int32)))
    ok = torch.empty(8, dtype=torch.int32)
    assert guard(torch.empty(64, 64), ok)                                  # same layout, other data
    assert not guard(torch.empty(64, 128)[:, :64], ok)                     # strides
    assert not guard(torch.empty(64, 65)[:, :64], ok)
    assert not guard(torch.empty(32, 64), ok)                              # shape
    assert not guard(torch.empty(64, 64, dtype=torch.float16), ok)         # dtype
    assert not guard(torch.empty(64, 64), torch.empty(8, dtype=torch.int64))
    assert not guard(torch.nn.Parameter(torch.empty(64, 64), requires_grad=False), ok)   # type
    assert not guard(torch.empty(64, 64, requires_grad=True), ok)
    assert not guard(torch.empty(64, 64, device="meta"), ok)               # device


def test_dense_cache_still_validates_dtype_and_num_sms(fake, monkeypatch):
    lhs, rhs, out = dense_inputs()
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    (a, sa), (b, sb) = lhs, rhs
    # Same pointers, shapes and strides, wrong dtype: still rejected, naming the argument.
    with pytest.raises(TypeError, match=r"lhs\[0\]"):
        deep_gemm.gemm_fp8_fp8_bf16_nt((a.view(torch.uint8), sa), rhs, out)
    with pytest.raises(TypeError, match="out"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out.view(torch.float16))
    with pytest.raises(TypeError, match="pair"):
        deep_gemm.gemm_fp8_fp8_bf16_nt([a], rhs, out)
    # set_num_sms() changes the plan and the grid: a new entry, planned with the new count.
    monkeypatch.setattr(utils, "_num_sms_override", 7)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._dense_launches) == 2
    assert fake.launches[-1][0] <= 7
    assert fake.launches[-1][4] == uncached_dense_params(lhs, rhs, out, num_sms=7)


def test_dense_inputs_rebuilt_by_validation_are_not_cached(fake):
    lhs, rhs, out = dense_inputs(m=64, n=256, k=256)
    (a, sa), (b, sb) = lhs, rhs
    row_major = sa.contiguous()                    # validation transposes it: a new tensor each call
    deep_gemm.gemm_fp8_fp8_bf16_nt((a, row_major), rhs, out)
    odd_k = dense_inputs(m=64, n=256, k=200)       # K % 16 != 0: A is padded each call
    deep_gemm.gemm_fp8_fp8_bf16_nt(*odd_k)
    odd_n = dense_inputs(m=64, n=100, k=256)       # N % 8 != 0: out=None gets padded rows
    assert deep_gemm.gemm_fp8_fp8_bf16_nt(*odd_n[:2]).shape == (64, 100)
    assert len(gemm_ops._dense_launches) == 0 and len(fake.launches) == 3
    # M = 0 launches nothing; CPU reference path (not Hopper) caches nothing either.
    empty = dense_inputs(m=0)
    deep_gemm.gemm_fp8_fp8_bf16_nt(*empty)
    assert len(fake.launches) == 3 and len(gemm_ops._dense_launches) == 0


def test_dense_subclass_weights_use_the_cache(fake):
    lhs, rhs, out = dense_inputs()
    weights = (torch.nn.Parameter(rhs[0], requires_grad=False), torch.nn.Parameter(rhs[1], requires_grad=False))
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, weights, out)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, weights, out)
    assert len(gemm_ops._dense_launches) == 1 and len(fake.launches) == 2
    assert fake.launches[1][4] == fake.launches[0][4] == uncached_dense_params(lhs, rhs, out)


def test_launch_cache_is_bounded(fake, monkeypatch):
    cache = launch.LaunchCache(4)
    monkeypatch.setattr(gemm_ops, "_dense_launches", cache)
    lhs, rhs, out = dense_inputs()
    outs = [torch.empty_like(out) for _ in range(10)]
    for o in outs:
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, o)
        assert len(cache) <= 4
    assert len(cache) == 4
    assert gemm_ops._dense_key(lhs, rhs, outs[-1])[0] in cache   # newest kept
    assert gemm_ops._dense_key(lhs, rhs, outs[0])[0] not in cache  # oldest evicted
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, outs[0])             # evicted: rebuilt, still right
    assert fake.launches[-1][4] == uncached_dense_params(lhs, rhs, outs[0])
    with pytest.raises(ValueError):
        launch.LaunchCache(0)
    with pytest.raises(TypeError):
        launch.LaunchCache(2.5)


def test_failed_launch_raises_and_is_not_cached(fake, monkeypatch):
    lhs, rhs, out = dense_inputs()
    monkeypatch.setattr(fake, "cuLaunchKernelEx", lambda *args: (700,))
    with pytest.raises(driver.CudaError):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._dense_launches) == 0


def test_repeated_launches_move_to_a_graph_with_the_same_parameters(fake):
    lhs, rhs, out = dense_inputs()
    for _ in range(5):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    # Two kernel launches (the miss, then the first hit, which builds the graph), then graphs.
    assert len(fake.launches) == 5 and fake.graph_launches == 3
    assert all(record == fake.launches[0] for record in fake.launches)
    assert fake.launches[0][4] == uncached_dense_params(lhs, rhs, out)


def test_no_graph_launch_or_build_while_the_stream_captures(fake, monkeypatch):
    lhs, rhs, out = dense_inputs()
    monkeypatch.setattr(launch, "_stream_capturing", lambda: True)
    for _ in range(4):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 4 and fake.graph_launches == 0
    # Once the capture is over, the next launch builds the graph and the one after uses it.
    monkeypatch.setattr(launch, "_stream_capturing", lambda: False)
    for _ in range(2):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 6 and fake.graph_launches == 1
    # A graph built outside a capture is still not launched into a capturing stream.
    monkeypatch.setattr(launch, "_stream_capturing", lambda: True)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 7 and fake.graph_launches == 1
    assert all(record == fake.launches[0] for record in fake.launches)


def test_a_graph_that_cannot_be_built_leaves_kernel_launches(fake):
    lhs, rhs, out = dense_inputs()
    fake.fail_instantiate = True
    for _ in range(4):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 4 and fake.graph_launches == 0
    assert all(record == fake.launches[0] for record in fake.launches)


def test_launch_graphs_stay_within_their_device_memory_budget(fake, monkeypatch):
    import gc
    monkeypatch.setattr(launch, "MAX_LAUNCH_GRAPHS", launch.live_graphs() + 1)
    lhs, rhs, out = dense_inputs()
    other = torch.empty_like(out)
    for target in (out, other):
        for _ in range(3):
            deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, target)
    assert fake.graph_launches == 1            # only the first call site got a graph
    assert len(fake.launches) == 6 and all(r[4] == uncached_dense_params(lhs, rhs, t)
                                           for r, t in zip(fake.launches, [out] * 3 + [other] * 3))
    before = launch.live_graphs()
    gemm_ops._dense_launches.clear()           # evicted entries give their graphs back
    gc.collect()
    assert launch.live_graphs() == before - 1


def test_launch_graph_budget_from_the_environment(monkeypatch):
    monkeypatch.delenv("DG_LAUNCH_GRAPHS", raising=False)
    assert launch._launch_graphs_budget() == 512
    monkeypatch.setenv("DG_LAUNCH_GRAPHS", " 0 ")
    assert launch._launch_graphs_budget() == 0
    for bad in ("abc", "-1", "1.5"):
        monkeypatch.setenv("DG_LAUNCH_GRAPHS", bad)
        with pytest.raises(ValueError, match="DG_LAUNCH_GRAPHS must be a non-negative integer"):
            launch._launch_graphs_budget()


def test_no_launch_graphs_with_a_zero_budget(fake, monkeypatch):
    monkeypatch.setattr(launch, "MAX_LAUNCH_GRAPHS", 0)
    lhs, rhs, out = dense_inputs()
    for _ in range(4):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 4 and fake.graph_launches == 0


def test_a_graph_in_use_by_another_thread_is_not_launched_twice(fake):
    lhs, rhs, out = dense_inputs()
    for _ in range(3):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert fake.graph_launches == 1
    prepared = gemm_ops._dense_launches.find(*gemm_ops._dense_key(lhs, rhs, out))
    with prepared._graph_lock:        # as if another thread were inside cuGraphLaunch
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 4 and fake.graph_launches == 1 and fake.launches[-1] == fake.launches[0]


# ---------------------------------------------------------------------------------------------
# Grouped launch caches.
# ---------------------------------------------------------------------------------------------
def contiguous_inputs(groups=3, m=256, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(groups, n, k))
    m_indices = (torch.arange(m, dtype=torch.int32) // 128).clamp(max=groups - 1)   # one expert per 128 rows
    return (a, sa), (b, sb), torch.empty(m, n, dtype=torch.bfloat16), m_indices


def masked_inputs(groups=3, max_m=64, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(groups, max_m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(groups, n, k))
    masked_m = torch.full((groups,), max_m // 2, dtype=torch.int32)
    return (a, sa), (b, sb), torch.empty(groups, max_m, n, dtype=torch.bfloat16), masked_m


def test_contiguous_cache(fake, monkeypatch):
    lhs, rhs, out, idx = contiguous_inputs()
    fn = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
    assert fn(lhs, rhs, out, idx) is out
    assert fn(lhs, rhs, out, idx) is out
    assert len(grouped_ops._contiguous_launches) == 1 and fake.launches[0] == fake.launches[1]
    # A new m_indices buffer (or any other pointer) is a new launch.
    fn(lhs, rhs, out, idx.clone())
    assert len(grouped_ops._contiguous_launches) == 2 and fake.launches[2][4] != fake.launches[0][4]
    # check_indices=True always runs the host check, cached entry or not.
    seen = []
    monkeypatch.setattr(grouped_ops, "check_m_indices", lambda t, g: seen.append(g))
    fn(lhs, rhs, out, idx, check_indices=True)
    assert seen == [3] and fake.launches[-1] == fake.launches[0]
    # Wrong dtype over the cached pointers is still an error.
    with pytest.raises(TypeError, match="m_indices"):
        fn(lhs, rhs, out, idx.view(torch.float32))
    # Unevenly spaced groups of B are copied per call: never cached.
    b, sb = rhs
    spaced = torch.empty(3, 256 + 16, 384, dtype=torch.uint8).view(FP8)[:, :256]
    spaced.view(torch.uint8).copy_(b.view(torch.uint8))
    before = len(grouped_ops._contiguous_launches)
    fn(lhs, (spaced, sb), out, idx)
    assert len(grouped_ops._contiguous_launches) == before


def test_masked_cache(fake):
    lhs, rhs, out, mm = masked_inputs()
    fn = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked
    assert fn(lhs, rhs, out, mm, 32) is out
    assert fn(lhs, rhs, out, mm, 32) is out
    assert len(grouped_ops._masked_launches) == 1 and fake.launches[0] == fake.launches[1]
    # expected_m is part of the plan, so of the key.
    fn(lhs, rhs, out, mm, 1)
    assert len(grouped_ops._masked_launches) == 2
    # A bool or float equal to a cached expected_m must not hit: validation rejects them.
    fn(lhs, rhs, out, mm, 1)
    with pytest.raises(TypeError, match="expected_m"):
        fn(lhs, rhs, out, mm, True)
    with pytest.raises(TypeError, match="expected_m"):
        fn(lhs, rhs, out, mm, 32.0)
    # New masked_m pointer: a new launch whose group-info parameter is that pointer.
    mm2 = mm.clone()
    fn(lhs, rhs, out, mm2, 32)
    assert len(grouped_ops._masked_launches) == 3
    assert int.from_bytes(fake.launches[-1][4][PARAM['group_info']:PARAM['workspace']], "little") == mm2.data_ptr()


# ---------------------------------------------------------------------------------------------
# Grouped validation fast paths: exactly the full checks' answers on what they accept.
# ---------------------------------------------------------------------------------------------
def _same_args(x, y):
    return len(x) == len(y) and all(
        (p is q) if isinstance(p, torch.Tensor) else (p == q) for p, q in zip(x, y))


def test_grouped_fast_paths_agree_with_full_checks():
    accepted = 0
    for groups, m, n, k in ((1, 128, 256, 384), (3, 256, 128, 128), (2, 384, 7168 // 28, 7168 // 14)):
        lhs, rhs, out, idx = contiguous_inputs(groups, m, n, k)
        fast = validation._contiguous_fast(lhs, rhs, out, idx)
        assert fast is not None and _same_args(fast, validation._contiguous_full(lhs, rhs, out, idx))
        accepted += 1
    for groups, max_m, n, k in ((1, 64, 256, 384), (3, 40, 256, 384), (4, 2, 128, 128), (2, 130, 256, 1024)):
        lhs, rhs, out, mm = masked_inputs(groups, max_m, n, k)
        fast = validation._masked_fast(lhs, rhs, out, mm, 7)
        assert fast is not None and _same_args(fast, validation._masked_full(lhs, rhs, out, mm, 7))
        accepted += 1
    assert accepted == 7


def test_grouped_fast_paths_defer_on_anything_unusual():
    lhs, rhs, out, idx = contiguous_inputs()
    (a, sa), (b, sb) = lhs, rhs
    for args in (
        ((a, sa.contiguous()), rhs, out, idx),          # row-major scales: rebuilt by the full check
        ([a, sa], rhs, out, idx),                       # a list
        ((a, sa[None]), rhs, out, idx),                 # wrong rank: must not raise here
        (lhs, rhs, out[None], idx),
        (lhs, rhs, out, idx[None]),
        ((a[:1], sa[:1]), rhs, out[:1], idx[:1]),       # M = 1
        (lhs, rhs, out, idx.long()),
    ):
        assert validation._contiguous_fast(*args) is None
    lhs, rhs, out, mm = masked_inputs()
    (a, sa), (b, sb) = lhs, rhs
    for args in (
        (lhs, rhs, out, mm, True),
        (lhs, rhs, out, mm, 0),
        ((a, sa[0]), rhs, out, mm, 4),
        ((a, sa), rhs, out[0], mm, 4),
        (lhs, (b, sb[0]), out, mm, 4),
        (lhs, rhs, out, mm[:2], 4),
        ((a, sa.contiguous()), rhs, out, mm, 4),
    ):
        assert validation._masked_fast(*args) is None


def test_dense_fast_path_names_a_bad_rank_scale():
    lhs, rhs, out = dense_inputs(m=64, n=256, k=256)
    (a, sa) = lhs
    for bad in (sa[None], sa[:, 0]):
        with pytest.raises(ValueError, match=r"lhs\[1\]"):
            validation.check_dense((a, bad), rhs, out)


def test_threads_share_the_cache_safely(fake, monkeypatch):
    """Several threads hitting, missing and evicting at once: every launch still carries the
    parameters of its own call."""
    import threading
    monkeypatch.setattr(gemm_ops, "_dense_launches", launch.LaunchCache(3))
    lhs, rhs, out = dense_inputs()
    outs = [torch.empty_like(out) for _ in range(6)]
    want = {o.data_ptr(): uncached_dense_params(lhs, rhs, o) for o in outs}
    errors = []

    def work(seed):
        try:
            for i in range(150):
                deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, outs[(seed + i * 7) % len(outs)])
        except Exception as exc:  # reported below: an exception in a thread would be lost
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(fake.launches) == 600 and len(gemm_ops._dense_launches) <= 3
    for *_, data in fake.launches:
        out_ptr = int.from_bytes(data[PARAM['out']:PARAM['out_ld_bytes']], "little")
        assert data == want[out_ptr]
