"""CPU tests of the FP8 cast kernels: every variant compiles for sm_90a with NVRTC, with no
spills and no stack, and the generated source carries the reference's exact constants."""
from __future__ import annotations

import struct

import pytest
import torch

from deep_gemm.jit import compile_kernel
from deep_gemm.jit.cast_source import DTYPES, KERNEL_NAMES, PER_BLOCK, PER_TOKEN, CastConfig, cast_source

# K values of the anchor models (7168, 2048, 576, 1536, 16384) and awkward ones: partial last
# block (576, 200), K % 16 != 0 (100, 1), K below one chunk (16).
VARIANTS = [(k, vec) for k in (7168, 576, 128, 16) for vec in (True, False)] + [(200, False), (100, False), (1, False)]


def _bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


@pytest.fixture(autouse=True)
def _nvrtc(monkeypatch, tmp_cache_dir):
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)


@pytest.mark.parametrize("kind", [PER_TOKEN, PER_BLOCK])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,vec", VARIANTS, ids=lambda v: str(v))
def test_cast_variant_compiles_clean(kind, dtype, k, vec):
    config = CastConfig(kind, k, dtype, vec)
    kernel = compile_kernel(cast_source(config), config.kernel_name, arch="sm_90a", name=config.name)
    r = kernel.resources
    assert (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes) == (0, 0, 0), kernel.log
    # Per-token aims at full occupancy (2048 threads/SM needs <= 32 registers; the element-wise
    # variants may use a few more). Per-block keeps 2 CTAs per SM, except that a single K block
    # (K <= 128, no loop-carried index math to share) may cost fp32's 1024-thread CTAs a few more.
    if kind == PER_TOKEN:
        limit = 40 if vec else 48
    else:
        limit = 65536 // ((1 if k <= 128 else 2) * config.num_threads)
    assert r.registers <= limit, f"{config.name}: {r.registers} registers"
    assert not r.warnings, r.warnings
    # Scales live in registers; per-block shares one float per warp for the CTA-wide amax.
    assert r.shared_bytes == (0 if kind == PER_TOKEN else 4 * config.num_threads // 32)


def test_source_constants_match_torch():
    source = cast_source(CastConfig(PER_TOKEN, 7168, "bf16", True))
    # torch evaluates `amax / 448.0` on CUDA as amax * (1.0f / 448.0f), and clamp(min=1e-4)
    # against float(1e-4): the kernel must use those exact float32 bit patterns.
    inv = (torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32)).item()
    assert f"#define CAST_INV_FP8_MAX_BITS 0x{_bits(inv):08X}u" in source
    assert f"#define CAST_AMAX_FLOOR_BITS 0x{_bits(1e-4):08X}u" in source
    assert "#define CAST_K 7168" in source and "#define CAST_VEC 1" in source
    assert "#define CAST_PER_BLOCK 0" in source and source.rstrip().endswith('#include "cast.cuh"')
    assert "#define CAST_PER_BLOCK 1" in cast_source(CastConfig(PER_BLOCK, 100, "fp32", False))


def test_config_names_are_distinct():
    configs = [CastConfig(kind, k, dtype, vec) for kind in KERNEL_NAMES for dtype in DTYPES for k, vec in VARIANTS]
    assert len({c.name for c in configs}) == len(configs)
    assert len({cast_source(c) for c in configs}) == len(configs)


@pytest.mark.parametrize("kwargs,error", [
    (dict(kind="per_row", k=128, dtype="bf16", vec=True), "kind"),
    (dict(kind=PER_TOKEN, k=0, dtype="bf16", vec=False), "k must"),
    (dict(kind=PER_TOKEN, k=True, dtype="bf16", vec=False), "k must"),
    (dict(kind=PER_TOKEN, k=128, dtype="fp8", vec=False), "dtype"),
    (dict(kind=PER_TOKEN, k=100, dtype="bf16", vec=True), "vec"),
])
def test_bad_config_raises(kwargs, error):
    with pytest.raises(ValueError, match=error):
        CastConfig(**kwargs)


def test_cpu_tensors_take_the_reference():
    from deep_gemm import reference, utils
    x = torch.randn(3, 200)
    assert utils._cast_impl("per_token", x) is reference.per_token_cast_to_fp8
    assert utils._cast_impl("per_block", x) is reference.per_block_cast_to_fp8
    assert utils._cast_impl("per_token", "not a tensor") is reference.per_token_cast_to_fp8
