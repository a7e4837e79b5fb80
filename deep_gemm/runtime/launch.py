"""Ready-to-fire kernel launches, and the bounded cache that keeps them per call site.

Validating, planning, encoding tensor maps and packing parameters cost far more CPU time than the
launch itself, while serving engines repeat the very same call (same weights and, thanks to
torch's caching allocator, often the same buffers) hundreds of times per step. So the pipelines
key a LaunchCache on a call's data pointers and stream, guard each entry on the layout of the
call's tensors, and on a hit only check the guard and fire a PreparedLaunch.

A training step, or an eager serving loop whose allocator hands out other blocks, calls with tensors
at new addresses but layouts seen before. For those the cache also keeps one LaunchTemplate per
layout: the launch's parameter bytes with a list of where each tensor's address sits in them (a
pointer, or the address field of a tensor map: runtime/tma.py). Re-addressing a template is a few
8-byte writes and yields, byte for byte, the launch the long path would have built; a call on
tensors at new addresses is launched from the template's own buffer so re-addressed, and tensors
that come back get a PreparedLaunch of their own. Nothing here imports the CUDA bindings at import
time.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from math import gcd
from typing import Optional

import torch

from .. import utils as _utils
from ..config import GEMM_PARAMS, I32, MAP, PARAM_SIZE_ALIGN, PTR, param_layout
from .driver import check, driver, param_buffer
from .tma import MAP_BYTES, address_field

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
    less than cuLaunchKernelEx (instantiating it costs far more, once). A graph cannot be
    launched into a capturing stream, nor by two threads at once: then the kernel is launched.

    With set_pdl(True), a kernel whose module is PDL-ready is launched with a second config that
    carries the programmatic-stream-serialization attribute, never through the one-kernel graph (a
    graph launch would serialise after the previous kernel). The flag is read at every fire, so
    toggling it needs no new launch; a capture records the programmatic edge.

    `relocations` say which parameter bytes hold which of the call's tensors' addresses, as
    (byte offset, tensor number, delta, MAP or PTR): at that offset a tensor map or a pointer of
    that tensor's data pointer + delta. A launch that has them can become a LaunchTemplate.

    A template's own launch is `readdressed`: its parameter bytes change between fires. Its graph
    (built after TEMPLATE_GRAPH_AFTER fires) keeps the kernel node, and each graph fire first copies
    the current parameters into that node (cuGraphExecKernelNodeSetParams): the two driver calls
    cost the CPU less than one cuLaunchKernelEx. Launches already enqueued keep the parameters they
    were launched with.
    """

    __slots__ = ("kernel", "function", "grid", "num_threads", "smem_bytes", "stream", "offsets", "device_index",
                 "relocations", "_size", "_buffer", "address", "_config", "pdl_ready", "_pdl_config", "_launch",
                 "_graph", "_graph_fires", "_graph_lock", "_graph_launch", "_cu_stream", "readdressed", "_node")

    def __init__(self, kernel, grid: int, params: bytes, offsets, stream: int, device_index: int,
                 relocations: tuple = ()):
        # The parameters and the array of pointers to them, written once (struct.pack_into, several
        # times faster than a ctypes c_void_p array); the buffer lives as long as this object.
        buffer, address = param_buffer(params, offsets)
        # cuLaunchKernelEx with a launch config built once (grid, block, shared memory, stream,
        # clusters): one argument to convert per launch where cuLaunchKernel takes eleven, and the
        # config is only read, so threads may share it (the launches a template binds share their
        # template's).
        self._setup(kernel, grid, offsets, stream, device_index, relocations, len(params), buffer, address,
                    kernel.launch_config(grid, stream), None, driver().CUstream(stream))

    @classmethod
    def bound(cls, template: "LaunchTemplate", buffer, address: int) -> "PreparedLaunch":
        """The launch of a template's kernel, grid and stream over a parameter buffer laid out as
        param_buffer lays it out, sharing the template's launch configs and stream handle."""
        self = cls.__new__(cls)
        self._setup(template.kernel, template.grid, template.offsets, template.stream, template.device_index, (),
                    template.size, buffer, address, template.config, template.pdl_config, template.cu_stream)
        return self

    def _setup(self, kernel, grid, offsets, stream, device_index, relocations, size, buffer, address, config,
               pdl_config, cu_stream) -> None:
        self.kernel = kernel             # keeps the module (and so `function`) alive
        self.function = kernel.function
        self.grid = grid
        self.num_threads = kernel.num_threads
        self.smem_bytes = kernel.smem_bytes
        self.stream = stream
        self.offsets = offsets
        self.device_index = device_index
        self.relocations = relocations
        self._size, self._buffer, self.address = size, buffer, address
        self._config = config
        # The PDL config: built by the first fire with PDL on (most launches never need it).
        self.pdl_ready = kernel.pdl_ready
        self._pdl_config = pdl_config
        cu = driver()
        self._launch = cu.cuLaunchKernelEx
        self._graph_launch = cu.cuGraphLaunch
        self._cu_stream = cu_stream
        self._graph = None        # the graph exec, once built
        self._graph_fires = 0     # launches so far without a graph; -1: no graph will be built
        self._graph_lock = threading.Lock()
        self.readdressed = False
        self._node = None         # readdressed, once in a graph: (set_params, node, node params, graph)

    @property
    def params(self) -> bytes:
        """The parameter bytes (what the driver reads at `address`, through the pointer array)."""
        return self._buffer.raw[:self._size]

    def fire(self) -> None:
        """Launch on the stream this launch was prepared for (also what a CUDA graph capture
        records, when that stream is capturing)."""
        if _utils._pdl_enabled and self.pdl_ready:
            self._fire_pdl()
            return
        graph = self._graph
        # Stream 0 is the legacy default stream, on which no capture can run.
        if graph is not None and (self.stream == 0 or not _stream_capturing()) and self._graph_lock.acquire(False):
            try:
                node, err = self._node, 0
                if node is not None:   # readdressed: the node takes the parameters as they are now
                    err, = node[0](graph, node[1], node[2])
                if not err:
                    err, = self._graph_launch(graph, self._cu_stream)
            finally:
                self._graph_lock.release()
        else:
            err, = self._launch(self._config, self.function, self.address, 0)
            if not err and graph is None and self._graph_fires >= 0:
                self._graph_fires += 1
                # A launch seen twice is worth a graph; a template's own, once its layout is hot.
                if self._graph_fires >= (TEMPLATE_GRAPH_AFTER if self.readdressed else 2):
                    self._build_graph()
        if err:
            check((err,))

    def _fire_pdl(self) -> None:
        """The launch with the programmatic-stream-serialization attribute. Two threads may both
        build the config on a first fire: either result is right, and the config is only read."""
        config = self._pdl_config
        if config is None:
            config = self._pdl_config = self.kernel.launch_config(self.grid, self.stream, pdl=True)
        err, = self._launch(config, self.function, self.address, 0)
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
            stream = graph = graph_exec = None
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
                    graph_exec = check(cu.cuGraphInstantiate(graph, 0))
                    node = None
                    if self.readdressed:   # the node each fire updates, reading our pointer array
                        kernel_node = check(cu.cuGraphGetNodes(graph, 1))[0][0]
                        node_params = check(cu.cuGraphKernelNodeGetParams(kernel_node))
                        node_params.kernelParams = self.address
                        # The graph names the node to update: it lives as long as the exec.
                        node = (cu.cuGraphExecKernelNodeSetParams, kernel_node, node_params, graph)
                    self._graph, self._node = graph_exec, node
                    graph_exec = None
                    if node is not None:
                        graph = None
            except Exception:   # no graph: the direct launch stays correct
                pass
            finally:
                if self._graph is None:
                    _release_graph()
                if graph_exec is not None:
                    cu.cuGraphExecDestroy(graph_exec)
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
                node = getattr(self, "_node", None)
                if node is not None:
                    driver().cuGraphDestroy(node[3])
            except Exception:   # interpreter shutdown: the driver may be gone already
                pass


_put_u64 = struct.Struct("<Q").pack_into
# A template's own launch builds its graph, and the template its generated writer, once its layout
# has proven hot: a training step whose routing changes meets many layouts only a few times, and a
# graph's build (a capture on a new stream, an instantiation, device memory) or a writer's (Python
# code compiled) costs far more than the launches it saves on those.
TEMPLATE_GRAPH_AFTER = 16


class LaunchChain:
    """Prepared launches fired in turn on their one stream, as one launch: a K-grouped GEMM with its
    group sizes on the device is the kernel that writes its tensor maps, then the GEMM. Its template
    (ChainTemplate) is its launches' templates."""

    __slots__ = ("launches",)

    def __init__(self, *launches: PreparedLaunch):
        self.launches = launches

    def fire(self) -> None:
        for launch in self.launches:
            launch.fire()


class ChainTemplate:
    """A LaunchChain's launches as LaunchTemplates, bound and fired in turn for the same tensors."""

    __slots__ = ("templates",)

    def __init__(self, templates: tuple):
        self.templates = templates

    @classmethod
    def of(cls, chain: LaunchChain, pointers: tuple) -> Optional["ChainTemplate"]:
        templates = tuple(LaunchTemplate.of(launch, pointers) for launch in chain.launches)
        return None if None in templates else cls(templates)

    def bind(self, pointers: tuple) -> LaunchChain:
        return LaunchChain(*(template.bind(pointers) for template in self.templates))

    def fire(self, pointers: tuple) -> None:
        for template in self.templates:
            template.fire(pointers)


def template_of(launch, pointers: tuple):
    """The template of a launch (a PreparedLaunch or a LaunchChain) made for tensors at `pointers`, or None."""
    if isinstance(launch, LaunchChain):
        return ChainTemplate.of(launch, pointers)
    return LaunchTemplate.of(launch, pointers)


class LaunchTemplate:
    """A PreparedLaunch with its addresses left open: kernel, grid, stream and parameter bytes for
    every call on tensors of one layout, and `patches`, (byte offset, tensor number, delta, shift):
    where `(pointer of that tensor + delta) >> shift` goes, as 8 little-endian bytes.

    `bind` makes a launch of its own for some tensors (to be cached); `fire` launches for some
    tensors from the template's own parameter buffer, re-addressed in place: the driver copies the
    parameters when it launches, so the buffer is free again when the launch returns. One thread
    at a time fires it; another thread meanwhile binds a launch of its own."""

    __slots__ = ("kernel", "grid", "size", "offsets", "stream", "device_index", "patches", "config",
                 "pdl_config", "cu_stream", "_image", "_buffer_type", "_pointers", "_own", "_own_lock",
                 "_own_words", "_write_words", "_loop_fires")

    def __init__(self, launch: PreparedLaunch, patches: tuple):
        self.kernel, self.grid, self.offsets = launch.kernel, launch.grid, launch.offsets
        self.stream, self.device_index = launch.stream, launch.device_index
        self.size = launch._size   # of the parameters
        self.patches = patches
        self.config, self.pdl_config, self.cu_stream = launch._config, launch._pdl_config, launch._cu_stream
        # The parameter buffer as param_buffer lays it out, to be copied whole: the parameters, then
        # (8-byte aligned) the array of pointers to each, written per copy since it holds addresses.
        self._image = launch._buffer.raw
        self._buffer_type = type(launch._buffer)
        self._pointers = (launch.address - ctypes.addressof(launch._buffer), struct.Struct(f"<{len(self.offsets)}Q"))
        self._own = self._launch_over(self._buffer_type.from_buffer_copy(self._image))
        self._own.readdressed = True   # its parameters change from fire to fire
        # The own buffer as native 8-byte words (little-endian wherever CUDA runs), when every patch
        # starts on a word; the writer of the patches into such words comes once the template is hot
        # (generating it costs as much as tens of loop-patched fires: a training step with new routing
        # meets many layouts only once or twice). Until then, and without words, fires loop.
        self._own_words = self._write_words = None
        if all(offset % 8 == 0 for offset, *_ in patches) and len(self._image) % 8 == 0:
            self._own_words = _words(self._own._buffer)
        self._loop_fires = 0
        self._own_lock = threading.Lock()

    @classmethod
    def of(cls, launch: PreparedLaunch, pointers: tuple) -> Optional["LaunchTemplate"]:
        """The template of a launch made for tensors at `pointers`, or None: when the launch has no
        relocations, a pointer is not 16-byte aligned (the long path decides what such a call
        needs, and templates serve aligned calls only), or any relocation does not hold what it
        claims (a tensor map whose address runtime/tma.py cannot patch, a pointer of a copy)."""
        if not launch.relocations or gcd(*pointers) & 15:
            return None
        params, patches = launch.params, []
        for offset, source, delta, kind in launch.relocations:
            if source >= len(pointers):
                return None
            address = pointers[source] + delta
            if kind == MAP:
                field = address_field(params[offset:offset + MAP_BYTES], address)
                if field is None:
                    return None
                patches.append((offset + field[0], source, delta, field[1]))
            elif int.from_bytes(params[offset:offset + 8], "little") == address:
                patches.append((offset, source, delta, 0))
            else:
                return None
        return cls(launch, tuple(patches))

    def bind(self, pointers: tuple) -> PreparedLaunch:
        """The launch of this layout for tensors at `pointers` (the call's data pointers in the
        order the patches number them, each 16-byte aligned), byte for byte what preparing it from
        scratch gives."""
        buffer = self._buffer_type.from_buffer_copy(self._image)
        if self._write_words is None:
            self._patch(buffer, pointers)
        else:
            self._write_words(_words(buffer), pointers)
        return self._launch_over(buffer)

    def fire(self, pointers: tuple) -> None:
        """Launch this layout for tensors at `pointers` (16-byte aligned), keeping nothing for them."""
        if not self._own_lock.acquire(False):   # another thread is firing the template's launch
            self.bind(pointers).fire()
            return
        try:
            write = self._write_words   # (inline, not a method: a call less per call)
            if write is None:
                self._patch(self._own._buffer, pointers)
                self._count_loop_fire()
            else:
                write(self._own_words, pointers)
            self._own.fire()
        finally:
            self._own_lock.release()

    def _patch(self, buffer, pointers: tuple) -> None:
        for offset, source, delta, shift in self.patches:
            _put_u64(buffer, offset, (pointers[source] + delta) >> shift)

    def _count_loop_fire(self) -> None:
        """After TEMPLATE_GRAPH_AFTER loop-patched fires, the generated writer (with words to write)."""
        self._loop_fires += 1
        if self._loop_fires >= TEMPLATE_GRAPH_AFTER and self._own_words is not None:
            self._write_words = _word_writer(self.patches)

    def _launch_over(self, buffer) -> PreparedLaunch:
        """A launch over `buffer` (this template's image, patched or not), its pointer array written."""
        base = ctypes.addressof(buffer)
        at, pack = self._pointers
        pack.pack_into(buffer, at, *[base + offset for offset in self.offsets])
        return PreparedLaunch.bound(self, buffer, base + at)


def _words(buffer) -> memoryview:
    """A parameter buffer as native 8-byte words."""
    return memoryview(buffer).cast("B").cast("Q")


@functools.lru_cache(maxsize=256)   # a layout's template made again (evicted, or in another cache) reuses it
def _word_writer(patches: tuple):
    """write(words, pointers): each patch's value stored into its word of a parameter buffer viewed
    as 8-byte words, for pointers 16-byte aligned (templates serve no others).

    Generated as straight-line code, with each pointer read and shifted once: a K-grouped launch has
    22 patches (two tensor maps per group), and a loop over a table of them costs the per-call path
    almost twice as much. For a pointer whose low `shift` bits are zero (16-byte aligned, shift <= 4:
    runtime/tma.py's maps), (pointer + delta) >> shift equals (pointer >> shift) + (delta >> shift)."""
    def folds(shift):
        return 0 < shift <= 4
    sources = sorted({source for _, source, _, _ in patches})
    lines = [f"p{source} = pointers[{source}]" for source in sources]
    lines += [f"p{source}_{shift} = p{source} >> {shift}"
              for source, shift in sorted({(s, sh) for _, s, _, sh in patches if folds(sh)})]
    for offset, source, delta, shift in patches:
        if folds(shift):
            value = f"p{source}_{shift}" + (f" + {delta >> shift}" if delta >> shift else "")
        elif shift:
            value = f"(p{source} + {delta}) >> {shift}"
        else:
            value = f"p{source}" + (f" + {delta}" if delta else "")
        lines.append(f"words[{offset // 8}] = {value}")
    namespace: dict = {}
    exec("def write(words, pointers):\n    " + "\n    ".join(lines or ["pass"]) + "\n", namespace)
    return namespace["write"]


# ---------------------------------------------------------------------------------------------
# The GEMM kernel's parameter block, packed as config.GEMM_PARAMS describes it.
# ---------------------------------------------------------------------------------------------
def params_struct(params) -> tuple:
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


_GEMM_STRUCT, GEMM_PARAM_NAMES = params_struct(GEMM_PARAMS)
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
# guards: a fraction of the time that reading those fields from Python takes. Without
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


# The tensor types whose layout the caches trust their guards to describe (no subclass overrides).
PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_ptr = torch.Tensor.data_ptr
_device = torch.Tensor.get_device


class LaunchCache:
    """A bounded map from a call's key (data pointers, stream, set_num_sms value; set_pdl is read
    by each fire instead) to the launches made for it, each with a guard on the layout of the
    call's tensors (dtype, device, shape, strides): the same pointers may come back with another
    layout (a buffer viewed with another M), and each layout gets its own launch, up to
    MAX_LAYOUTS_PER_KEY of them.

    Beside it, a bounded map from a call's layout key (shapes, the stream and the same extra values:
    layout_key) to LaunchTemplates under the same kind of guard: a call on tensors at new
    addresses whose layout passed validation before is launched from that layout's template (every
    data pointer 16-byte aligned, as the template's were). Its key is remembered; seen a second
    time, its tensors get a launch of their own in the first map, so that buffers in rotation hit
    from their third call on while tensors used once (a training step's) leave nothing behind.

    Reads are dict reads of immutable tuples and their guards in order, with no lock. Inserts take
    a lock and replace the tuple: eviction, oldest key first, must not race with another thread's
    insert.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: dict = {}      # key -> ((guard, PreparedLaunch), ...)
        self._templates: dict = {}    # layout key -> ((guard, LaunchTemplate), ...)
        self._seen: dict = {}         # keys launched once from a template -> True
        self._lock = threading.Lock()
        self.get = self._entries.get

    def find(self, key, tensors):
        """The launch cached for `key` whose guard accepts `tensors`, or None."""
        for guard, launch in self._entries.get(key, ()):
            if guard(*tensors):
                return launch
        return None

    def try_fire(self, tensors: tuple, extra: tuple):
        """(fired, key) of a call on `tensors`: fire the launch cached for it, or else bind and fire
        the template of its layout, if any. The key holds the tensors' data pointers, the current
        stream of the first one's device and `extra` (what else the launch depends on, as values the
        caller trusts); it is None for a call that must take the long way (anything but plain CUDA
        tensors). The per-call path, in C-level steps where it can (a set test of the types, map
        over the pointers)."""
        if not PLAIN_TENSOR_TYPES.issuperset(map(type, tensors)):
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
        return self._fire_template(tensors, key), key

    def _fire_template(self, tensors: tuple, key: tuple) -> bool:
        """New addresses: the template of the call's layout fired for them; the second time, bound
        to them and cached under the call's key with the template's guard (it has just accepted
        these tensors)."""
        pointers = key[:len(tensors)]
        if gcd(*pointers) & 15:   # not all 16-byte aligned (one C call, where or-ing them takes several)
            return False
        layout = (tensors[0].shape, tensors[2].shape, *key[len(tensors):])   # layout_key(key, tensors), inline
        for guard, template in self._templates.get(layout, ()):
            if guard(*tensors):
                seen = self._seen
                before = len(seen)
                seen[key] = True   # (one hash of the key where a lookup, then an insert, would take two)
                if len(seen) == before:   # seen before
                    del seen[key]
                    launch = template.bind(pointers)
                    launch.fire()
                    self._insert(self._entries, key, (guard, launch))
                else:
                    template.fire(pointers)
                    if before >= self.capacity:   # forgetting costs a key one more template launch
                        seen.clear()
                return True
        return False

    def put(self, key, tensors, launch) -> None:
        """Cache a launch made (and validated) for `tensors` under their key, and the template of
        their layout when the launch can be one."""
        guard = layout_guard(tensors)
        self._insert(self._entries, key, (guard, launch))
        template = template_of(launch, key[:len(tensors)])
        if template is not None:
            self._insert(self._templates, layout_key(key, tensors), (guard, template))

    def _insert(self, table: dict, key, entry) -> None:
        with self._lock:
            old = table.get(key)
            if old is None:
                while len(table) >= self.capacity:
                    del table[next(iter(table))]   # the oldest key
                table[key] = (entry,)
            else:
                table[key] = (old + (entry,))[-MAX_LAYOUTS_PER_KEY:]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._templates.clear()
            self._seen.clear()

    def __len__(self) -> int:
        """Number of keys (pointer sets) cached."""
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries


def layout_key(key: tuple, tensors: tuple) -> tuple:
    """The templates' key of a call: its launch key with the data pointers replaced by the shapes
    of the first and third tensors (A and B of a GEMM, x and the scales of a cast), which fix every
    other shape of a call that passes validation; the guard checks the whole layout."""
    return (tensors[0].shape, tensors[2].shape, *key[len(tensors):])
