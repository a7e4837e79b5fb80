"""Global workspaces of the GEMM launches, one per (device, stream), from the driver and never freed.

Split-K's: fp32 partial tiles and one arrival counter per tile. A split-K launch (kernels/gemm.cuh,
reduce_split_k) needs its counters zero when it starts and leaves them zero when it ends, so a workspace is zeroed once,
at allocation, then serves every launch and CUDA graph replay with no memset on the call path. One workspace per
(device, stream): concurrent split-K GEMMs must not share counters or partial tiles, and launches on one stream never
overlap. Buffers only grow (geometrically) and are never freed: an outgrown one may still be used by a cached launch or
a captured graph, on its own stream, where it stays correct.

The memory comes from the driver, not torch: a buffer from a CUDA-graph memory pool (where torch allocates during
capture and torch.compile's graph-tree warm-up) would outlive the graph, which graph trees reject as a leaked live
tensor. It is zeroed on a private stream and waited for, so it is zero before any launch, eager or captured, whatever
the caller's stream does; both steps are outside any capture, hence relaxed capture mode. Limitation: a graph replayed
on two streams at once, or two graphs captured on one stream and replayed concurrently, share a workspace."""
from __future__ import annotations

import threading

import torch

from .driver import check, driver

# Counters first (int32, zero bits read as 0), then the fp32 partial tiles, 256-byte aligned.
_COUNTER_ALIGN = 64

_workspaces: dict = {}   # (device, stream) -> (buffer, counter capacity, float capacity)
_outgrown: list = []     # kept alive on purpose, see above
_lock = threading.Lock()


class _Buffer:
    """`nbytes` of zeroed device memory at `ptr`, never freed; on CPU (host-path tests) a torch tensor stands in."""

    def __init__(self, device: torch.device, nbytes: int):
        if device.type != "cuda":
            self.tensor = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
            self.ptr = self.tensor.data_ptr()
            return
        cu = driver()
        with torch.cuda.device(device):
            relaxed = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
            previous = check(cu.cuThreadExchangeStreamCaptureMode(relaxed))
            try:
                self.ptr = int(check(cu.cuMemAlloc(nbytes)))
                zeroing = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
                try:
                    check(cu.cuMemsetD32Async(self.ptr, 0, nbytes // 4, zeroing))
                    check(cu.cuStreamSynchronize(zeroing))
                finally:
                    check(cu.cuStreamDestroy(zeroing))
            finally:
                check(cu.cuThreadExchangeStreamCaptureMode(previous))


def split_k_workspace(device: torch.device, stream: int, num_counters: int, num_floats: int):
    """(counters pointer, partials pointer) of the stream's workspace on `device`, holding at least `num_counters`
    int32 counters and `num_floats` fp32 partial values."""
    key = (device, stream)
    entry = _workspaces.get(key)
    if entry is None or entry[1] < num_counters or entry[2] < num_floats:
        with _lock:
            entry = _workspaces.get(key)
            if entry is None or entry[1] < num_counters or entry[2] < num_floats:
                old_counters, old_floats = (entry[1], entry[2]) if entry is not None else (0, 0)
                counters = -(-max(num_counters, 2 * old_counters) // _COUNTER_ALIGN) * _COUNTER_ALIGN
                floats = max(num_floats, 2 * old_floats)
                buffer = _Buffer(device, 4 * (counters + floats))
                if entry is not None:
                    _outgrown.append(entry[0])
                entry = _workspaces[key] = (buffer, counters, floats)
    buffer, counters, _ = entry
    return buffer.ptr, buffer.ptr + 4 * counters


_group_maps: dict = {}   # (device, stream) -> (buffer, bytes)


def group_maps_workspace(device: torch.device, stream: int, nbytes: int) -> int:
    """Device memory of the stream (256-byte aligned, at least `nbytes`) for the tensor maps and K
    blocks that a K-grouped GEMM with its sizes on the device reads: kernels/group_maps.cuh writes
    them just before the GEMM, on the same stream, after the previous grid has completed (its
    griddepcontrol.wait), so launches on one stream never see each other's. As split-K's, and with
    the same limitation."""
    key = (device, stream)
    entry = _group_maps.get(key)
    if entry is None or entry[1] < nbytes:
        with _lock:
            entry = _group_maps.get(key)
            if entry is None or entry[1] < nbytes:
                size = max(nbytes, 2 * entry[1] if entry is not None else 0)
                if entry is not None:
                    _outgrown.append(entry[0])
                entry = _group_maps[key] = (_Buffer(device, size), size)
    return entry[0].ptr
