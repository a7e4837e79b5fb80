"""Shared test set-up: skip ``@pytest.mark.gpu`` tests without a Hopper GPU, and
give JIT tests a private cache folder."""
from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def _no_hopper_reason() -> str:
    """Empty if a Hopper (sm_90) GPU is usable, else why not."""
    try:
        import torch
    except ImportError as e:
        return f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None \
            else "torch.cuda.is_available() is False"
        return why
    capability = torch.cuda.get_device_capability()
    if tuple(capability) != (9, 0):
        return (f"device 0 is {torch.cuda.get_device_name()} "
                f"(sm_{capability[0]}{capability[1]})")
    return ""


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # don't import torch / probe CUDA when no GPU test was collected
    why = _no_hopper_reason()
    if why:
        skip = pytest.mark.skip(reason=f"needs an NVIDIA Hopper (sm_90) GPU; none found: {why}")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def tmp_cache_dir(tmp_path, monkeypatch):
    """Point DG_JIT_CACHE_DIR at an empty folder and forget in-process kernels,
    so each test sees a cold cache. Yields the folder's path."""
    from deep_gemm.jit import clear_memory_cache

    cache_dir = tmp_path / "dg_cache"
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(cache_dir))
    clear_memory_cache()
    yield cache_dir
    clear_memory_cache()


@pytest.fixture
def pipeline_runs(monkeypatch):
    """The layout of every call of the one GEMM pipeline (deep_gemm.ops.gemm.run), in order."""
    from deep_gemm.config import Layout
    from deep_gemm.ops import gemm as gemm_ops

    runs = []
    real = gemm_ops.run

    def counted(layout, *args, **kwargs):
        runs.append(Layout(layout))
        return real(layout, *args, **kwargs)
    monkeypatch.setattr(gemm_ops, "run", counted)
    return runs
