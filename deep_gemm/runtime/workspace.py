"""Split-K's global workspace: fp32 partial tiles and one arrival counter per tile.

A split-K launch (kernels/gemm.cuh, reduce_split_k) needs its counters at zero when it starts and
leaves them at zero when it ends, so a workspace is zeroed once, when it is allocated, and then
serves launch after launch (and CUDA graph replay after replay) with no memset on the call path.

There is one workspace per (device, stream): two split-K GEMMs that run at the same time must not
share counters or partial tiles, and launches on one stream never overlap. Buffers only grow
(geometrically); an outgrown one is kept alive, because a cached launch or a captured CUDA graph
may still point at it (and may still use it, on its own stream, where it stays correct).
Limitations, and why the planner does not choose split-K yet (docs/perf-notes.md, section 12):
one captured graph replayed on two streams at once, or two graphs captured on one stream replayed
concurrently, would share a workspace; and a workspace first allocated inside torch.compile's
CUDA-graph trees comes from their memory pool, which they reject as an untracked live tensor
(allocating with the driver, outside torch's pools, is the next step).
"""
from __future__ import annotations

import threading

import torch

# Counters first (int32, zero bits read as 0), then the fp32 partial tiles, 256-byte aligned.
_COUNTER_ALIGN = 64

_workspaces: dict = {}   # (device, stream) -> (tensor, counter capacity, float capacity)
_outgrown: list = []     # kept alive on purpose, see above
_lock = threading.Lock()


def split_k_workspace(device: torch.device, stream: int, num_counters: int, num_floats: int):
    """(counters pointer, partials pointer) of the stream's workspace on `device`, grown to hold
    `num_counters` counters and `num_floats` partial values. Must run with `stream` current on
    the device (a new buffer is allocated and zeroed on it)."""
    key = (device, stream)
    entry = _workspaces.get(key)
    if entry is None or entry[1] < num_counters or entry[2] < num_floats:
        with _lock:
            entry = _workspaces.get(key)
            if entry is None or entry[1] < num_counters or entry[2] < num_floats:
                old_counters, old_floats = (entry[1], entry[2]) if entry is not None else (0, 0)
                counters = -(-max(num_counters, 2 * old_counters) // _COUNTER_ALIGN) * _COUNTER_ALIGN
                floats = max(num_floats, 2 * old_floats)
                tensor = torch.zeros(counters + floats, dtype=torch.float32, device=device)
                if entry is not None:
                    _outgrown.append(entry[0])
                entry = _workspaces[key] = (tensor, counters, floats)
    tensor, counters, _ = entry
    base = tensor.data_ptr()
    return base, base + 4 * counters
