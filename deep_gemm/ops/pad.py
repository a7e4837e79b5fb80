"""Zero-padding of fp8 operands along K to a multiple of 16 on Hopper: one launch for both.

TMA needs 16-byte row strides, so a GEMM whose K % 16 != 0 runs on copies of A and B with zero
columns up to K16 = round_up(K, 16). torch's F.pad takes two kernels per operand (fill, copy);
kernels/pad.cuh writes every byte of both copies in one launch. ops/gemm.pad_operands_k_to_16
routes CUDA tensors on Hopper here; its F.pad path (pad_k_to_16) is the reference.
"""
from __future__ import annotations

import struct

import torch

from ..jit.pad_source import CHUNKS_PER_CTA, KERNEL_NAME, NAME, THREADS, pad_source, padded_k
from ..runtime.driver import LoadedKernel
from ..runtime.kernels import load_once
from ..runtime.launch import current_raw_stream

_FP8 = torch.float8_e4m3fn
_INT32_MAX = 2**31 - 1
# Kernel parameters, in order (kernels/pad.cuh): (src, dst, rows, K) of each operand, then the
# CTAs of the first.
_PARAMS = struct.Struct("<QQqi4xQQqii")
_OFFSETS = (0, 8, 16, 24, 32, 40, 48, 56, 60)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device

_loaded: dict = {}          # device index -> LoadedKernel
launch_count = 0            # kernels launched by this module (tests count them per GEMM call)


def pad_kernel(device_index: int) -> LoadedKernel:
    """The loaded padding kernel of a device, compiling and loading it on first use."""
    kernel = _loaded.get(device_index)
    if kernel is not None:   # the per-call path: no closure built
        return kernel
    return load_once(_loaded, device_index, device_index, build=lambda: (pad_source(), KERNEL_NAME, NAME),
                     what="the K-padding kernel (for K % 16 != 0)",
                     preload_hint="Run the same call once before capture (warm-up), or load it ahead with "
                                  "deep_gemm.ops.pad.precompile_pad.",
                     num_threads=THREADS)


def precompile_pad(device=None) -> None:
    """Compile and load the padding kernel on a device (default: the current one), e.g. before
    CUDA-graph capture of a GEMM whose K % 16 != 0."""
    index = torch.device(device if device is not None else "cuda").index
    pad_kernel(torch.cuda.current_device() if index is None else index)


def padded_shape(x: torch.Tensor) -> tuple:
    """x's shape with the last dimension rounded up to a multiple of 16."""
    return (*x.shape[:-1], padded_k(x.shape[-1]))


def _check_pair(src, dst, name: str) -> None:
    tensors = ((f"{name} source", src), (f"{name} destination", dst))
    for what, t in tensors:     # types first: a TypeError for a wrong kind of argument
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != _FP8:
            raise TypeError(f"{what} must be {_FP8}, got {t.dtype}")
    for what, t in tensors:
        if not t.is_cuda:
            raise ValueError(f"{what} must be a CUDA tensor, got device {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
    if src.dim() < 1 or src.shape[-1] < 1:
        raise ValueError(f"{name} source must have K >= 1 columns, got shape {tuple(src.shape)}")
    if src.shape[-1] > _INT32_MAX - 15:
        raise ValueError(f"{name} source has too many columns for the padding kernel: {src.shape[-1]}")
    if tuple(dst.shape) != padded_shape(src):
        raise ValueError(f"{name} destination must have shape {padded_shape(src)}, got {tuple(dst.shape)}")
    if dst.device != src.device:
        raise ValueError(f"{name} destination must be on {src.device}, got {dst.device}")
    if dst.data_ptr() % 16:
        raise ValueError(f"{name} destination must start 16-byte aligned, got 0x{dst.data_ptr():x}")


def pad_k16_into(pairs) -> None:
    """Copy each (src, dst) of `pairs` (one or two; fp8, contiguous, on one device): the rows of
    src [..., K] into the rows of dst [..., round_up(K, 16)], zeros past K. One launch, on the
    current stream of their device."""
    global launch_count
    pairs = list(pairs)
    if not 1 <= len(pairs) <= 2:
        raise ValueError(f"pad_k16_into takes one or two (src, dst) pairs, got {len(pairs)}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (src, dst) pair, got {type(pair).__name__}")
        _check_pair(*pair, f"pairs[{i}]")
    device = pairs[0][0].device
    if any(src.device != device for src, _ in pairs):
        raise ValueError(f"pad_k16_into: every tensor must be on {device}")
    operands = []      # (src, dst, rows, K, CTAs); a missing second operand gets no CTAs
    for src, dst in pairs:
        k = src.shape[-1]
        rows = src.numel() // k
        chunks = rows * (dst.shape[-1] // 16)
        operands.append((src.data_ptr(), dst.data_ptr(), rows, k, (chunks + CHUNKS_PER_CTA - 1) // CHUNKS_PER_CTA))
    operands += [(0, 0, 0, 1, 0)] * (2 - len(operands))
    grid = operands[0][4] + operands[1][4]
    if grid == 0:
        return
    if grid > _INT32_MAX:
        raise ValueError(f"too much to pad in one launch ({grid} thread blocks)")
    index = device.index
    kernel = pad_kernel(index)
    params = _PARAMS.pack(*operands[0][:4], *operands[1][:4], operands[0][4])
    stream = current_raw_stream(index)
    if _current_device() == index:
        kernel.launch(grid, stream, params, _OFFSETS)
    else:   # the module lives in that device's context
        with torch.cuda.device(index):
            kernel.launch(grid, stream, params, _OFFSETS)
    launch_count += 1


def pad_k16(*xs: torch.Tensor) -> tuple:
    """Copies of one or two fp8 tensors (contiguous, on one Hopper GPU) with their last dimension
    zero-padded to a multiple of 16, made by one launch."""
    outs = tuple(torch.empty(padded_shape(x), dtype=_FP8, device=x.device) for x in xs)
    pad_k16_into(zip(xs, outs))
    return outs
