"""Ready-to-fire kernel launches and the bounded caches that keep them per call site.

Issuing a GEMM from Python costs far more CPU time than the driver call itself: validating
the arguments, planning the tiles, encoding four TMA descriptors and packing the kernel
parameters. Serving engines repeat the very same call (same weights, and thanks to torch's
caching allocator often the same activation and output buffers) hundreds of times per step,
so the public functions key a LaunchCache on the call's data pointers and stream, guard each
launch under a key on the layout of the call's tensors (dtype, device, shape, strides), and
on a hit only check that guard and launch with parameters packed long ago.

A PreparedLaunch owns its packed parameters (bytes that never change after construction),
so one entry may be fired from several threads at once: cuLaunchKernelEx copies the
parameters before it returns. From its second launch on it also holds the same launch as a
one-kernel CUDA graph, which the driver issues in about half the CPU time of the kernel
launch itself. Nothing here imports the CUDA bindings at import time.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading

import torch

from .driver import check, driver

# ---------------------------------------------------------------------------------------------
# The current stream, fast.
# ---------------------------------------------------------------------------------------------
# torch.cuda.current_stream(device) builds a torch.cuda.Stream object on every call (a few
# microseconds); the raw cudaStream_t is all the driver needs. _cuda_getCurrentRawStream is
# what torch's own generated code (inductor) uses for the same purpose.
_raw_stream_fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_raw_stream(device_index: int) -> int:
    """The current CUDA stream of a device as an integer handle (what cuLaunchKernel takes)."""
    if _raw_stream_fn is not None:
        return _raw_stream_fn(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


# ---------------------------------------------------------------------------------------------
# Launches.
# ---------------------------------------------------------------------------------------------
# Whether the current stream is capturing a CUDA graph (the C++ check behind
# torch.cuda.is_current_stream_capturing, without its Python wrapper).
_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing

# An instantiated graph holds ~117 KB of device memory (scripts/launch_probe.py, H100), so at most
# this many cached launches hold one at a time (~60 MB at the default 512, which covers every GEMM
# call site of a DeepSeek-V3-sized model); the others launch their kernel directly. A graph is
# freed with its cache entry. DG_LAUNCH_GRAPHS=0 turns launch graphs off.
def _launch_graphs_budget() -> int:
    value = os.environ.get("DG_LAUNCH_GRAPHS", "").strip()
    if not value:
        return 512
    try:
        budget = int(value)
    except ValueError:
        budget = -1
    if budget < 0:
        raise ValueError(f"DG_LAUNCH_GRAPHS must be a non-negative integer (0 turns launch graphs off), "
                         f"got {value!r}")
    return budget


MAX_LAUNCH_GRAPHS = _launch_graphs_budget()
_live_graphs = 0
_live_graphs_lock = threading.Lock()


def _reserve_graph() -> bool:
    global _live_graphs
    with _live_graphs_lock:
        if _live_graphs >= MAX_LAUNCH_GRAPHS:
            return False
        _live_graphs += 1
        return True


def _release_graph() -> None:
    global _live_graphs
    with _live_graphs_lock:
        _live_graphs -= 1


def live_graphs() -> int:
    """How many cached launches hold an instantiated graph (tests, diagnostics)."""
    return _live_graphs


class PreparedLaunch:
    """One kernel launch with every argument fixed, the stream included.

    `params` is the kernel's parameters laid out back to back; `offsets` says where each one
    starts (the driver reads an array of pointers to them and copies each parameter's size,
    known from the kernel image). The launch itself happens in fire(), on `stream`: the launch
    caches key on the stream (a split-K launch's workspace belongs to it), so an entry is only
    ever fired on the stream it was prepared for.

    A launch fired a second time is also captured into a one-kernel CUDA graph: cuGraphLaunch
    of that graph costs the CPU 1.6-2.5 µs where cuLaunchKernelEx costs 3.4-5.0 (scripts/
    launch_probe.py on three H100 machines), the driver having checked and packed everything at
    instantiation (19-26 µs, once; ~117 KB of device memory, within MAX_LAUNCH_GRAPHS). A graph
    cannot be launched into a stream that is itself capturing a graph (the driver refuses, and
    the capture is lost), so while the stream captures the kernel is launched as before, and so
    it is when another thread is launching the same graph (graph objects are not thread-safe).
    """

    __slots__ = ("kernel", "function", "grid", "num_threads", "smem_bytes", "stream", "params",
                 "device_index", "_buffer", "address", "_config", "_launch", "_graph", "_graph_fires",
                 "_graph_lock", "_graph_launch", "_cu_stream")

    def __init__(self, kernel, grid: int, params: bytes, offsets, stream: int, device_index: int):
        self.kernel = kernel             # keeps the module (and so `function`) alive
        self.function = kernel.function
        self.grid = grid
        self.num_threads = kernel.num_threads
        self.smem_bytes = kernel.smem_bytes
        self.stream = stream
        self.params = params
        self.device_index = device_index
        # One buffer holds the parameters and, after them (8-byte aligned), the array of
        # pointers to each one that the driver reads; the pointers are written with
        # struct.pack_into, several times faster than building a ctypes c_void_p array. The
        # buffer lives as long as this object, so the raw addresses stay valid.
        size = (len(params) + 7) // 8 * 8
        self._buffer = buffer = (ctypes.c_char * (size + 8 * len(offsets))).from_buffer_copy(
            params.ljust(size + 8 * len(offsets), b"\0"))
        base = ctypes.addressof(buffer)
        _pointer_struct(len(offsets)).pack_into(buffer, size, *[base + off for off in offsets])
        self.address = base + size
        # cuLaunchKernelEx with a launch config built once (grid, block, shared memory, stream,
        # clusters): 0.35 µs less per launch than cuLaunchKernel's eleven converted arguments
        # (scripts/launch_probe.py), and the config is only read, so threads may share it.
        self._config = kernel.launch_config(grid, stream)
        cu = driver()
        self._launch = cu.cuLaunchKernelEx
        self._graph_launch = cu.cuGraphLaunch
        self._cu_stream = cu.CUstream(stream)
        self._graph = None        # the graph exec, once built
        self._graph_fires = 0     # launches so far without a graph; -1: no graph will be built
        self._graph_lock = threading.Lock()

    def fire(self) -> None:
        """Launch on the stream this launch was prepared for (also what a CUDA graph capture
        records, when that stream is capturing)."""
        graph = self._graph
        # Stream 0 is the legacy default stream, on which no capture can run.
        if graph is not None and (self.stream == 0 or not _stream_capturing()) and self._graph_lock.acquire(False):
            try:
                err, = self._graph_launch(graph, self._cu_stream)
            finally:
                self._graph_lock.release()
        else:
            err, = self._launch(self._config, self.function, self.address, 0)
            if not err and graph is None and self._graph_fires >= 0:
                self._graph_fires += 1
                if self._graph_fires >= 2:   # a launch seen twice is worth a graph
                    self._build_graph()
        if err:
            check((err,))

    def _build_graph(self) -> None:
        """Capture this launch on a private stream into a graph and instantiate it; on any
        failure keep launching the kernel directly. Not while this thread's current stream
        captures (instantiating could invalidate the caller's capture): a later launch tries."""
        with self._graph_lock:
            if self._graph_fires < 0 or _stream_capturing():
                return
            self._graph_fires = -1   # one attempt only
            if not _reserve_graph():   # the budget is spent: this launch stays a kernel launch
                return
            cu = driver()
            stream = graph = None
            try:
                with torch.cuda.device(self.device_index):
                    stream = check(cu.cuStreamCreate(1))   # CU_STREAM_NON_BLOCKING
                    # Relaxed: capturing here restricts no other call of this or any thread.
                    check(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED))
                    try:
                        check(self._launch(self.kernel.launch_config(self.grid, stream), self.function,
                                           self.address, 0))
                    finally:
                        graph = check(cu.cuStreamEndCapture(stream))
                    self._graph = check(cu.cuGraphInstantiate(graph, 0))
            except Exception:   # no graph: the direct launch stays correct
                self._graph = None
            finally:
                if self._graph is None:
                    _release_graph()
                if graph is not None:
                    cu.cuGraphDestroy(graph)
                if stream is not None:
                    cu.cuStreamDestroy(stream)

    def __del__(self):
        graph = getattr(self, "_graph", None)
        if graph is not None:
            _release_graph()
            try:   # an exec still running is freed when it completes
                driver().cuGraphExecDestroy(graph)
            except Exception:   # interpreter shutdown: the driver may be gone already
                pass


_pointer_structs: dict = {}


def _pointer_struct(count: int) -> struct.Struct:
    """struct.Struct of `count` little-endian 64-bit pointers, built once per count."""
    packer = _pointer_structs.get(count)
    if packer is None:
        packer = _pointer_structs[count] = struct.Struct(f"<{count}Q")
    return packer


# ---------------------------------------------------------------------------------------------
# GEMM kernel parameters (kernels/gemm.cuh: deep_gemm_fp8_gemm), packed once per launch.
# ---------------------------------------------------------------------------------------------
# tma_a, tma_b, tma_sa, tma_out, tma_a_tail, tma_sa_tail: CUtensorMap (128 bytes each, passed
# by value); sa, sb, out: pointers; out row stride in bytes, shape_m, sa_rows, sa_ld, a_tail_rows:
# int32; group info, split-K workspace (partial tiles, tile counters): pointers.
GEMM_PARAM_OFFSETS = (0, 128, 256, 384, 512, 640, 768, 776, 784, 792, 796, 800, 804, 808, 816, 824, 832)
GEMM_PARAM_NAMES = ("tma_a", "tma_b", "tma_sa", "tma_out", "tma_a_tail", "tma_sa_tail", "sa", "sb", "out",
                    "out_ld_bytes", "shape_m", "sa_rows", "sa_ld", "a_tail_rows", "group_info", "workspace",
                    "tile_counters")
_GEMM_SCALARS = struct.Struct("<QQQiiiii4xQQQ")   # 4x: the next pointer's 8-byte alignment


def pack_gemm_params(maps, sa_ptr: int, sb_ptr: int, out_ptr: int, out_row_bytes: int, shape_m: int,
                     sa_rows: int, sa_ld: int, a_tail_rows: int, group_ptr: int, partials_ptr: int = 0,
                     counters_ptr: int = 0) -> bytes:
    """The GEMM kernel's parameters as one byte string laid out at GEMM_PARAM_OFFSETS.

    struct raises on an int32 overflow instead of silently wrapping the value.
    """
    if len(maps) != 6 or any(len(m) != 128 for m in maps):
        raise ValueError("pack_gemm_params needs six 128-byte tensor maps (A, B, A's scales, out, and A's and "
                         "its scales' for a partial last M block)")
    return b"".join(maps) + _GEMM_SCALARS.pack(sa_ptr, sb_ptr, out_ptr, out_row_bytes, shape_m, sa_rows, sa_ld,
                                               a_tail_rows, group_ptr, partials_ptr, counters_ptr)


# ---------------------------------------------------------------------------------------------
# Bounded caches.
# ---------------------------------------------------------------------------------------------
DEFAULT_CAPACITY = 4096
MAX_LAYOUTS_PER_KEY = 4

# TensorGuards is torch's own C++ check of many tensors at once (type, dtype, device, sizes,
# strides, requires_grad, dispatch keys; it keeps no reference to them), made for torch.compile's
# guards: 0.8 µs for five tensors where reading those fields from Python costs ~2.5 µs. Without
# it, the same fields are compared from Python.
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except Exception:  # pragma: no cover - torch builds without dynamo
    _TensorGuards = None


def _layout(tensors) -> tuple:
    return tuple((type(t), t.dtype, t.device, t.shape, t.stride(), t.requires_grad) for t in tensors)


def layout_guard(tensors):
    """A callable that is True for tensors with, position by position, the same type, dtype,
    device, shape, strides and requires_grad as `tensors` (TensorGuards checks even more)."""
    if _TensorGuards is not None:
        try:
            return _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
        except Exception:  # an API change in a later torch: the Python comparison below
            pass
    expected = _layout(tensors)
    return lambda *ts: _layout(ts) == expected


class LaunchCache:
    """A bounded map from a call's key (data pointers, stream, set_num_sms value) to the launches
    made for it, each with a guard on the layout of the call's tensors (dtype, device, shape,
    strides): the same pointers may come back with another layout (a buffer viewed with another
    M), and each layout gets its own launch, up to MAX_LAYOUTS_PER_KEY of them.

    `find` is a dict read of an immutable tuple and its guards in order, with no lock. Inserts
    take a lock and replace the tuple: they are rare (a miss already paid for validation and
    packing), and eviction, oldest key first, must not race with another thread's insert.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: dict = {}
        self._lock = threading.Lock()
        self.get = self._entries.get

    def find(self, key, tensors):
        """The launch cached for `key` whose guard accepts `tensors`, or None."""
        for guard, launch in self._entries.get(key, ()):
            if guard(*tensors):
                return launch
        return None

    def put(self, key, tensors, launch) -> None:
        entry = (layout_guard(tensors), launch)
        with self._lock:
            entries = self._entries
            old = entries.get(key)
            if old is None:
                while len(entries) >= self.capacity:
                    del entries[next(iter(entries))]   # the oldest key
                entries[key] = (entry,)
            else:
                entries[key] = (old + (entry,))[-MAX_LAYOUTS_PER_KEY:]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        """Number of keys (pointer sets) cached."""
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries
