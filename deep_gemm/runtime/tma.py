"""TMA tensor maps (CUtensorMap): encoded once per shape, then re-addressed by patching bytes.

Encoding through cuda-bindings costs microseconds per map, and a call on new tensors of a layout seen
before needs maps that differ from earlier ones in their global address only. So the first map of each
shape (dtype, dims, strides, box, swizzle) is checked: one more encode at another address must differ
from it only in one 8-byte field holding each map's `address >> shift` (little-endian), which is to say
that patching that field gives exactly what the driver encodes. Maps of a checked shape are then made by
patching, and runtime/launch.LaunchTemplate patches them in place inside a parameter block
(address_field says where). CUtensorMap is opaque, so nothing is assumed: a driver whose maps fail the
check (or that refuses the probe address) gets a real encode for every map, as before.
cuTensorMapReplaceAddress would also be safe, but through cuda-bindings it needs a CUtensorMap object
around the bytes, copied in and out, and costs about ten times a patch.
"""
from __future__ import annotations

import ctypes
import threading
from functools import lru_cache
from typing import Optional

from .driver import CudaError, check, driver

SWIZZLE_NONE, SWIZZLE_32B, SWIZZLE_64B, SWIZZLE_128B = 0, 32, 64, 128
MAP_BYTES = 128

# dtype -> CUtensorMapDataType name
_DTYPES = {"u8": "CU_TENSOR_MAP_DATA_TYPE_UINT8", "f32": "CU_TENSOR_MAP_DATA_TYPE_FLOAT32",
           "bf16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16"}
_SWIZZLES = {SWIZZLE_NONE: "CU_TENSOR_MAP_SWIZZLE_NONE", SWIZZLE_32B: "CU_TENSOR_MAP_SWIZZLE_32B",
             SWIZZLE_64B: "CU_TENSOR_MAP_SWIZZLE_64B", SWIZZLE_128B: "CU_TENSOR_MAP_SWIZZLE_128B"}

# The probe flips every address bit from 4 (16-byte alignment) to 39, and stays inside the same 1 TB
# of the address space.
_PROBE_FLIP = 0xFF_FFFF_FFF0
MAX_SHAPES = 4096

_lock = threading.Lock()
_shapes: dict = {}        # (dtype, dims, strides, box, swizzle) -> (a map of that shape, its address) or None
_field = None             # (byte offset, shift) of the address in every patchable map of this process
_patchable: set = set()   # maps of patchable shapes with their address field zeroed


def encode(address: int, dtype: str, dims: tuple, strides_bytes: tuple, box: tuple, swizzle: int) -> bytes:
    """128 bytes of a CUtensorMap from the driver: dims innermost first, the byte strides of dims[1:], a box of
    box[i] elements along each. Out-of-bounds boxes read zeros and stores past the edges are dropped, which
    handles partial edge tiles."""
    cu = driver()
    tensor_map = check(cu.cuTensorMapEncodeTiled(
        getattr(cu.CUtensorMapDataType, _DTYPES[dtype]), len(dims), address, [cu.cuuint64_t(d) for d in dims],
        [cu.cuuint64_t(s) for s in strides_bytes], [cu.cuuint32_t(b) for b in box], [cu.cuuint32_t(1)] * len(dims),
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, getattr(cu.CUtensorMapSwizzle, _SWIZZLES[swizzle]),
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
    return ctypes.string_at(tensor_map.getPtr(), MAP_BYTES)


def tensor_map(address: int, dtype: str, dims: tuple, strides_bytes: tuple, box: tuple, swizzle: int) -> bytes:
    """The map `encode` gives for these arguments: patched from the first map of its shape when that shape
    passed the check, else encoded (memoised per address)."""
    shape = (dtype, dims, strides_bytes, box, swizzle)
    known = _shapes.get(shape, shape)
    if known is None:
        return _encoded(address, *shape)
    if known is not shape:
        return patch(known[0], address)
    encoded = encode(address, *shape)
    _remember(shape, encoded, address)
    return encoded


@lru_cache(maxsize=4096)
def _encoded(address: int, *shape) -> bytes:
    return encode(address, *shape)


def tensor_map_2d(address: int, dtype: str, inner: int, outer: int, row_stride_bytes: int,
                  box_inner: int, box_outer: int, swizzle: int) -> bytes:
    """tensor_map over a row-major [outer][inner] view."""
    return tensor_map(address, dtype, (inner, outer), (row_stride_bytes,), (box_inner, box_outer), swizzle)


# ---- patching ------------------------------------------------------------------------------------
def patch(map_bytes: bytes, address: int) -> bytes:
    """map_bytes (of a patchable shape) re-addressed to `address`."""
    offset, shift = _field
    return map_bytes[:offset] + (address >> shift).to_bytes(8, "little") + map_bytes[offset + 8:]


def address_field(map_bytes: bytes, address: int) -> Optional[tuple]:
    """(byte offset, shift) such that writing `address' >> shift` as 8 little-endian bytes at that offset of
    map_bytes gives the map of address' — when map_bytes is a map of a checked shape for `address`; else None."""
    field = _field
    if field is None:
        return None
    offset, shift = field
    if int.from_bytes(map_bytes[offset:offset + 8], "little") != address >> shift:
        return None
    return field if _canonical(map_bytes, offset) in _patchable else None


def _canonical(map_bytes: bytes, offset: int) -> bytes:
    return map_bytes[:offset] + bytes(8) + map_bytes[offset + 8:]


def _remember(shape: tuple, encoded: bytes, address: int) -> None:
    """Check a new shape (one probe encode) and record whether its maps may be patched."""
    field = _check_field(shape, encoded, address)
    global _field
    with _lock:
        if field is not None and _field not in (None, field):   # one field per process, or none
            field = None
        if field is not None:
            _field = field
            _patchable.add(_canonical(encoded, field[0]))
        while len(_shapes) >= MAX_SHAPES:   # the oldest shape goes, with its patchable form
            old = _shapes.pop(next(iter(_shapes)))
            if old is not None:
                _patchable.discard(_canonical(old[0], _field[0]))
        _shapes[shape] = (encoded, address) if field is not None else None


def _check_field(shape: tuple, encoded: bytes, address: int) -> Optional[tuple]:
    """(offset, shift) when the map of `shape` at a probe address differs from `encoded` (the map at
    `address`) only in 8 bytes at `offset`, which hold each map's address >> shift; else None."""
    maps = {address: encoded}
    try:
        maps[address ^ _PROBE_FLIP] = encode(address ^ _PROBE_FLIP, *shape)
    except CudaError:   # the driver refuses an address it does not know: no patching for this shape
        return None
    differ = [i for i in range(MAP_BYTES) if len({m[i] for m in maps.values()}) > 1]
    if not differ:
        return None
    for offset in range(max(0, differ[-1] - 7), min(differ[0], MAP_BYTES - 8) + 1):
        for shift in range(5):   # addresses are 16-byte aligned: at most 4 low bits to drop
            if all(int.from_bytes(m[offset:offset + 8], "little") == a >> shift for a, m in maps.items()):
                return offset, shift
    return None


def patching() -> str:
    """What this process does for a map at a new address of a known shape (diagnostics, benchmarks)."""
    if _field is not None:
        return f"patched (the address >> {_field[1]} at byte {_field[0]}, checked per shape)"
    if any(known is None for known in _shapes.values()):
        return "encoded (this driver's maps failed the patch check)"
    return "not decided yet (no map encoded)"


def clear_caches() -> None:
    """Forget every shape's check and memoised map (tests switch fake drivers)."""
    global _field
    with _lock:
        _shapes.clear()
        _patchable.clear()
        _field = None
    _encoded.cache_clear()
