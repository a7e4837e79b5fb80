"""Ready-to-fire kernel launches, and the bounded cache that keeps them per call site.

Validating, planning, encoding tensor maps and packing parameters cost far more CPU time than the
launch itself, while serving engines repeat the very same call (same weights and, thanks to
torch's caching allocator, often the same buffers) hundreds of times per step. So the pipelines
key a LaunchCache on a call's data pointers and stream, guard each entry on the layout of the
call's tensors, and on a hit only check the guard and fire a PreparedLaunch. Nothing here imports
the CUDA bindings at import time.
"""
from __future__ import annotations

import os
import struct
import threading

import torch

from ..config import GEMM_PARAMS, I32, MAP, PARAM_SIZE_ALIGN, PTR, param_layout
from .driver import check, driver, param_buffer

# torch.cuda.current_stream(device) builds a Stream object per call (a few microseconds); the raw
# handle, as torch's own generated code reads it, is all the driver needs.
_raw_stream_fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_raw_stream(device_index: int) -> int:
    """The current CUDA stream of a device as an integer handle (what cuLaunchKernel takes)."""
    if _raw_stream_fn is not None:
        return _raw_stream_fn(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


# Whether the current stream is capturing a CUDA graph (the C++ check, without its Python wrapper).
_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing

# An instantiated graph holds ~117 KB of device memory, so at most DG_LAUNCH_GRAPHS cached launches
# (default 512: every call site of a DeepSeek-V3-sized model) hold one; the others launch the kernel.
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
    """One kernel launch with every argument fixed, the stream included (a split-K launch's
    workspace belongs to its stream), so an entry is only fired on the stream it was made for.

    `params` holds the kernel's parameters back to back, `offsets` where each starts; they never
    change, so threads may fire one entry at once (the driver copies the parameters). A launch
    fired a second time is also captured into a one-kernel CUDA graph, whose launch costs the CPU
    about half of cuLaunchKernelEx's (instantiating it costs ~25 µs once). A graph cannot be
    launched into a capturing stream, nor by two threads at once: then the kernel is launched.
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
        # The parameters and the array of pointers to them, written once (struct.pack_into, several
        # times faster than a ctypes c_void_p array); the buffer lives as long as this object.
        self._buffer, self.address = param_buffer(params, offsets)
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


# ---------------------------------------------------------------------------------------------
# The GEMM kernel's parameter block, packed as config.GEMM_PARAMS describes it.
# ---------------------------------------------------------------------------------------------
def _params_struct(params) -> tuple:
    """(struct.Struct, field names) packing a parameter block at param_layout's offsets."""
    offsets, size = param_layout(params)
    codes = {MAP: "128s", PTR: "Q", I32: "i"}
    fmt, end = "<", 0
    for name, kind in params:
        fmt += f"{offsets[name] - end}x" if offsets[name] > end else ""
        fmt += codes[kind]
        end = offsets[name] + PARAM_SIZE_ALIGN[kind][0]
    fmt += f"{size - end}x" if size > end else ""
    return struct.Struct(fmt), tuple(name for name, _ in params)


_GEMM_STRUCT, GEMM_PARAM_NAMES = _params_struct(GEMM_PARAMS)
GEMM_PARAM_OFFSETS = (0,)   # one parameter: the whole block


def pack_gemm_params(**values) -> bytes:
    """The GEMM kernel's parameter block from one value per field of config.GEMM_PARAMS (tensor
    maps as 128 bytes, pointers and int32 as ints). struct raises on an int32 overflow instead of
    silently wrapping the value."""
    if set(values) != set(GEMM_PARAM_NAMES):
        raise ValueError(f"pack_gemm_params needs exactly {GEMM_PARAM_NAMES}, got {tuple(sorted(values))}")
    return _GEMM_STRUCT.pack(*(values[name] for name in GEMM_PARAM_NAMES))


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


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_ptr = torch.Tensor.data_ptr
_device = torch.Tensor.get_device


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

    def try_fire(self, tensors: tuple, extra: tuple):
        """(fired, key) of a call on `tensors`: fire the launch cached for it, if any. The key holds
        the tensors' data pointers, the current stream of the first one's device and `extra` (what
        else the launch depends on, as values the caller trusts); it is None for a call that must
        take the long way (anything but plain CUDA tensors). The whole per-call path, in C-level
        steps where it can (a set test of the types, map over the pointers)."""
        if not _PLAIN.issuperset(map(type, tensors)):
            return False, None
        try:
            index = _device(tensors[0])
            if index < 0:   # a CPU tensor: the reference path, nothing to cache
                return False, None
            key = (*map(_ptr, tensors), _raw_stream_fn(index) if _raw_stream_fn else current_raw_stream(index), *extra)
        except Exception:  # exotic tensors whose pointers cannot be read: the long way
            return False, None
        for guard, launch in self._entries.get(key, ()):
            if guard(*tensors):
                launch.fire()
                return True, key
        return False, key

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
