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


def test_cpu_tensors_take_the_reference(monkeypatch):
    # ops/cast.py dispatches inside: CPU tensors (even where runs_on_hopper says yes, as the
    # host-path tests fake it) run deep_gemm.reference, never a kernel; bad input is the
    # reference's error.
    import deep_gemm
    from deep_gemm import reference
    from deep_gemm.ops import cast

    def no_kernel(*args, **kwargs):
        raise AssertionError("a cast kernel was launched for a CPU tensor")
    monkeypatch.setattr(cast, "_launch", no_kernel)
    monkeypatch.setattr(cast, "runs_on_hopper", lambda device: True)
    x = torch.randn(3, 200)
    calls = []
    for kind in ("per_token", "per_block"):
        real = getattr(reference, f"{kind}_cast_to_fp8")

        def spy(t, real=real, kind=kind):
            calls.append(kind)
            return real(t)
        monkeypatch.setattr(reference, f"{kind}_cast_to_fp8", spy)
        for fn in (getattr(cast, f"{kind}_cast_to_fp8"), getattr(deep_gemm, f"{kind}_cast_to_fp8")):
            q, s = fn(x)
            rq, rs = real(x)
            assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    assert calls == ["per_token"] * 2 + ["per_block"] * 2
    with pytest.raises(TypeError, match="torch.Tensor"):
        cast.per_token_cast_to_fp8("not a tensor")


@pytest.mark.parametrize("kind", [PER_TOKEN, PER_BLOCK])
def test_cast_into_cpu_tensors_is_a_clear_error(kind):
    # The casts into given outputs run only on a Hopper GPU: CPU tensors get a ValueError that says
    # so, on any machine (no CUDA query may fail first).
    from deep_gemm.ops import cast
    x = torch.randn(3, 200)
    q = torch.empty(3, 200, dtype=torch.float8_e4m3fn)
    scales = torch.empty(3, 2) if kind == PER_TOKEN else torch.empty(1, 2)
    with pytest.raises(ValueError, match="CUDA tensor on a Hopper GPU"):
        getattr(cast, f"{kind}_cast_into")(x, q, scales)
