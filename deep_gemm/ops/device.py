"""Which tensors the Hopper kernels can serve (others take the reference path)."""
from __future__ import annotations

import torch

_hopper_cache: dict = {}


def runs_on_hopper(device: torch.device) -> bool:
    """True for a CUDA device of compute capability 9.x (H100/H200/H20...)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    known = _hopper_cache.get(index)
    if known is None:
        known = _hopper_cache[index] = torch.cuda.get_device_capability(index)[0] == 9
    return known
