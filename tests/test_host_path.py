"""CPU tests of the per-call host path: the plan cache, the parameter block, and the one launch
cache of the GEMM pipeline (deep_gemm.ops.gemm.run / ._launches) for every layout.

The GPU is faked: ops.gemm.runs_on_hopper says yes, the runtime kernels module (what
ops.gemm._runtime() hands back) compiles nothing and counts every prepare_gemm, ops.gemm's
check_gemm is wrapped to count validations, and the CUDA driver is replaced by a fake that records
every launch, reading the parameter block back through the pointer array exactly as
cuLaunchKernelEx would, and whose tensor maps are bytes derived from every argument of
cuTensorMapEncodeTiled (so a stale pointer, shape or stride shows up as different bytes). CPU
tensors stand in for GPU ones (the launch key reads them as device 0).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import itertools
import threading
import types

import pytest
import torch

import deep_gemm
from deep_gemm import plan, reference, utils
from deep_gemm.config import GEMM_PARAMS, I32, MAP, PTR, Layout, max_stages, param_layout
from deep_gemm.ops import gemm as gemm_ops
from deep_gemm.ops import pad as pad_ops
from deep_gemm.ops import validation
from deep_gemm.runtime import driver, kernels, launch, tma, workspace

FP8 = torch.float8_e4m3fn
DENSE, CONTIGUOUS, MASKED = Layout.DENSE, Layout.CONTIGUOUS, Layout.MASKED
PARAM, PARAM_SIZE = param_layout()            # byte offset by name, size of the GemmParams block
REAL_PREPARE = kernels.prepare_gemm
REAL_CHECK = validation.check_gemm


# ---------------------------------------------------------------------------------------------
# Plan cache.
# ---------------------------------------------------------------------------------------------
def _plan_args():
    ms = (0, 1, 63, 64, 65, 128, 129, 1000, 4096, 4097)
    nks = ((7168, 576), (2112, 7168), (24576, 1536), (4096, 7168), (100, 200), (1, 1))
    layouts = ((DENSE, 1), (CONTIGUOUS, 8), (MASKED, 32))
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
    assert (39 * 64, 4096, 7168, 132, int(DENSE), 1, False, False, False) in plan._plan_cache
    assert (64, 4096, 7168, 132, int(DENSE), 1, False, False, False) not in plan._plan_cache
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

    class CUlaunchAttribute:
        def __init__(self):
            self.id = None
            self.value = types.SimpleNamespace()

    def __init__(self):
        self.launches = []       # (grid, threads, smem, stream, parameter bytes)
        self.launch_attrs = []   # per cuLaunchKernelEx call: ((attribute id, its value), ...)
        self.pdl_ready = False   # whether loaded modules define the DG_PDL_READY symbol
        self.graph_launches = 0  # how many of them came from cuGraphLaunch
        self.node_updates = 0    # cuGraphExecKernelNodeSetParams calls
        self.encodes = 0
        self.loads = 0           # modules loaded
        self.prepares = 0        # kernels.prepare_gemm calls (counted by the fixture)
        self.validations = 0     # ops.gemm.check_gemm calls (counted by the fixture)
        self.pads = 0            # K-padding launches (ops.pad.pad_k16, faked by the fixture)
        self.padded = []         # the shapes each of them padded
        self.aliases = {}        # id(tensor) -> the data pointer the launch key reads for it
        self.encoded = {}        # tensor map bytes -> ("2d" or "nd", arguments of kernels.tensor_map[_2d])
        self.fail_instantiate = False
        self._keep = []
        self._capturing = {}     # private stream -> launches captured on it
        self._next_stream = 1000

    def counts(self):
        """(validations, prepares, launches) so far."""
        return self.validations, self.prepares, len(self.launches)

    def alias(self, t, like):
        """Make the launch key read `like`'s data pointer for t (a meta tensor has none): the
        same pointers on another device."""
        self.aliases[id(t)] = like.data_ptr()
        self._keep.append(t)
        return t

    def ptr(self, t):
        return self.aliases.get(id(t)) or t.data_ptr()

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
        return (999, None) if self.fail_instantiate else (0, ("exec", list(graph)))

    # A template's own launch updates its graph's node before each graph launch.
    def cuGraphGetNodes(self, graph, count):
        return 0, list(range(len(graph)))[:count], len(graph)

    def cuGraphKernelNodeGetParams(self, node):
        return 0, types.SimpleNamespace(kernelParams=None)

    def cuGraphExecKernelNodeSetParams(self, graph_exec, node, node_params):
        # The node takes the parameter bytes the pointer array points at now, as the driver copies them.
        pointer = ctypes.c_void_p.from_address(node_params.kernelParams).value
        grid, threads, smem, stream, _ = graph_exec[1][node]
        graph_exec[1][node] = (grid, threads, smem, stream, ctypes.string_at(pointer, PARAM_SIZE))
        self.node_updates += 1
        return (0,)

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
        self.loads += 1
        return 0, object()

    def cuModuleGetFunction(self, module, name):
        return 0, object()

    def cuFuncSetAttribute(self, *args):
        return (0,)

    def cuModuleGetGlobal(self, module, name):
        assert name == driver.PDL_READY_SYMBOL
        return (0, 1234, 4) if self.pdl_ready else (500, 0, 0)   # 500: CUDA_ERROR_NOT_FOUND

    def cuLaunchKernel(self, *args):
        raise AssertionError("GEMM launches go through cuLaunchKernelEx")

    def cuLaunchKernelEx(self, config, f, params, extra):
        # The GEMM kernel has one parameter, the GemmParams block: read it back through the
        # pointer array, as the driver does.
        pointer = ctypes.c_void_p.from_address(params).value
        data = ctypes.string_at(pointer, PARAM_SIZE)
        record = (config.gridDimX, config.blockDimX, config.sharedMemBytes, config.hStream, data)
        attrs = config.attrs[:config.numAttrs] if config.numAttrs else ()
        self.launch_attrs.append(tuple((a.id, a.value.programmaticStreamSerializationAllowed) for a in attrs))
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
    """Route the Hopper path of the GEMM pipeline onto FakeDriver with CPU tensors; fresh caches;
    prepare_gemm, check_gemm and K padding counted."""
    cu = FakeDriver()
    monkeypatch.setattr(driver, "_driver", cu)
    monkeypatch.setattr(gemm_ops, "runs_on_hopper", lambda device: True)
    assert gemm_ops._runtime() is kernels
    monkeypatch.setattr(kernels, "compile_kernel",
                        lambda source, kernel_name, **kw: types.SimpleNamespace(cubin=b"", symbol="_Z4fake"))
    monkeypatch.setattr(kernels, "device_arch", lambda device: "sm_90a")
    monkeypatch.setattr(kernels, "_loaded", {})

    def counted_prepare(*args, **kwargs):
        cu.prepares += 1
        return REAL_PREPARE(*args, **kwargs)

    def counted_check(*args, **kwargs):
        cu.validations += 1
        return REAL_CHECK(*args, **kwargs)

    def fake_pad(*xs):   # the padding kernel: one launch for both operands, F.pad's result
        cu.pads += 1
        cu.padded.append(tuple(tuple(x.shape) for x in xs))
        return tuple(gemm_ops.pad_k_to_16((x, None))[0] for x in xs)

    real_2d, real_nd = kernels.tensor_map_2d, kernels.tensor_map

    def recorded_2d(*args):   # address, dtype, inner, outer, row stride, box inner, box outer, swizzle
        descriptor = real_2d(*args)
        cu.encoded[descriptor] = ("2d", args)
        return descriptor

    def recorded_nd(*args):   # address, dtype, dims, strides, box, swizzle
        descriptor = real_nd(*args)
        cu.encoded[descriptor] = ("nd", args)
        return descriptor

    monkeypatch.setattr(kernels, "tensor_map_2d", recorded_2d)
    monkeypatch.setattr(kernels, "tensor_map", recorded_nd)
    monkeypatch.setattr(kernels, "prepare_gemm", counted_prepare)
    monkeypatch.setattr(gemm_ops, "check_gemm", counted_check)
    monkeypatch.setattr(pad_ops, "pad_k16", fake_pad)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch, "_stream_capturing", lambda: False)
    monkeypatch.setattr(utils, "device_sm_count", lambda index: 132)
    monkeypatch.setattr(utils, "_num_sms_override", None)
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 7)
    monkeypatch.setattr(launch, "_device", lambda t: 0)          # CPU tensors stand in for cuda:0
    monkeypatch.setattr(launch, "_ptr", cu.ptr)
    monkeypatch.setattr(gemm_ops, "_launches", launch.LaunchCache())
    monkeypatch.setattr(workspace, "_workspaces", {})
    monkeypatch.setattr(workspace, "_outgrown", [])
    tma.clear_caches()
    yield cu
    tma.clear_caches()


def dense_inputs(m=128, n=256, k=384):
    a, sa = reference.per_token_cast_to_fp8(torch.randn(m, k))
    b, sb = reference.per_block_cast_to_fp8(torch.randn(n, k))
    return (a, sa), (b, sb), torch.empty(m, n, dtype=torch.bfloat16)


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


def key_of(layout, lhs, rhs, out, index=None, expected_m=None):
    """(key, tensors) of a call, as ops.gemm.run builds them."""
    flat = (*lhs, *rhs, out) + ((index,) if index is not None else ())
    return launch.LaunchCache().try_fire(flat, gemm_ops.launch_key_extra(int(layout), expected_m))[1], flat


def dense_key(lhs, rhs, out):
    return key_of(DENSE, lhs, rhs, out)


def uncached_dense_params(lhs, rhs, out, num_sms=132):
    """The packed parameters of a dense launch built from scratch: no plan, tensor-map or launch
    cache involved."""
    tma.clear_caches()
    args = REAL_CHECK(DENSE, lhs, rhs, out)
    assert args.a is lhs[0] and args.sa is lhs[1] and args.out is out, "inputs must be kernel-ready"
    (a, sa), (b, sb) = lhs, rhs
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    config = plan.plan_dense(m, n, k, num_sms)
    prepared = REAL_PREPARE(config, a=a, a_rows=m, sa=sa, sa_rows=m, b=b, b_rows=n, sb=sb, out=out, out_rows=m,
                            shape_m=m, group_info=None, num_sms=num_sms)
    return prepared.params


def uncached_params(fake, fn, *call):
    """The parameters the pipeline launches for `call` with an empty launch cache (and no
    tensor map cached)."""
    saved = gemm_ops._launches
    gemm_ops._launches = launch.LaunchCache()
    tma.clear_caches()
    try:
        fn(*call)
    finally:
        gemm_ops._launches = saved
    return fake.launches[-1][4]


def field(params, name):
    kind = dict(GEMM_PARAMS)[name]
    return params[PARAM[name]:PARAM[name] + {MAP: 128, PTR: 8, I32: 4}[kind]]


def int_field(params, name):
    return int.from_bytes(field(params, name), "little", signed=dict(GEMM_PARAMS)[name] == I32)


def describe(fake, params, tensors):
    """The parameter block field by field, tensor maps decoded into the arguments they were
    encoded from, and each address named by the caller's tensor it belongs to ("#i" for
    tensors[i], "other" for a buffer the pipeline made: a padded, staged or regrouped copy,
    whose address changes from call to call)."""
    names = {}
    for i, t in enumerate(tensors):
        names.setdefault(t.data_ptr(), f"#{i}")

    def where(ptr):
        return names.get(ptr, "other") if ptr else 0
    fields = {}
    for name, kind in GEMM_PARAMS:
        if kind == MAP:
            raw = field(params, name)
            if raw == bytes(128):
                fields[name] = None
            else:
                how, args = fake.encoded[raw]
                fields[name] = (how, where(args[0])) + tuple(args[1:])
        elif kind == PTR and name not in ("workspace", "tile_counters"):
            fields[name] = where(int_field(params, name))
        else:
            fields[name] = int_field(params, name)
    return fields


# ---------------------------------------------------------------------------------------------
# Parameter packing.
# ---------------------------------------------------------------------------------------------
def test_param_layout_follows_cpp_struct_rules():
    """GemmParams laid out as C++ does: each field at the next multiple of its alignment (64 for
    CUtensorMap), the size a multiple of the largest alignment."""
    at, offsets = 0, {}
    for name, kind in GEMM_PARAMS:
        size, align = {MAP: (128, 64), PTR: (8, 8), I32: (4, 4)}[kind]
        at = (at + align - 1) // align * align
        offsets[name] = at
        at += size
    assert PARAM == offsets and PARAM_SIZE == (at + 63) // 64 * 64
    assert launch.GEMM_PARAM_NAMES == tuple(name for name, _ in GEMM_PARAMS)
    assert launch.GEMM_PARAM_OFFSETS == (0,)                       # one parameter: the whole block


def test_pack_gemm_params_places_every_field():
    values = {}
    for i, (name, kind) in enumerate(GEMM_PARAMS):
        values[name] = bytes([i + 1]) * 128 if kind == MAP else (0x1000 * (i + 1) if kind == PTR else -(i + 1))
    packed = launch.pack_gemm_params(**values)
    assert len(packed) == PARAM_SIZE
    covered = bytearray(PARAM_SIZE)
    for name, kind in GEMM_PARAMS:
        if kind == MAP:
            assert field(packed, name) == values[name], name
        else:
            assert int_field(packed, name) == values[name], name
        width = len(field(packed, name))
        covered[PARAM[name]:PARAM[name] + width] = b"\1" * width
    # Zero padding between fields and at the end.
    assert all(byte == 0 for byte, used in zip(packed, covered) if not used)
    with pytest.raises(Exception):          # int32 overflow is an error, never a silent wrap
        launch.pack_gemm_params(**{**values, "shape_m": 2 ** 31})
    with pytest.raises(ValueError, match="pack_gemm_params needs exactly"):
        launch.pack_gemm_params(**{k: v for k, v in values.items() if k != "workspace"})
    with pytest.raises(ValueError, match="pack_gemm_params needs exactly"):
        launch.pack_gemm_params(**values, extra=1)


# ---------------------------------------------------------------------------------------------
# Dense launch cache.
# ---------------------------------------------------------------------------------------------
def test_dense_hit_launches_the_uncached_parameters(fake, monkeypatch):
    lhs, rhs, out = dense_inputs()
    assert deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out) is out
    assert len(gemm_ops._launches) == 1 and fake.counts() == (1, 1, 1) and fake.loads == 1
    # A hit must not plan, validate, prepare, encode or load anything (so it is also safe while a
    # CUDA graph is being captured, where loading a module is not allowed).
    encodes = fake.encodes

    def boom(*args, **kwargs):
        raise AssertionError("the cache hit went the long way")
    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((gemm_ops, "check_gemm"), (gemm_ops, "plan_cached"), (gemm_ops, "pad_operands_k_to_16"),
                             (kernels, "gemm_kernel"), (kernels, "prepare_gemm"), (kernels, "load_once")):
            mp.setattr(module, name, boom)
        for _ in range(3):
            assert deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out) is out
    assert fake.encodes == encodes and fake.counts() == (1, 1, 4) and fake.loads == 1
    first = fake.launches[0]
    assert all(launch_ == first for launch_ in fake.launches)
    assert first[3] == 7                                   # the current stream
    assert first[4] == uncached_dense_params(lhs, rhs, out)


@pytest.mark.parametrize("m,n,k", [(200, 256, 384), (1, 7168, 2048), (77, 512, 384), (256, 256, 384),
                                   (4097, 7168, 2048), (8, 256, 7168), (13, 256, 7168), (64, 256, 7168)])
def test_partial_last_m_block_loads_through_short_boxes(fake, m, n, k):
    """A dense M whose last block is partial gets a second pair of maps for A and its scales,
    boxes of just the tail rows (rounded up to 8 with several K blocks a stage; 16-byte scale
    boxes); a whole last block gets none."""
    lhs, rhs, out = dense_inputs(m, n, k)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    params = fake.launches[-1][4]
    config = plan.plan_dense(m, n, k, 132)
    tail = m % config.block_m
    if config.stage_k_blocks > 1:
        tail = (tail + 7) // 8 * 8
    tail = tail if tail < config.block_m else 0
    assert tail == kernels.a_tail_rows(config, m)
    assert int_field(params, "a_tail_rows") == tail and int_field(params, "shape_m") == m

    def a_map(name):   # (address, box rows, everything else)
        how, args = fake.encoded[field(params, name)]
        if how == "2d":
            assert config.stage_k_blocks == 1
            return args[0], args[6], args[1:6] + args[7:]
        assert config.stage_k_blocks > 1 and args[2][2] == k // 128 and args[4][2] == config.stage_k_blocks
        return args[0], args[4][1], args[1:4] + (args[4][0], args[4][2], args[5])

    def sa_map(name):  # rows are the inner dimension of A's scales
        how, args = fake.encoded[field(params, name)]
        assert how == "2d" and args[6] == config.stage_k_blocks
        return args[0], args[5], args[1:5] + args[6:]
    a = a_map("tma_a")
    assert a[0] == lhs[0].data_ptr() and a[1] == config.block_m
    if config.scale_loader_warp:
        assert field(params, "tma_sa") == field(params, "tma_sa_tail") == bytes(128)
    else:
        sa = sa_map("tma_sa")
        assert sa[0] == lhs[1].data_ptr() and sa[1] == config.block_m
    if not tail:
        assert field(params, "tma_a_tail") == field(params, "tma_sa_tail") == bytes(128)
        return
    a_tail = a_map("tma_a_tail")
    assert a_tail[0] == a[0] and a_tail[2] == a[2] and a_tail[1] == tail     # same view, tail rows
    if not config.scale_loader_warp:
        sa_tail = sa_map("tma_sa_tail")
        assert sa_tail[0] == sa[0] and sa_tail[2] == sa[2] and sa_tail[1] == (tail + 3) // 4 * 4


def _forced_split_k(*args):
    # The planner does not choose split-K for this shape: force it.
    return dataclasses.replace(plan.plan_dense(*args), block_n=32, split_k=2, num_stages=max_stages(64, 32),
                               stage_k_blocks=1)


def _workspace(params):
    return field(params, "workspace") + field(params, "tile_counters")


def test_split_k_launches_are_keyed_on_the_stream(fake, monkeypatch):
    """A split-K launch carries its stream's workspace: the same call on another stream must
    not reuse it (two streams running at once would share tile counters)."""
    monkeypatch.setattr(gemm_ops, "plan_cached", _forced_split_k)
    lhs, rhs, out = dense_inputs(64, 2112, 7168)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    first = fake.launches[-1]
    workspace_first = _workspace(first[4])
    assert first[3] == 7 and workspace_first != bytes(16)
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 9)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._launches) == 2 and fake.counts()[:2] == (2, 2)
    assert fake.launches[-1][3] == 9 and _workspace(fake.launches[-1][4]) != workspace_first
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 7)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._launches) == 2 and fake.launches[-1] == first and fake.counts()[:2] == (2, 2)


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
    yield "m", ((a[:m - 8], sa_short), rhs, out[:m - 8]), (lhs, rhs, out)     # then the cached call
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
        before, (validations, prepares, _) = len(gemm_ops._launches), fake.counts()
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
        assert len(gemm_ops._launches) == before + 1, f"{name}: a new pointer must miss"
        assert fake.counts()[:2] == (validations + 1, prepares + 1), name
        assert fake.launches[-1][4] == uncached_dense_params(*call), name
    for name, first, second in _same_ptr_variants(lhs, rhs, out):
        validations = fake.validations
        deep_gemm.gemm_fp8_fp8_bf16_nt(*first)
        assert fake.validations == validations + 1, name
        deep_gemm.gemm_fp8_fp8_bf16_nt(*second)
        cached = all(x is y for x, y in zip(second, (lhs, rhs, out)))
        assert fake.validations == validations + (1 if cached else 2), name
        assert fake.launches[-2][4] == uncached_dense_params(*first), name
        assert fake.launches[-1][4] == uncached_dense_params(*second), name
        assert fake.launches[-1][4] != fake.launches[-2][4], name


def test_dense_layouts_at_one_address_each_get_a_launch(fake):
    """A buffer viewed with different M (or strides) at the same address: one key, one guarded
    launch per layout, each hit launching its own parameters without validating again; more
    layouts than MAX_LAYOUTS_PER_KEY evict the oldest, which is then rebuilt, still right."""
    lhs, rhs, out = dense_inputs(m=128)
    a, sa = lhs
    calls = []
    for m in (128, 96, 64, 32, 16, 8):
        sa_m = sa.as_strided((m, sa.shape[1]), (1, m)) if m < 128 else sa
        calls.append(((a[:m], sa_m), rhs, out[:m]))
    for call in calls[:2] * 3:
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
        assert fake.launches[-1][4] == uncached_dense_params(*call)
    assert fake.counts() == (2, 2, 6) and len(gemm_ops._launches) == 1    # two layouts, one key
    for call in calls:                                                   # six layouts: the first two go
        deep_gemm.gemm_fp8_fp8_bf16_nt(*call)
    assert fake.validations == 6
    key = dense_key(*calls[0])[0]
    assert len(gemm_ops._launches.get(key)) == launch.MAX_LAYOUTS_PER_KEY
    assert gemm_ops._launches.find(key, dense_key(*calls[0])[1]) is None
    assert gemm_ops._launches.find(key, dense_key(*calls[-1])[1]) is not None
    deep_gemm.gemm_fp8_fp8_bf16_nt(*calls[0])
    assert fake.validations == 7
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


def test_dense_cache_still_validates_dtype_and_num_sms(fake):
    lhs, rhs, out = dense_inputs()
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    a, sa = lhs
    # Same pointers, shapes and strides, wrong dtype: still rejected, naming the argument.
    with pytest.raises(TypeError, match=r"lhs\[0\]"):
        deep_gemm.gemm_fp8_fp8_bf16_nt((a.view(torch.uint8), sa), rhs, out)
    with pytest.raises(TypeError, match="out"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out.view(torch.float16))
    with pytest.raises(TypeError, match="pair"):
        deep_gemm.gemm_fp8_fp8_bf16_nt([a], rhs, out)
    assert fake.counts() == (4, 1, 1)
    # set_num_sms() changes the plan and the grid: a new entry, planned with the new count.
    deep_gemm.set_num_sms(7)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._launches) == 2 and fake.counts() == (5, 2, 2)
    assert fake.launches[-1][0] <= 7
    assert fake.launches[-1][4] == uncached_dense_params(lhs, rhs, out, num_sms=7)


def test_dense_inputs_rebuilt_by_validation_are_not_cached(fake):
    lhs, rhs, out = dense_inputs(m=64, n=256, k=256)
    a, sa = lhs
    row_major = sa.contiguous()                    # validation transposes it: a new tensor each call
    odd_k = dense_inputs(m=64, n=256, k=200)       # K % 16 != 0: A and B are padded each call
    odd_n = dense_inputs(m=64, n=100, k=256)       # N % 8 != 0: out=None gets padded rows
    wide = torch.empty(64, 260, dtype=torch.bfloat16)
    for _ in range(2):
        deep_gemm.gemm_fp8_fp8_bf16_nt((a, row_major), rhs, out)
        deep_gemm.gemm_fp8_fp8_bf16_nt(*odd_k)
        assert deep_gemm.gemm_fp8_fp8_bf16_nt(*odd_n[:2]).shape == (64, 100)
        staged = wide[:, :256]                     # 520-byte rows: written through an aligned buffer
        assert deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, staged) is staged
    assert len(gemm_ops._launches) == 0 and fake.counts() == (8, 8, 8)
    assert fake.pads == 2                          # one padding launch per odd-K call, both operands
    # M = 0 validates but launches nothing.
    empty = dense_inputs(m=0)
    deep_gemm.gemm_fp8_fp8_bf16_nt(*empty)
    assert fake.counts() == (9, 8, 8) and len(gemm_ops._launches) == 0


def test_pad_path_pads_both_operands_in_one_launch(fake):
    """K % 16 != 0: both operands padded by one (fake) launch of the padding kernel, then the
    GEMM runs on K rounded up to 16 with the caller's scales; nothing is cached."""
    (a, sa), (b, sb), out = dense_inputs(m=64, n=256, k=200)
    assert deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out) is out
    assert fake.pads == 1 and fake.counts() == (1, 1, 1) and len(gemm_ops._launches) == 0
    assert fake.padded == [((64, 200), (256, 200))]
    params = fake.launches[-1][4]
    maps = describe(fake, params, (a, sa, b, sb, out))
    # A and B are read from the padded copies, rows of K = 208 bytes: args (dtype, inner, outer, row bytes).
    assert maps["tma_a"][1:6] == ("other", "u8", 208, 64, 208) and maps["tma_b"][1:6] == ("other", "u8", 208, 256, 208)
    assert int_field(params, "sa") == sa.data_ptr()
    assert int_field(params, "out") == out.data_ptr()
    # Operands whose K differ are not padded: validation names the mismatch.
    _, (b208, sb208), _ = dense_inputs(m=64, n=256, k=208)
    with pytest.raises(ValueError, match=r"rhs\[0\].*K = 200"):
        deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b208, sb208), out)
    assert fake.pads == 1
    # Padding again on the next call (a padded copy is never cached).
    deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb), out)
    assert fake.pads == 2 and len(gemm_ops._launches) == 0
    assert describe(fake, fake.launches[-1][4], (a, sa, b, sb, out)) == \
        describe(fake, fake.launches[0][4], (a, sa, b, sb, out))


def test_dense_subclass_weights_use_the_cache(fake):
    lhs, rhs, out = dense_inputs()
    weights = (torch.nn.Parameter(rhs[0], requires_grad=False), torch.nn.Parameter(rhs[1], requires_grad=False))
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, weights, out)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, weights, out)
    assert len(gemm_ops._launches) == 1 and fake.counts() == (1, 1, 2)
    assert fake.launches[1][4] == fake.launches[0][4] == uncached_dense_params(lhs, rhs, out)


def test_launch_cache_is_bounded(fake, monkeypatch):
    cache = launch.LaunchCache(4)
    monkeypatch.setattr(gemm_ops, "_launches", cache)
    lhs, rhs, out = dense_inputs()
    outs = [torch.empty_like(out) for _ in range(10)]
    for o in outs:
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, o)
        assert len(cache) <= 4
    assert len(cache) == 4
    assert dense_key(lhs, rhs, outs[-1])[0] in cache   # newest kept
    assert dense_key(lhs, rhs, outs[0])[0] not in cache  # oldest evicted
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, outs[0])             # evicted: rebuilt, still right
    assert fake.validations == 11
    assert fake.launches[-1][4] == uncached_dense_params(lhs, rhs, outs[0])
    with pytest.raises(ValueError):
        launch.LaunchCache(0)
    with pytest.raises(TypeError):
        launch.LaunchCache(2.5)
    with pytest.raises(TypeError):
        launch.LaunchCache(True)


def test_failed_launch_raises_and_is_not_cached(fake, monkeypatch):
    lhs, rhs, out = dense_inputs()
    monkeypatch.setattr(fake, "cuLaunchKernelEx", lambda *args: (700,))
    with pytest.raises(driver.CudaError):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._launches) == 0


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
    assert fake.counts()[:2] == (1, 1)


def test_a_graph_that_cannot_be_built_leaves_kernel_launches(fake):
    lhs, rhs, out = dense_inputs()
    fake.fail_instantiate = True
    for _ in range(4):
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 4 and fake.graph_launches == 0
    assert all(record == fake.launches[0] for record in fake.launches)


def test_launch_graphs_stay_within_their_device_memory_budget(fake, monkeypatch):
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
    gemm_ops._launches.clear()                 # evicted entries give their graphs back
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
    prepared = gemm_ops._launches.find(*dense_key(lhs, rhs, out))
    with prepared._graph_lock:        # as if another thread were inside cuGraphLaunch
        deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(fake.launches) == 4 and fake.graph_launches == 1 and fake.launches[-1] == fake.launches[0]


# ---------------------------------------------------------------------------------------------
# Grouped layouts share the one launch cache.
# ---------------------------------------------------------------------------------------------
def test_contiguous_cache(fake, monkeypatch):
    lhs, rhs, out, idx = contiguous_inputs()
    fn = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
    assert fn(lhs, rhs, out, idx) is out
    assert fn(lhs, rhs, out, idx) is out
    assert len(gemm_ops._launches) == 1 and fake.launches[0] == fake.launches[1] and fake.counts() == (1, 1, 2)
    assert int_field(fake.launches[0][4], "group_info") == idx.data_ptr()
    # A new m_indices buffer (or any other pointer) is a new launch.
    fn(lhs, rhs, out, idx.clone())
    assert len(gemm_ops._launches) == 2 and fake.launches[2][4] != fake.launches[0][4]
    # check_indices=True always runs the host check and the long way, cached entry or not.
    seen = []
    monkeypatch.setattr(gemm_ops, "check_m_indices", lambda t, g: seen.append((t, g)))
    before = fake.counts()
    fn(lhs, rhs, out, idx, check_indices=True)
    assert seen == [(idx, 3)] and fake.launches[-1] == fake.launches[0]
    assert fake.counts() == (before[0] + 1, before[1] + 1, before[2] + 1)
    # Wrong dtype over the cached pointers is still an error.
    with pytest.raises(TypeError, match="m_indices"):
        fn(lhs, rhs, out, idx.view(torch.float32))
    # Unevenly spaced groups of B are copied per call: never cached.
    b, sb = rhs
    spaced = torch.empty(3, 256 + 16, 384, dtype=torch.uint8).view(FP8)[:, :256]
    spaced.view(torch.uint8).copy_(b.view(torch.uint8))
    before = len(gemm_ops._launches)
    validations = fake.validations
    fn(lhs, (spaced, sb), out, idx)
    fn(lhs, (spaced, sb), out, idx)
    assert len(gemm_ops._launches) == before and fake.validations == validations + 2
    tensors = (*lhs, spaced, sb, out, idx)
    got = describe(fake, fake.launches[-1][4], tensors)
    assert got == describe(fake, fake.launches[-2][4], tensors)
    assert got["tma_b"][1] == "other" and got["out"] == "#4" and got["group_info"] == "#5"


def test_contiguous_and_dense_calls_on_the_same_pointers_do_not_share_launches(fake):
    """One cache for every layout: the layout is part of the key."""
    lhs, rhs, out, idx = contiguous_inputs(groups=1, m=128)
    b, sb = rhs
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, idx)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, (b[0], sb[0]), out)    # b[0] starts where b does
    assert len(gemm_ops._launches) == 2 and fake.counts()[:2] == (2, 2)
    assert fake.launches[0][4] != fake.launches[1][4]


def test_masked_cache(fake):
    lhs, rhs, out, mm = masked_inputs()
    fn = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked
    assert fn(lhs, rhs, out, mm, 32) is out
    assert fn(lhs, rhs, out, mm, 32) is out
    assert len(gemm_ops._launches) == 1 and fake.launches[0] == fake.launches[1] and fake.counts() == (1, 1, 2)
    # expected_m is part of the plan, so of the key.
    fn(lhs, rhs, out, mm, 1)
    assert len(gemm_ops._launches) == 2 and fake.counts() == (2, 2, 3)
    # A bool or float equal to a cached expected_m must not hit: validation rejects them.
    fn(lhs, rhs, out, mm, 1)
    assert fake.counts() == (2, 2, 4)
    with pytest.raises(TypeError, match="expected_m"):
        fn(lhs, rhs, out, mm, True)
    with pytest.raises(TypeError, match="expected_m"):
        fn(lhs, rhs, out, mm, 32.0)
    assert fake.counts() == (4, 2, 4)
    # New masked_m pointer: a new launch whose group-info parameter is that pointer.
    mm2 = mm.clone()
    fn(lhs, rhs, out, mm2, 32)
    assert len(gemm_ops._launches) == 3
    assert int_field(fake.launches[-1][4], "group_info") == mm2.data_ptr()


# ---------------------------------------------------------------------------------------------
# The cheap path: taken when it should be, never when it must not.
# ---------------------------------------------------------------------------------------------
FUNCTIONS = {DENSE: deep_gemm.gemm_fp8_fp8_bf16_nt,
             CONTIGUOUS: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
             MASKED: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked}
EXPECTED_M = 32


def _roomy(t):
    """t's values in a tensor with t's shape and strides whose storage has room for twice its
    extent (so a view with doubled strides stays inside it), starting 16-byte aligned."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    raw = torch.zeros((2 * extent + 16) * t.element_size(), dtype=torch.uint8)
    view = raw.view(t.dtype).as_strided(t.shape, t.stride())
    view.copy_(t)
    return view


def _flat_inputs(layout):
    """[a, sa, b, sb, out(, index)] of a valid call of `layout`, each in roomy storage."""
    if layout == DENSE:
        (a, sa), (b, sb), out = dense_inputs()
        flat = [a, sa, b, sb, out]
    elif layout == CONTIGUOUS:
        (a, sa), (b, sb), out, idx = contiguous_inputs()
        flat = [a, sa, b, sb, out, idx]
    else:
        (a, sa), (b, sb), out, mm = masked_inputs(max_m=192)   # expected_m 32 and 128 plan differently
        flat = [a, sa, b, sb, out, mm]
    return [_roomy(t) for t in flat]


def _call(layout, flat, expected_m=EXPECTED_M):
    a, sa, b, sb, out, *index = flat
    call = ((a, sa), (b, sb), out, *index)
    return call + (expected_m,) if layout == MASKED else call


_SAME_SIZE_DTYPE = {FP8: torch.uint8, torch.float32: torch.int32, torch.bfloat16: torch.float16,
                    torch.int32: torch.float32}


def _variants(fake, t):
    """(what, tensor) pairs: t's data pointer with another dtype, type, shape, strides or device."""
    yield "dtype", t.view(_SAME_SIZE_DTYPE[t.dtype])
    yield "type", torch.nn.Parameter(t, requires_grad=False)
    if t.shape[0] > 1:
        yield "shape", t.narrow(0, 0, t.shape[0] - 1)
    strides = list(t.stride())
    strides[0] *= 2
    yield "stride", t.as_strided(t.shape, strides)
    yield "device", fake.alias(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"), t)


NAMES = ("lhs[0]", "lhs[1]", "rhs[0]", "rhs[1]", "out", "index")


@pytest.mark.parametrize("layout", list(FUNCTIONS), ids=lambda layout: layout.name.lower())
def test_a_cached_launch_is_never_used_for_tensors_of_another_layout(fake, layout):
    """What the per-layout fast validators guaranteed ("never accept what the full check
    rejects"), now a property of the launch cache: a call whose tensors have the cached
    pointers but another dtype, type, shape, strides or device goes the long way and is
    validated: it raises exactly what check_gemm raises on it, or launches exactly what an
    empty cache would have launched."""
    fn = FUNCTIONS[layout]
    flat = _flat_inputs(layout)
    fn(*_call(layout, flat))
    fn(*_call(layout, flat))
    assert fake.counts() == (1, 1, 2) and len(gemm_ops._launches) == 1
    rejected = accepted = 0
    for i, t in enumerate(flat):
        for what, variant in _variants(fake, t):
            call = _call(layout, flat[:i] + [variant] + flat[i + 1:])
            assert key_of(layout, *call)[0] == key_of(layout, *_call(layout, flat))[0], \
                (NAMES[i], what, "the variant must collide with the cached key")
            try:
                REAL_CHECK(layout, *call)
            except (TypeError, ValueError) as e:
                expected = e
            else:
                expected = None
            validations, prepares, launches = fake.counts()
            if expected is not None:
                with pytest.raises(type(expected)) as info:
                    fn(*call)
                assert str(info.value) == str(expected), (NAMES[i], what)
                assert fake.counts() == (validations + 1, prepares, launches), (NAMES[i], what)
                rejected += 1
            else:
                fn(*call)
                assert fake.counts() == (validations + 1, prepares + 1, launches + 1), (NAMES[i], what)
                tensors = flat[:i] + [variant] + flat[i + 1:]
                assert describe(fake, fake.launches[-1][4], tensors) == \
                    describe(fake, uncached_params(fake, fn, *call), tensors), (NAMES[i], what)
                accepted += 1
            # The original call still launches its own parameters (hit, or rebuilt if the
            # accepted variants pushed its launch out of the key's MAX_LAYOUTS_PER_KEY).
            fn(*_call(layout, flat))
            assert fake.launches[-1][4] == fake.launches[0][4], (NAMES[i], what)
    assert rejected >= 3 * len(flat) and accepted >= len(flat)


@pytest.mark.parametrize("layout", list(FUNCTIONS), ids=lambda layout: layout.name.lower())
def test_cheap_path_hits_and_misses(fake, monkeypatch, layout):
    fn = FUNCTIONS[layout]
    flat = _flat_inputs(layout)
    a, sa, b, sb, out, *index = flat

    def run(call, hit):
        """Run `call`; check it took the cheap path (hit) or the long, validated one."""
        validations, prepares, launches = fake.counts()
        result = fn(*call)
        assert result is call[2]
        if hit:
            assert fake.counts() == (validations, prepares, launches + 1), "expected a hit"
        else:
            assert fake.counts() == (validations + 1, prepares + 1, launches + 1), "expected a miss"
        return fake.launches[-1]     # (grid, threads, shared memory, stream, parameters)

    first = run(_call(layout, flat), hit=False)
    # Same tensors, and fresh views with the same layout: hits with the same parameters.
    assert run(_call(layout, flat), hit=True) == first
    assert run(_call(layout, [t.view(t.shape) for t in flat]), hit=True) == first
    # A stride change at the same address (rows of A further apart): miss, validated, right.
    wide = a.as_strided(a.shape, (2 * a.stride(0),) + a.stride()[1:])
    call = _call(layout, [wide] + flat[1:])
    got = run(call, hit=False)[4]
    assert got != first[4]
    assert describe(fake, got, [wide] + flat[1:]) == describe(fake, uncached_params(fake, fn, *call), [wide] + flat[1:])
    # A shape change at the same addresses (one row fewer): miss.
    if layout == MASKED:
        fewer = [a[:, :-1], sa[:, :-1], b, sb, out[:, :-1]] + index
    else:
        fewer = [a[:-1], sa[:-1], b, sb, out[:-1]] + [i[:-1] for i in index]
    if layout == CONTIGUOUS:
        fewer[1] = deep_gemm.get_col_major_tma_aligned_tensor(sa[:-1].contiguous())   # TMA-aligned again
    call = _call(layout, fewer)
    got = run(call, hit=False)[4]
    assert got != first[4]
    assert describe(fake, got, fewer) == describe(fake, uncached_params(fake, fn, *call), fewer)
    # A dtype or device change at the same addresses: miss, and validation names the argument.
    validations = fake.validations
    with pytest.raises(TypeError, match=r"^out must be torch.bfloat16"):
        fn(*_call(layout, flat[:4] + [out.view(torch.float16)] + index))
    meta_b = fake.alias(torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="meta"), b)
    with pytest.raises(ValueError, match=r"^rhs\[0\] is on meta"):
        fn(*_call(layout, flat[:2] + [meta_b] + flat[3:]))
    assert fake.validations == validations + 2
    # Another stream: miss (a launch fires on its own stream), then both hit.
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 9)
    on_9 = run(_call(layout, flat), hit=False)
    assert on_9[3] == 9
    assert run(_call(layout, flat), hit=True) == on_9
    monkeypatch.setattr(launch, "_raw_stream_fn", lambda index: 7)
    assert run(_call(layout, flat), hit=True) == first
    # set_num_sms: miss, planned for the new count; the old count's launch is still there.
    deep_gemm.set_num_sms(2)
    assert run(_call(layout, flat), hit=False)[0] <= 2 < first[0]
    run(_call(layout, flat), hit=True)
    monkeypatch.setattr(utils, "_num_sms_override", None)
    assert run(_call(layout, flat), hit=True) == first
    if layout == MASKED:
        # Another expected_m: another plan, so a miss; each hint then hits its own launch.
        other = run(_call(layout, flat, expected_m=EXPECTED_M * 4), hit=False)
        assert other[1] != first[1]          # 128-row blocks: two math warpgroups, not one
        assert run(_call(layout, flat, expected_m=EXPECTED_M * 4), hit=True) == other
        assert run(_call(layout, flat), hit=True) == first


def test_launch_cache_key(fake):
    lhs, rhs, out = dense_inputs()
    flat = (*lhs, *rhs, out)
    key = launch.LaunchCache().try_fire(flat, (0, None, 5))[1]
    assert key == tuple(t.data_ptr() for t in flat) + (7, 0, None, 5)
    # Anything but plain tensors: the long way.
    for bad in ((*lhs, *rhs, None), (*lhs, *rhs, out.tolist()), (*lhs, rhs, out)):
        assert launch.LaunchCache().try_fire(bad, (0,)) == (False, None), bad


def test_run_keys_only_pairs_and_int_hints(fake):
    """ops.gemm.run takes the cached path only for (tensor, scales) tuples and an int or no hint:
    a list pair, a bool or float hint goes the long way (and is validated)."""
    np = pytest.importorskip("numpy")
    lhs, rhs, out, masked_m = masked_inputs()
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, EXPECTED_M)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, EXPECTED_M)
    before = fake.counts()
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, EXPECTED_M)
    assert fake.counts()[0] == before[0]                       # a hit: no validation
    for hint in (True, float(EXPECTED_M), np.int64(EXPECTED_M)):
        with pytest.raises(TypeError, match="expected_m"):
            deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, hint)
    before = fake.counts()
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(list(lhs), rhs, out, masked_m, EXPECTED_M)
    assert fake.counts()[0] == before[0] + 1                   # validated (and then launched)


def test_cpu_tensors_are_never_keyed_or_cached():
    """Without the fake: CPU tensors take the reference path, and no launch is ever cached."""
    lhs, rhs, out = dense_inputs()
    assert launch.LaunchCache().try_fire((*lhs, *rhs, out), (0, None, None)) == (False, None)
    before = len(gemm_ops._launches)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    assert len(gemm_ops._launches) == before


def test_threads_share_the_cache_safely(fake, monkeypatch):
    """Several threads hitting, missing and evicting at once: every launch still carries the
    parameters of its own call."""
    monkeypatch.setattr(gemm_ops, "_launches", launch.LaunchCache(3))
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
    assert len(fake.launches) == 600 and len(gemm_ops._launches) <= 3
    for *_, data in fake.launches:
        assert data == want[int_field(data, "out")]


def test_out_of_range_masked_m_is_clamped_on_the_cpu_as_on_the_gpu():
    """masked_m[g] outside [0, max_m]: the public call computes min(max(masked_m[g], 0), max_m)
    rows of group g on the reference path, as the kernel's scheduler does on the GPU
    (kernels/scheduler.cuh, masked_m_blocks): none for a negative count, all for one past max_m."""
    (a, sa), (b, sb), out, _ = masked_inputs(groups=3, max_m=64)
    out.fill_(float("nan"))
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, torch.tensor([-5, 200, 30],
                                                    dtype=torch.int32), 32)
    want = torch.full_like(out, float("nan"))
    reference.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), want, torch.tensor([0, 64, 30],
                                                    dtype=torch.int32))
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    assert out[0].isnan().all() and not out[1].isnan().any()


@pytest.mark.gpu
def test_out_of_range_masked_m_gives_the_same_rows_on_the_gpu():
    """The same call on a Hopper GPU writes the same rows as on the CPU, with the same values."""
    (a, sa), (b, sb), out, _ = masked_inputs(groups=3, max_m=64)
    masked_m = torch.tensor([-5, 200, 30], dtype=torch.int32)
    out.fill_(float("nan"))
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked_m, 32)
    gpu = out.cuda().fill_(float("nan"))
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a.cuda(), sa.cuda()), (b.cuda(), sb.cuda()), gpu,
                                                    masked_m.cuda(), 32)
    gpu = gpu.cpu()
    assert torch.equal(gpu.isnan(), out.isnan())
    assert reference.calc_diff(gpu.nan_to_num(), out.nan_to_num()) < 1e-5


def test_bf16_k_grouped_launch_relocates_each_groups_maps_of_a_and_b(fake):
    """prepare_gemm of the BF16 K-grouped kernel (the call's tensors a, b, d): each group with K has
    maps of its rows of a [sum K, M] and b [sum K, N] (MN-major boxes of 64 columns by a K block),
    relocated to tensors 0 and 1 with the byte offset of its first row; d's map to tensor 2."""
    from deep_gemm.plan import plan_bf16
    ks, m, n = (128, 0, 64), 64, 136
    a = torch.zeros(sum(ks), m, dtype=torch.bfloat16)
    b = torch.zeros(sum(ks), n + 8, dtype=torch.bfloat16)[:, :n]   # rows of b padded: its own stride
    d = torch.zeros(len(ks), m, n)
    config = plan_bf16(m, n, 0, 132, layout=Layout.K_GROUPED, num_groups=len(ks))
    prepared = kernels.prepare_gemm(config, a=a, a_rows=a.shape[0], sa=None, sa_rows=0, b=b, b_rows=b.shape[0],
                                    sb=None, out=d, out_rows=m, shape_m=m, group_info=None, num_sms=132, k_sizes=ks)
    grouped = [(source, delta) for at, source, delta, kind in prepared.relocations if at >= prepared.offsets[1]]
    assert grouped == [(0, 0), (1, 0), (0, 128 * m * 2), (1, 128 * (n + 8) * 2)]
    assert {source for _, source, _, _ in prepared.relocations} == {0, 1, 2}
    maps = [args for kind, args in fake.encoded.values() if kind == "2d" and args[1] == "bf16"]
    assert (b.data_ptr() + 128 * (n + 8) * 2, "bf16", n, 64, (n + 8) * 2, 64, 64) == maps[-1][:7]
