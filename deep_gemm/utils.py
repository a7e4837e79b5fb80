"""Small public helpers: alignment arithmetic, the scale layout the kernels read, SM count, PDL.

Cheap and safe without a GPU. Imports nothing of the package.
"""
from __future__ import annotations

from typing import Optional

import torch

_INT_ONLY = frozenset((int,))


def ints_only(values) -> bool:
    """Whether a list or tuple holds Python ints and nothing else. Caches keyed on such values use it:
    a bool or a numpy int equals an int and hashes alike, but validation refuses it, so it must never
    find an int's cache entry."""
    return type(values) in (list, tuple) and _INT_ONLY.issuperset(map(type, values))


# TMA requires every global stride (and the base address) to be a multiple of 16 bytes.
TMA_ALIGNMENT_BYTES = 16
# What get_num_sms() answers when no CUDA device can be asked (H100 SXM / H800 / H200).
DEFAULT_NUM_SMS = 132


def ceil_div(a: int, b: int) -> int:
    """Smallest integer >= a / b for non-negative ints (b > 0)."""
    return (a + b - 1) // b


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """Round x elements up so that x * element_size is a multiple of 16 bytes."""
    if element_size <= 0 or TMA_ALIGNMENT_BYTES % element_size:
        raise ValueError(f"element_size must divide {TMA_ALIGNMENT_BYTES} bytes, got {element_size}")
    step = TMA_ALIGNMENT_BYTES // element_size
    return (x + step - 1) // step * step


def is_col_major_tma_aligned(x: torch.Tensor) -> bool:
    """True when scales x ([M, KB] or [G, M, KB]) already sit in the layout the kernel reads:
    element (g, m, kb) at offset g * aligned_M * KB + kb * aligned_M + m. Strides of dimensions of
    size <= 1 never address memory, so they are not compared."""
    shape = x.shape
    if x.numel() == 0:
        return True
    stride = x.stride()
    m, kb = shape[-2], shape[-1]
    aligned_m = get_tma_aligned_size(m, 4)
    if m > 1 and stride[-2] != 1:
        return False
    if kb > 1 and stride[-1] != aligned_m:
        return False
    if len(shape) == 3 and shape[0] > 1 and stride[0] != aligned_m * kb:
        return False
    return True


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """The float32 scales x ([M, KB] or [G, M, KB]) in the column-major, TMA-aligned layout.

    The kernel loads one K block's scales for BLOCK_M consecutive rows with one TMA copy, so rows
    are adjacent (stride 1) and each K-block column starts on a 16-byte boundary (column stride =
    M rounded up to 4 floats). Returns x itself when it is laid out so already; otherwise a new
    tensor with the same values (its padding rows uninitialised: nothing reads them).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 scales, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D [M, KB] or 3-D [G, M, KB], got shape {tuple(x.shape)}")
    if is_col_major_tma_aligned(x):
        return x
    m, kb = x.shape[-2], x.shape[-1]
    aligned_m = get_tma_aligned_size(m, 4)
    # The whole padded [KB, aligned_M] block is allocated, so that the storage holds every
    # 16-byte aligned column; then viewed as [M, KB].
    if x.dim() == 2:
        out = torch.empty((kb, aligned_m), dtype=x.dtype, device=x.device).t()[:m]
    else:
        out = torch.empty((x.shape[0], kb, aligned_m), dtype=x.dtype, device=x.device).transpose(1, 2)[:, :m]
    out.copy_(x)
    return out


# ---- the number of SMs the persistent kernels spread over ---------------------------------------
_num_sms_override: Optional[int] = None
_device_sms: dict = {}   # device index -> multiprocessor count (queried once)


def device_sm_count(index: int) -> int:
    """Multiprocessor count of CUDA device `index`, queried once per device."""
    count = _device_sms.get(index)
    if count is None:
        count = _device_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def sms_for(device_index: int, key: Optional[tuple]) -> int:
    """SMs a launch on device `device_index` plans for: set_num_sms()'s value as the call's launch
    key captured it (its last item; the value now for a call without a key), else the device's count."""
    override = _num_sms_override if key is None else key[-1]
    return override if override is not None else device_sm_count(device_index)


def num_sms_override() -> Optional[int]:
    """set_num_sms()'s value, or None."""
    return _num_sms_override


def set_num_sms(num_sms: int) -> None:
    """Limit the persistent kernels to num_sms SMs (e.g. to leave SMs to communication kernels), as
    DeepGEMM 2.x does: 1 up to the current device's SM count, or 0 for all of them again (the
    default). Takes effect from the next call (the launch cache keys on this value)."""
    global _num_sms_override
    if isinstance(num_sms, bool) or not isinstance(num_sms, int):
        raise TypeError(f"num_sms must be an int, got {type(num_sms).__name__}")
    limit = device_sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else DEFAULT_NUM_SMS
    if not 0 <= num_sms <= limit:
        raise ValueError(f"num_sms must be in 0..{limit} (0: all of the device's {limit} SMs), got {num_sms}")
    _num_sms_override = num_sms or None


def get_num_sms() -> int:
    """SMs the kernels use: set_num_sms()'s value, else the current device's count (132 without CUDA)."""
    if _num_sms_override is not None:
        return _num_sms_override
    return device_sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else DEFAULT_NUM_SMS


# ---- programmatic dependent launch (PDL) ----------------------------------------------------------
# Read by runtime/launch.py on every launch (a module attribute, so toggling needs no cache flush).
_pdl_enabled = False


def set_pdl(enabled: bool) -> None:
    """Launch the kernels with programmatic dependent launch (DeepGEMM 2.x's name; off by default).

    With it, each launch carries CUDA's programmatic-stream-serialization attribute, so a kernel
    may start while the previous kernel of its stream finishes: its prologue (barrier set-up,
    descriptor prefetch, and the launch itself) overlaps that kernel's tail, and it waits on the
    device (griddepcontrol.wait) before its first global memory access. Only kernels built to wait
    so get the attribute; the others launch as before. Results are the same either way; what it
    saves is the gap between dependent kernels, which shows on chains of short GEMMs (`python -m
    deep_gemm bench --suite chain`). CUDA graphs captured while it is on keep the programmatic edges.
    """
    global _pdl_enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _pdl_enabled = enabled


def get_pdl() -> bool:
    """Whether set_pdl(True) is in effect."""
    return _pdl_enabled
