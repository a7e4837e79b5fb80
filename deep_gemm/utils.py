"""Small public helpers: alignment arithmetic, scale layouts, SM count, FP8 casts.

Everything here is cheap and safe to call on a machine without a GPU.
"""
from __future__ import annotations

import torch

from .ops import library as _library
from .plan import M_ALIGNMENT_CONTIGUOUS

_is_compiling = _library.is_compiling

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


def get_m_alignment_for_contiguous_layout() -> int:
    """Rows of one group's block in the contiguous grouped layout (pad each group to this)."""
    return M_ALIGNMENT_CONTIGUOUS


def is_col_major_tma_aligned(x: torch.Tensor) -> bool:
    """True when scales x ([M, KB] or [G, M, KB]) already sit in the layout the kernel reads:
    element (g, m, kb) at offset g * aligned_M * KB + kb * aligned_M + m.

    Strides of dimensions of size <= 1 never address memory, so they are not compared
    (torch gives such dimensions arbitrary strides, e.g. a [M, 1] tensor has strides (1, 1)).
    """
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
    """Return the float32 scales x ([M, KB] or [G, M, KB]) in the column-major, TMA-aligned layout.

    The kernel loads one K-block's scales for BLOCK_M consecutive rows with a single TMA copy,
    so rows must be adjacent (stride 1) and each K-block column must start on a 16-byte
    boundary (column stride = M rounded up to 4 floats). Returns x itself when it is already
    laid out that way; otherwise a new tensor with the same values. The padding rows of the
    new tensor are left uninitialised: nothing reads them.
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
    if x.dim() == 2:
        # Allocate the whole padded [KB, aligned_M] block so the storage really holds every
        # 16-byte aligned column, then view it as [M, KB].
        out = torch.empty((kb, aligned_m), dtype=x.dtype, device=x.device).t()[:m]
    else:
        g = x.shape[0]
        out = torch.empty((g, kb, aligned_m), dtype=x.dtype, device=x.device).transpose(1, 2)[:, :m]
    out.copy_(x)
    return out


# ---------------------------------------------------------------------------------------------
# Number of SMs the persistent kernels spread over.
# ---------------------------------------------------------------------------------------------
_num_sms_override: int | None = None
_device_sms: dict[int, int] = {}   # device index -> multiprocessor count (queried once)


def _device_sm_count() -> int | None:
    if not torch.cuda.is_available():
        return None
    return device_sm_count(torch.cuda.current_device())


def device_sm_count(index: int) -> int:
    """Multiprocessor count of CUDA device `index`, queried once per device."""
    count = _device_sms.get(index)
    if count is None:
        count = torch.cuda.get_device_properties(index).multi_processor_count
        _device_sms[index] = count
    return count


def num_sms_for(device_index: int) -> int:
    """SMs the kernels use on a given device: set_num_sms()'s value, else that device's count.

    The GEMMs plan with this rather than get_num_sms() so that the plan matches the device the
    kernel runs on, whichever device is current; their launch caches key on
    `_num_sms_override` (a plain module variable read) plus the device.
    """
    if _num_sms_override is not None:
        return _num_sms_override
    return device_sm_count(device_index)


def set_num_sms(num_sms: int) -> None:
    """Limit the persistent kernels to num_sms SMs (e.g. to leave SMs to communication kernels)."""
    global _num_sms_override
    if isinstance(num_sms, bool) or not isinstance(num_sms, int):
        raise TypeError(f"num_sms must be an int, got {type(num_sms).__name__}")
    limit = _device_sm_count() or DEFAULT_NUM_SMS
    if not 1 <= num_sms <= limit:
        raise ValueError(f"num_sms must be in 1..{limit} (the device's SM count), got {num_sms}")
    _num_sms_override = num_sms


def get_num_sms() -> int:
    """SMs the kernels use: set_num_sms()'s value, else the current device's count (132 without CUDA)."""
    if _num_sms_override is not None:
        return _num_sms_override
    return _device_sm_count() or DEFAULT_NUM_SMS


# ---------------------------------------------------------------------------------------------
# FP8 casts (DeepSeek-V3 fine-grained scaling).
# ---------------------------------------------------------------------------------------------
def _cast_impl(kind: str, x: torch.Tensor):
    """The single dispatch point for the casts (kind is "per_token" or "per_block").

    CUDA tensors on a Hopper GPU go to the NVRTC-compiled kernels of ops/cast.py, which are
    bit-identical to the reference run on the same tensor; everything else (CPU tensors, other
    GPUs, bad input, whose errors the reference raises) takes the plain-torch reference.
    """
    if isinstance(x, torch.Tensor) and x.is_cuda:
        gpu = getattr(_cast_impl, "gpu", None)   # cached: an import statement costs microseconds
        if gpu is None:
            from .ops import cast   # imported lazily: it pulls in the JIT and the driver bindings
            from .ops.device import runs_on_hopper
            gpu = _cast_impl.gpu = (runs_on_hopper, {"per_token": cast.per_token_cast_to_fp8,
                                                     "per_block": cast.per_block_cast_to_fp8})
        if gpu[0](x.device):
            return gpu[1][kind]
    from . import reference   # imported lazily: reference.py imports this module
    if kind == "per_token":
        return reference.per_token_cast_to_fp8
    return reference.per_block_cast_to_fp8


def per_token_cast_to_fp8(x: torch.Tensor):
    """[M, K] or [G, M, K] -> (e4m3 values, float32 scales per 1x128 block, col-major TMA-aligned)."""
    if _is_compiling():  # torch.compile / export: trace one custom op (ops/library.py)
        return _library.per_token_cast_to_fp8(x)
    return _cast_impl("per_token", x)(x)


def per_block_cast_to_fp8(x: torch.Tensor):
    """[N, K] or [G, N, K] -> (e4m3 values, float32 scales per 128x128 block, row-major)."""
    if _is_compiling():  # torch.compile / export: trace one custom op (ops/library.py)
        return _library.per_block_cast_to_fp8(x)
    return _cast_impl("per_block", x)(x)
