"""TMA tensor maps (CUtensorMap) in an LRU cache keyed by everything they encode (address, dims, strides, box,
swizzle): encoding through cuda-bindings takes tens of microseconds, and serving reuses the same addresses."""
from __future__ import annotations

import ctypes
from functools import lru_cache

from .driver import check, driver

SWIZZLE_NONE, SWIZZLE_32B, SWIZZLE_64B, SWIZZLE_128B = 0, 32, 64, 128

# dtype -> CUtensorMapDataType name
_DTYPES = {"u8": "CU_TENSOR_MAP_DATA_TYPE_UINT8", "f32": "CU_TENSOR_MAP_DATA_TYPE_FLOAT32",
           "bf16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16"}
_ELEMENT_BYTES = {"u8": 1, "f32": 4, "bf16": 2}
_SWIZZLES = {SWIZZLE_NONE: "CU_TENSOR_MAP_SWIZZLE_NONE", SWIZZLE_32B: "CU_TENSOR_MAP_SWIZZLE_32B",
             SWIZZLE_64B: "CU_TENSOR_MAP_SWIZZLE_64B", SWIZZLE_128B: "CU_TENSOR_MAP_SWIZZLE_128B"}


@lru_cache(maxsize=4096)
def tensor_map(address: int, dtype: str, dims: tuple, strides_bytes: tuple, box: tuple, swizzle: int) -> bytes:
    """128 bytes of a CUtensorMap: dims innermost first, the byte strides of dims[1:], a box of box[i] elements along
    each. Out-of-bounds boxes read zeros and stores past the edges are dropped, which handles partial edge tiles."""
    cu = driver()
    tensor_map = check(cu.cuTensorMapEncodeTiled(
        getattr(cu.CUtensorMapDataType, _DTYPES[dtype]), len(dims), address, [cu.cuuint64_t(d) for d in dims],
        [cu.cuuint64_t(s) for s in strides_bytes], [cu.cuuint32_t(b) for b in box], [cu.cuuint32_t(1)] * len(dims),
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, getattr(cu.CUtensorMapSwizzle, _SWIZZLES[swizzle]),
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
    return ctypes.string_at(tensor_map.getPtr(), 128)


def tensor_map_2d(address: int, dtype: str, inner: int, outer: int, row_stride_bytes: int,
                  box_inner: int, box_outer: int, swizzle: int) -> bytes:
    """tensor_map over a row-major [outer][inner] view."""
    return tensor_map(address, dtype, (inner, outer), (row_stride_bytes,), (box_inner, box_outer), swizzle)


def element_bytes(dtype: str) -> int:
    return _ELEMENT_BYTES[dtype]
