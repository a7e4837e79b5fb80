"""Compile, with NVRTC for sm_90a and no GPU, every GEMM variant the planner can pick for
the ANCHORS shapes, and hold ptxas' report to zero spills, zero stack and a working
setmaxnreg.  Also compiles kernels/gemm.cuh on its own (one and two instantiations of
deep_gemm::gemm_kernel<GemmConfig<...>> in a translation unit), checks that the C++ static_asserts
refuse what KernelConfig refuses, and drives `python -m deep_gemm precompile` end to end.

A spill or a stack frame in the main loop costs far more than it looks (local memory
traffic inside the wgmma pipeline), and an ignored setmaxnreg silently leaves the
consumer warpgroups short of registers: both are regressions to catch here, on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from deep_gemm.config import KernelConfig, Layout, max_stages
from deep_gemm.jit import clear_memory_cache, compile_kernel, precompile, precompile_cli
from deep_gemm.jit.compiler import CompilationError, entry_functions
from deep_gemm.jit.kernel_source import gemm_job, gemm_kernel_name, gemm_source
from deep_gemm.jit.precompile_cli import ANCHOR_NK, DSV3_MOE_NK, Request, plan_all
from deep_gemm.plan import plan_dense

LAYOUT_DENSE, LAYOUT_CONTIGUOUS, LAYOUT_MASKED = Layout.DENSE, Layout.CONTIGUOUS, Layout.MASKED

REPO = Path(__file__).resolve().parents[1]
NUM_SMS = 132
SWEEP_M = range(1, 8193)       # every M: planning is cheap, and no block-size choice is missed
WORKERS = min(os.cpu_count() or 1, 16)


def _requests_dense():
    return [Request(LAYOUT_DENSE, n, k, 1, SWEEP_M) for n, k in ANCHOR_NK]


def _requests_grouped():
    # The group counts of ANCHORS.md's grouped tables; masked expected_m up to 1024.
    reqs = []
    for n, k in DSV3_MOE_NK:
        reqs += [Request(LAYOUT_CONTIGUOUS, n, k, g, SWEEP_M) for g in (4, 8, 32)]
        reqs += [Request(LAYOUT_MASKED, n, k, g, range(1, 1025)) for g in (1, 2, 4, 16, 32)]
    return reqs


def _compile_and_check(configs):
    jobs = [gemm_job(c, "sm_90a") for c in configs]
    assert all(job[2] == gemm_kernel_name(c) for job, c in zip(jobs, configs))
    kernels = precompile(jobs, workers=WORKERS, progress=False)
    bad = []
    for c, k in zip(configs, kernels):
        # The kernel is the instantiation asked for: its mangled name (all the template arguments
        # are in it) is the one entry function ptxas compiled.
        assert k.symbol.startswith("_Z") and entry_functions(k.log) == [k.symbol], (c.name, k.symbol)
        r = k.resources
        if (r.spill_store_bytes or r.spill_load_bytes or r.stack_bytes or r.setmaxnreg_ignored
                or r.wgmma_serialized):
            bad.append(f"{c.name}: {r.registers} regs, spills {r.spill_store_bytes}/"
                       f"{r.spill_load_bytes} B, stack {r.stack_bytes} B, "
                       f"setmaxnreg ignored: {r.setmaxnreg_ignored}, wgmmas serialised: {r.wgmma_serialized}")
    assert not bad, f"{len(bad)} of {len(configs)} kernels fail ptxas limits:\n" + "\n".join(bad)
    return kernels


def test_every_dense_variant_compiles_clean(tmp_cache_dir):
    configs = plan_all(_requests_dense(), NUM_SMS)
    assert len({(c.block_m, c.block_n) for c in configs}) >= 4  # the sweep really varies tiles
    assert {c.stream_b for c in configs} == {False, True}          # both L2 policies of B's loads
    assert {c.scale_loader_warp for c in configs} == {False, True}  # A's scales by TMA and by a warp
    assert {c.stage_k_blocks for c in configs} == {1, 2}           # one and two K blocks a stage
    assert {c.pipelined for c in configs} == {False, True}
    assert {c.block_m for c in configs} == {64, 128, 256}
    kernels = _compile_and_check(configs)
    assert all(k.cubin.startswith(b"\x7fELF") for k in kernels)


def test_every_grouped_variant_compiles_clean(tmp_cache_dir):
    configs = plan_all(_requests_grouped(), NUM_SMS)
    assert {c.layout for c in configs} == {LAYOUT_CONTIGUOUS, LAYOUT_MASKED}
    _compile_and_check(configs)


# (N, K) of other models than the ANCHORS ones, so that a shape-dependent ptxas problem (an odd
# number of K blocks once made ptxas serialise every wgmma) shows up before a user's
# model hits it. Dense projections: Llama-3 8B / 70B / 405B, Qwen2.5-72B (unfused gate and down),
# DeepSeek-V3's q_a and kv_a projections and vocabulary head, a 4608-wide pair, and Llama-3 70B's
# unfused k (or v) projection (the last two: decode tiles split over K). MoE experts (gate+up
# fused, down): Mixtral 8x7B, Qwen3-30B-A3B, Qwen3-235B, Qwen2-57B, DeepSeek-V2-Lite, gpt-oss, GLM-4.5.
MODEL_DENSE_NK = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192),
                  (8192, 8192), (57344, 8192), (8192, 28672), (18432, 16384), (16384, 16384),
                  (106496, 16384), (16384, 53248), (29568, 8192), (8192, 29568), (1536, 7168),
                  (4608, 7168), (7168, 4608), (129280, 7168), (576, 7168), (1024, 8192))
MODEL_MOE_NK = ((28672, 4096), (4096, 14336), (1536, 2048), (2048, 768), (3072, 4096), (4096, 1536),
                (5120, 3584), (3584, 2560), (2816, 2048), (2048, 1408), (5760, 2880), (2880, 2880),
                (2816, 5120), (5120, 1408))


def test_popular_model_shapes_compile_clean(tmp_cache_dir):
    # Ms at which the planner's choices change (decode, tile widths, 128 / 256-row tiles,
    # split last waves); grouped: few and many experts a rank.
    reqs = [Request(LAYOUT_DENSE, n, k, 1, (1, 16, 64, 128, 200, 512, 1000, 2048, 4096, 8192, 16384))
            for n, k in MODEL_DENSE_NK]
    for n, k in MODEL_MOE_NK:
        for g in (8, 128):
            reqs.append(Request(LAYOUT_CONTIGUOUS, n, k, g, (128, 1024, 4096, 16384, 65536)))
            reqs.append(Request(LAYOUT_MASKED, n, k, g, (1, 8, 32, 64, 128, 256, 512, 1024)))
    configs = plan_all(reqs, NUM_SMS)
    assert any(c.num_k_blocks % 2 == 1 and c.num_k_blocks >= 5 and c.pipelined for c in configs)
    _compile_and_check(configs)


def _forced(layout, n, k, **changes):
    base = plan_dense(4096, n, k, NUM_SMS, layout=layout, num_groups=1 if layout == LAYOUT_DENSE else 4)
    changes = {"split_k": 1, "block_m": 128, "pipelined": True, "stage_k_blocks": 1, **changes}
    return dataclasses.replace(base, **changes, num_stages=max_stages(
        changes["block_m"], changes.get("block_n", base.block_n), stage_k_blocks=changes["stage_k_blocks"]))


def test_prepared_kernel_variants_compile_clean(tmp_cache_dir):
    # Variants the planner does not choose (yet), so the sweeps above miss them. An odd number
    # of K blocks once made ptxas serialise the pipelined loop's wgmmas (C7514), which the planner
    # sweep above would only catch for K = 576; tiles over two scale blocks of B (144, 160 wide)
    # run unpipelined, whole or split-capable (wide tiles sum their splits into the accumulators:
    # 3 x 80 registers spilled before).
    configs = [
        _forced(LAYOUT_DENSE, 7168, 1408),                                    # 11 K blocks
        _forced(LAYOUT_DENSE, 7168, 4224, split_k=4),                         # 33, split-capable
        _forced(LAYOUT_CONTIGUOUS, 2048, 1408),
        _forced(LAYOUT_MASKED, 2048, 1408, block_m=64),
        _forced(LAYOUT_DENSE, 7168, 640, block_m=64, block_n=32, stage_k_blocks=2),
        _forced(LAYOUT_DENSE, 2112, 7168, block_m=64, block_n=32, stage_k_blocks=4),
    ]
    for layout in (LAYOUT_DENSE, LAYOUT_CONTIGUOUS, LAYOUT_MASKED):
        for block_n in (144, 160):
            configs.append(_forced(layout, 4096, 7168, block_n=block_n, pipelined=False))
            configs.append(_forced(layout, 4096, 7168, block_n=block_n, pipelined=False, split_k=4))
    configs += [
        _forced(LAYOUT_DENSE, 24576, 1536, block_m=64, block_n=144, pipelined=False),
        _forced(LAYOUT_MASKED, 7168, 2048, block_m=64, block_n=160, pipelined=False),
        _forced(LAYOUT_DENSE, 7168, 1408, block_n=144, pipelined=False),   # 11 K blocks, two scale blocks
    ]
    assert all(c.block_n <= 128 or not c.pipelined for c in configs)
    _compile_and_check(configs)


def test_nvcc_compiles_the_kernel_families(tmp_cache_dir, monkeypatch):
    # The optional nvcc back end is stricter than NVRTC in places (a constexpr helper that device
    # code calls must be __host__ __device__ there): one kernel of each family through it.
    from deep_gemm.jit.compiler import find_nvcc
    try:
        find_nvcc()
    except RuntimeError as e:
        pytest.skip(f"nvcc not found: {e}")
    monkeypatch.setenv("DG_JIT_USE_NVCC", "1")
    configs = [
        plan_dense(4096, 4096, 7168, NUM_SMS, layout=LAYOUT_CONTIGUOUS, num_groups=4),
        plan_dense(64, 2112, 7168, NUM_SMS),
        plan_dense(4096, 7168, 16384, NUM_SMS),
        _forced(LAYOUT_MASKED, 4096, 7168, block_n=160, pipelined=False, split_k=4),
        _forced(LAYOUT_CONTIGUOUS, 4096, 7168, block_n=144, pipelined=False),
    ]
    kernels = _compile_and_check(configs)
    assert all(k.compiler.startswith("nvcc ") for k in kernels)
    # nvcc finds the symbol in ptxas' report, NVRTC asks for the lowered name: the same name.
    monkeypatch.delenv("DG_JIT_USE_NVCC")
    source, name = gemm_source(configs[1])
    assert compile_kernel(source, name, name=configs[1].name).symbol == kernels[1].symbol


def test_sweep_covers_every_tile_choice():
    # Every (block_m, block_n) the planner picks for M up to 16384 already shows up in the
    # 1..8192 sweep above, so the compile tests miss no tile shape.
    for n, k in ANCHOR_NK:
        seen = {(c.block_m, c.block_n) for c in plan_all([Request(LAYOUT_DENSE, n, k, 1, SWEEP_M)], NUM_SMS)}
        wider = {(c.block_m, c.block_n) for c in
                 plan_all([Request(LAYOUT_DENSE, n, k, 1, range(8193, 16385, 7))], NUM_SMS)}
        assert wider <= seen, (n, k, wider - seen)


# ---- kernels/gemm.cuh as a library of its own -------------------------------------------------
SMALL_CONFIG_ARGS = "256, 512, 64, 64, 2, 1, 0, 1, 8, 1, false, false, false, false, false, false, false, false, false, 0, false"
SMALL_NAME = f"deep_gemm::gemm_kernel<deep_gemm::GemmConfig<{SMALL_CONFIG_ARGS}>>"
OTHER_CONFIG_ARGS = "384, 1024, 128, 128, 3, 1, 1, 4, 16, 1, true, false, false, false, false, false, false, false, false, 1, false"
OTHER_NAME = f"deep_gemm::gemm_kernel<deep_gemm::GemmConfig<{OTHER_CONFIG_ARGS}>>"


def _instantiation(name: str) -> str:
    return f"template __global__ void {name}(const __grid_constant__ deep_gemm::GemmParams);\n"


@pytest.fixture
def nvrtc(monkeypatch, tmp_cache_dir):
    monkeypatch.delenv("DG_JIT_USE_NVCC", raising=False)
    return tmp_cache_dir


def test_gemm_header_compiles_on_its_own(nvrtc):
    # Nothing but the header and one explicit instantiation: no generated defines, no checks.
    source = '#include "gemm.cuh"\n' + _instantiation(SMALL_NAME)
    kernel = compile_kernel(source, SMALL_NAME, arch="sm_90a", name="header_only")
    assert kernel.cubin[:4] == b"\x7fELF" and kernel.kernel_name == SMALL_NAME
    assert kernel.symbol.startswith("_Z") and "gemm_kernel" in kernel.symbol and "GemmConfig" in kernel.symbol
    assert f"Compiling entry function '{kernel.symbol}'" in kernel.log
    assert entry_functions(kernel.log) == [kernel.symbol]
    r = kernel.resources
    assert r.registers > 0 and not r.spills and not r.stack_bytes and not r.setmaxnreg_ignored, kernel.log
    # The generated source of the same config is this header plus checks: the same kernel.
    same = KernelConfig(shape_n=256, shape_k=512, block_m=64, block_n=64, num_stages=2, raster_group=8)
    assert gemm_kernel_name(same) == SMALL_NAME
    generated = compile_kernel(*gemm_source(same), name=same.name)
    assert generated.symbol == kernel.symbol and generated.resources.registers == r.registers


def test_two_configs_in_one_translation_unit(nvrtc):
    source = '#include "gemm.cuh"\n' + _instantiation(SMALL_NAME) + _instantiation(OTHER_NAME)
    first = compile_kernel(source, SMALL_NAME, arch="sm_90a", name="two_configs")
    entries = entry_functions(first.log)
    assert len(entries) == 2 and len(set(entries)) == 2 and first.symbol in entries
    second = compile_kernel(source, OTHER_NAME, arch="sm_90a", name="two_configs")
    assert second.symbol in entries and second.symbol != first.symbol
    # Each kernel's report is its own block of the same ptxas log.
    from deep_gemm.jit.resources import parse_ptxas_report
    assert parse_ptxas_report(first.log, second.symbol) == second.resources
    assert not first.resources.spills and not second.resources.spills
    # Both names are what KernelConfig writes for valid configs.
    other = KernelConfig(shape_n=384, shape_k=1024, block_m=128, block_n=128, num_stages=3,
                         layout=LAYOUT_CONTIGUOUS, num_groups=4, pipelined=True, out_buffers=1)
    assert gemm_kernel_name(other) == OTHER_NAME


def _unchecked(**fields) -> KernelConfig:
    """A KernelConfig that skips __post_init__'s checks, to hand the C++ compiler what the host refuses."""
    config = object.__new__(KernelConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(KernelConfig) if f.default is not dataclasses.MISSING}
    for key, value in {**defaults, **fields}.items():
        object.__setattr__(config, key, value)
    return config


# Each invalid config: KernelConfig refuses it with a ValueError naming the field, and the kernel's
# static_assert refuses it in the compiler too (the host checks mirror the device's).
REFUSED = [
    (dict(block_m=96), "block_m", "BLOCK_M must be 64, 128 or 256"),
    (dict(block_n=176), "block_n", "at most two scale blocks"),
    (dict(block_n=160, pipelined=True), "pipelined", "three fp32 register tiles"),
    (dict(block_m=256, split_k=2), "block_m = 256", "BLOCK_M = 256 runs dense GEMMs only"),
    (dict(shape_k=576, stage_k_blocks=2, block_m=64, block_n=16), "stage_k_blocks", "K % 128 == 0"),
    (dict(accumulate=True), "accumulate needs out_fp32", r"D \+= A B accumulates in fp32"),
    (dict(out_fp32=True, layout=Layout.MASKED), "out_fp32 runs every layout but masked", "fp32 D"),
    (dict(row_scales_b=True, layout=Layout.CONTIGUOUS), "row_scales_b", "per-row B scales"),
    (dict(layout=Layout.K_GROUPED, row_scales_b=True, split_k=2), "K_GROUPED needs", "K-grouped GEMMs: FP8"),
    (dict(a_mn_major=True), "a_mn_major and b_mn_major need", "MN-major operands"),
    (dict(bf16_operands=True, b_mn_major=True, block_n=96), "a_mn_major and b_mn_major need", "MN-major operands"),
    (dict(out_buffers=2), "out_buffers", "buffers must be fewer than a tile's store chunks"),
]


@pytest.mark.parametrize("changes, field, needle", REFUSED, ids=[r[1] for r in REFUSED])
def test_invalid_configs_are_refused_by_host_and_kernel(nvrtc, changes, field, needle):
    fields = {**dict(shape_n=2112, shape_k=7168, block_m=128, block_n=128, num_stages=2), **changes}
    with pytest.raises(ValueError, match="invalid KernelConfig") as info:
        KernelConfig(**fields)
    assert field in str(info.value)
    config = _unchecked(**fields)
    with pytest.raises(CompilationError, match=needle):
        compile_kernel(*gemm_source(config), arch="sm_90a", name=config.name)


# ---- the precompile CLI ------------------------------------------------------------------
def test_precompile_plans_k_as_the_calls_run_it():
    # A call with K % 16 != 0 runs the kernel planned for K rounded up to 16 (ops/pad.py).
    from deep_gemm.plan import plan_dense
    configs = plan_all([Request(LAYOUT_DENSE, 3000, 1000, 1, (1, 64, 4097))], NUM_SMS)
    assert configs == list(dict.fromkeys(plan_dense(m, 3000, 1008, NUM_SMS) for m in (1, 64, 4097)))



def _run_cli(argv, capsys):
    rc = precompile_cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_json(tmp_cache_dir, capsys):
    argv = ["--arch", "sm_90a", "--shape", "128x4096x7168", "--shape", "64X7168x2048",
            "--json", "--workers", "2", "--no-progress"]
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 0, err
    records = json.loads(out)
    want = [plan_dense(128, 4096, 7168, NUM_SMS), plan_dense(64, 7168, 2048, NUM_SMS)]
    assert [r["kernel"] for r in records][:2] == [c.name for c in want]  # casts may follow
    for r, c in zip(records, want):
        assert set(r) >= {"kernel", "config", "registers", "spill_bytes", "stack_bytes", "compile_s"}
        assert KernelConfig(**r["config"]) == c
        assert r["registers"] > 0 and r["spill_bytes"] == 0 and r["stack_bytes"] == 0
        assert r["compile_s"] > 0 and not r["from_cache"]
    # Second run, as from a fresh process: everything comes from the disk cache.
    clear_memory_cache()
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 0 and all(r["from_cache"] and r["compile_s"] == 0 for r in json.loads(out))


def test_cli_ranges_and_grouped(capsys):
    argv = ["--arch", "sm_90a", "--dry-run", "--json", "--max-m", "300", "--shape", "2112x7168",
            "--grouped", "contiguous:8:4096x7168", "--grouped", "masked:32:7168x2048:64"]
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 0, err
    want = plan_all([Request(LAYOUT_DENSE, 2112, 7168, 1, range(1, 301)),
                     Request(LAYOUT_CONTIGUOUS, 4096, 7168, 8, range(1, 301))], NUM_SMS)
    want.append(plan_dense(64, 7168, 2048, NUM_SMS, layout=LAYOUT_MASKED, num_groups=32))
    gemms = [name for name in json.loads(out) if name.startswith("gemm_")]  # casts may follow
    assert gemms == [c.name for c in dict.fromkeys(want)]


def test_cli_bf16(capsys):
    """--bf16 NxK: the BF16 kernel's configs of every M it runs (bf16 D, fp32 D, accumulated);
    contiguous:G:NxK and masked:G:NxK[:expected_m]: every M (or the one expected_m) of that layout."""
    from deep_gemm.plan import BF16_DENSE_KERNEL_MAX_M, plan_bf16
    rc, out, err = _run_cli(["--arch", "sm_90a", "--dry-run", "--json", "--bf16", "2112x7168"], capsys)
    assert rc == 0, err
    want = {plan_bf16(m, 2112, 7168, NUM_SMS, out_fp32=f, accumulate=a).name
            for m in range(1, BF16_DENSE_KERNEL_MAX_M + 1) for f, a in ((False, False), (True, False), (True, True))}
    assert set(json.loads(out)) == want and all("_bf16" in name for name in want)
    rc, out, err = _run_cli(["--arch", "sm_90a", "--dry-run", "--json", "--max-m", "300", "--bf16",
                             "masked:32:7168x2048:64", "--bf16", "masked:4:4096x7168", "--bf16",
                             "contiguous:8:4096x7168"], capsys)
    assert rc == 0, err
    want = [plan_bf16(64, 7168, 2048, NUM_SMS, layout=LAYOUT_MASKED, num_groups=32).name]
    want += [plan_bf16(m, 4096, 7168, NUM_SMS, layout=LAYOUT_MASKED, num_groups=4).name for m in range(1, 301)]
    want += [plan_bf16(m, 4096, 7168, NUM_SMS, layout=LAYOUT_CONTIGUOUS, num_groups=8).name for m in range(1, 301)]
    want = list(dict.fromkeys(want))
    assert list(json.loads(out)) == want and any(name.startswith("gemm_contiguous_") for name in want)
    assert len({name for name in want if "_bm128_bn192_" in name}) == 1   # masked's compute-bound tile
    for bad in ("masked:4:4096x7164", "contiguous:4:4096x7168:64", "masked:4096x7168"):
        rc, _, err = _run_cli(["--arch", "sm_90a", "--dry-run", "--bf16", bad], capsys)
        assert rc == 2 and "--bf16 must be" in err


def test_cli_k_grouped(tmp_cache_dir, capsys):
    """--k-grouped [bf16:]G:MxN: the K-grouped kernels (D written and accumulated; sizes on the host
    and, CUDA-graph safe, on the device) and the group-maps kernel the latter need; over 120 groups
    only the device-sizes kernels (the host ones would not fit the parameter space)."""
    from deep_gemm.plan import plan_bf16
    rc, out, err = _run_cli(["--arch", "sm_90a", "--dry-run", "--json", "--k-grouped", "8:7168x4096",
                             "--k-grouped", "bf16:4:2048x7168", "--k-grouped", "fp8:256:512x256"], capsys)
    assert rc == 0, err
    fp8 = [plan_dense(7168, 4096, 1, NUM_SMS, layout=Layout.K_GROUPED, num_groups=8, row_scales_b=True, out_fp32=True,
                      accumulate=acc) for acc in (False, True)]
    bf16 = [plan_bf16(2048, 7168, 0, NUM_SMS, accumulate=acc, layout=Layout.K_GROUPED, num_groups=4)
            for acc in (False, True)]
    many = [plan_dense(512, 256, 1, NUM_SMS, layout=Layout.K_GROUPED, num_groups=256, row_scales_b=True,
                       out_fp32=True, accumulate=acc) for acc in (False, True)]
    want = {c.name for c in fp8 + bf16} | {dataclasses.replace(c, device_sizes=True).name for c in fp8 + bf16 + many}
    assert set(json.loads(out)) == want | {"group_maps", "group_maps_mn"}
    for bad in ("8:7168", "int8:8:7168x4096", "0:64x64"):
        rc, _, err = _run_cli(["--arch", "sm_90a", "--dry-run", "--k-grouped", bad], capsys)
        assert rc == 2 and "--k-grouped must be" in err
    # and they compile clean (a small one of each kind)
    rc, out, err = _run_cli(["--arch", "sm_90a", "--json", "--no-progress", "--k-grouped", "3:256x512"], capsys)
    assert rc == 0, err
    assert {r["kernel"] for r in json.loads(out)} >= {"group_maps"}


def test_cli_presets(capsys):
    rc, out, _ = _run_cli(["--preset", "anchors", "--dry-run", "--json"], capsys)
    anchors = json.loads(out)
    assert rc == 0 and len(anchors) == len(set(anchors)) >= 7
    rc, out, _ = _run_cli(["--preset", "deepseek-v3", "--dry-run", "--json"], capsys)
    dsv3 = json.loads(out)
    assert rc == 0 and set(anchors) <= set(dsv3)
    for needle in ("gemm_contiguous_n4096_k7168_g256_", "gemm_masked_n7168_k2048_g8_", "gemm_dense_n2112_k7168_"):
        assert any(name.startswith(needle) for name in dsv3), needle


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "12x"], "--shape"),
    (["--shape", "0x4096x7168"], "--shape"),
    (["--grouped", "dense:4:4096x7168"], "--grouped"),
    (["--grouped", "contiguous:4:4096x7168:64"], "--grouped"),
    (["--arch", "sm_80", "--shape", "1x2x3"], "--arch"),
    (["--max-m", "0", "--shape", "4x4"], "--max-m"),
    (["--workers", "0", "--shape", "4x4"], "--workers"),
    ([], "nothing to compile"),
    (["--preset", "llama"], "--preset"),
    (["--bf16", "2112x7164"], "--bf16"),
    (["--bf16", "64x2112x7168"], "--bf16"),
])
def test_cli_bad_arguments(argv, needle, capsys):
    rc, _, err = _run_cli(argv, capsys)
    assert rc == 2 and needle in err


def test_cli_fails_on_spilling_kernel(tmp_cache_dir, capsys, monkeypatch):
    # BLOCK_N = 256 with two math warpgroups needs 2 x 128 fp32 accumulators a thread: it
    # spills today (which is why the planner caps BLOCK_N); the CLI must say so and fail.
    spilling = KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=256, num_stages=3)
    monkeypatch.setattr(precompile_cli, "plan_dense", lambda *a, **kw: spilling)
    rc, out, err = _run_cli(["--arch", "sm_90a", "--shape", "4096x4096x7168", "--json",
                             "--workers", "1", "--no-progress"], capsys)
    assert rc == 1
    assert spilling.name in err and "spills" in err
    assert json.loads(out)[0]["spill_bytes"] > 0


def test_cli_includes_cast_kernels_when_available(capsys, monkeypatch):
    # A stand-in for deep_gemm.jit.cast_source with the same API, so that this test holds
    # whether or not the real module is present.
    fake = types.ModuleType("deep_gemm.jit.cast_source")

    @dataclasses.dataclass(frozen=True)
    class CastConfig:
        kind: str
        k: int
        dtype: str
        vec: bool
        name = property(lambda self: f"cast_{self.kind}_{self.dtype}_k{self.k}_{int(self.vec)}")
        kernel_name = property(lambda self: f"cast_{self.kind}")

    fake.CastConfig, fake.KERNEL_NAMES = CastConfig, {"per_token": 0, "per_block": 1}
    fake.cast_source = lambda c: f"// {c.name}"
    monkeypatch.setitem(sys.modules, "deep_gemm.jit.cast_source", fake)
    rc, out, _ = _run_cli(["--shape", "64x4096x7168", "--shape", "64x4096x100", "--dry-run", "--json"], capsys)
    assert rc == 0
    assert json.loads(out)[-6:] == ["cast_per_block_bf16_k100_0", "cast_per_token_bf16_k100_0",
                                    "cast_per_block_bf16_k7168_1", "cast_per_block_bf16_k7168_0",
                                    "cast_per_token_bf16_k7168_1", "cast_per_token_bf16_k7168_0"]
    del fake.CastConfig  # an API the CLI doesn't know: skipped with a message, GEMMs still listed
    rc, out, err = _run_cli(["--shape", "64x4096x7168", "--dry-run", "--json"], capsys)
    assert rc == 0 and "cast kernels skipped" in err and len(json.loads(out)) == 1


def test_cast_kernels_compile_clean(tmp_cache_dir):
    pytest.importorskip("deep_gemm.jit.cast_source")
    ks = {k for _, k in ANCHOR_NK} | {100, 129}  # and unaligned K: the scalar variants
    configs, jobs = precompile_cli.cast_jobs(ks, "sm_90a")
    assert len(jobs) == 2 * len(ks) + 2 * sum(k % 16 == 0 for k in ks)
    bad = [f"{job[0]}: {k.resources}" for job, k in zip(jobs, precompile(jobs, workers=WORKERS, progress=False))
           if k.resources.spills or k.resources.stack_bytes]
    assert not bad, "\n".join(bad)


def test_cli_default_arch():
    # No GPU (CI): cross-compile for Hopper; a Hopper GPU: its arch-specific target, the same.
    import torch
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("a non-Hopper GPU: the CLI refuses its arch")
    assert precompile_cli.default_arch() == "sm_90a"


def test_python_m_deep_gemm_precompile(tmp_cache_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "deep_gemm", "precompile", "--arch", "sm_90a",
                           "--shape", "64x7168x2048", "--json", "--workers", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)[0]  # then the cast kernels, where deep_gemm has them
    assert record["kernel"] == plan_dense(64, 7168, 2048, NUM_SMS).name
    n = len(json.loads(proc.stdout))
    assert f"[{n}/{n}]" in proc.stderr  # the progress bar reached the end
    assert any(p.name.startswith(record["kernel"]) for p in (tmp_cache_dir / "cache").iterdir())


# Kernel features the planner does not pick for these shapes but which stay
# supported: split-K over other tiles and counts, several K blocks a stage, the scale loader warp
# on other tiles.
FEATURE_VARIANTS = [
    KernelConfig(shape_n=2112, shape_k=7168, block_m=64, block_n=128, num_stages=7, split_k=4),
    KernelConfig(shape_n=2112, shape_k=7168, block_m=128, block_n=64, num_stages=7, split_k=2, pipelined=True),
    KernelConfig(shape_n=7168, shape_k=576, block_m=64, block_n=32, num_stages=8, split_k=8),
    KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=128, num_stages=4, layout=LAYOUT_CONTIGUOUS,
                 num_groups=8, split_k=2, pipelined=True),
    # Several K blocks a stage (3-D TMA boxes): decode tiles with and without the scale loader
    # warp, split-K, 256-row tiles, both grouped layouts (128 x 128 tiles: two stages of two K
    # blocks fit in shared memory, three do not).
    KernelConfig(shape_n=2112, shape_k=7168, block_m=64, block_n=16, num_stages=10, stage_k_blocks=2,
                 pipelined=True, stream_b=True, scale_loader_warp=True),
    KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=32, num_stages=2, stage_k_blocks=4,
                 pipelined=True, stream_b=True),
    KernelConfig(shape_n=2112, shape_k=7168, block_m=128, block_n=128, num_stages=2, stage_k_blocks=2, split_k=4,
                 pipelined=True),
    KernelConfig(shape_n=7168, shape_k=16384, block_m=256, block_n=128, num_stages=1, stage_k_blocks=2),
    KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=128, num_stages=2, stage_k_blocks=2,
                 layout=LAYOUT_MASKED, num_groups=4, split_k=4, pipelined=True),
    KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=128, num_stages=2, stage_k_blocks=2,
                 layout=LAYOUT_CONTIGUOUS, num_groups=8, pipelined=True),
    # The scale loader warp on 256-row tiles (two waves: two 16-byte pieces a lane) and on wider tiles.
    KernelConfig(shape_n=7168, shape_k=16384, block_m=256, block_n=128, num_stages=3, scale_loader_warp=True),
    KernelConfig(shape_n=2112, shape_k=7168, block_m=256, block_n=16, num_stages=max_stages(256, 16), stream_b=True,
                 scale_loader_warp=True),
    KernelConfig(shape_n=7168, shape_k=2048, block_m=128, block_n=64, num_stages=6, pipelined=True,
                 scale_loader_warp=True),
]


def test_split_k_stage_and_loader_variants_compile_clean(tmp_cache_dir):
    assert any(c.block_m == 256 and c.scale_loader_warp for c in FEATURE_VARIANTS)
    assert {c.stage_k_blocks for c in FEATURE_VARIANTS} >= {1, 2, 4}
    _compile_and_check(FEATURE_VARIANTS)


def _training_plans():
    """The planner's kernels for the weight-gradient shapes of the benchmark, and the DeepGEMM 2.x
    calls that reach other combinations: an fp32 d written (not accumulated), a bf16 d with per-row B
    scales, an fp32 d from per-block B scales, split, 192-wide and 256-row tiles with per-row B scales, and
    K-grouped decode-sized M; every K-grouped plan also with its group sizes read on the device."""
    from deep_gemm import bench
    plans = {plan_dense(m, n, k, NUM_SMS, row_scales_b=True, out_fp32=True, accumulate=True)
             for m, n, k in bench.DEEPGEMM_WGRAD_US}
    plans |= {plan_dense(m, n, k, NUM_SMS, layout=Layout.K_GROUPED, num_groups=g, row_scales_b=True, out_fp32=True,
                         accumulate=True) for g, m, n, k in bench.DEEPGEMM_K_GROUPED_US}
    plans |= {plan_dense(m, 7168, 2048, NUM_SMS, row_scales_b=rows, out_fp32=fp32)
              for m in (64, 4096) for rows, fp32 in ((True, False), (False, True), (True, True))}
    plans |= {plan_dense(4096, 4096, 7168, NUM_SMS, row_scales_b=True),    # 256-row tiles
              plan_dense(4096, 2112, 7168, NUM_SMS, row_scales_b=True, out_fp32=True, accumulate=True),   # split-K
              plan_dense(64, 4096, 1, NUM_SMS, layout=Layout.K_GROUPED, num_groups=8, row_scales_b=True,
                         out_fp32=True, accumulate=True),
              plan_dense(256, 512, 1, NUM_SMS, layout=Layout.K_GROUPED, num_groups=3, row_scales_b=True,
                         out_fp32=True)}
    plans |= {dataclasses.replace(c, device_sizes=True) for c in plans if c.layout == Layout.K_GROUPED}
    return sorted(plans, key=lambda c: c.name)


def test_training_kernels_compile_clean(tmp_cache_dir):
    configs = _training_plans()
    assert {c.device_sizes for c in configs if c.layout == Layout.K_GROUPED} == {False, True}
    assert any(c.block_m == 256 and c.row_scales_b for c in configs)
    assert any(c.split_k > 1 and c.accumulate for c in configs)
    assert any(c.block_n == 192 and c.out_buffers for c in configs)
    assert {c.layout for c in configs} == {Layout.DENSE, Layout.K_GROUPED}
    _compile_and_check(configs)


def test_group_maps_kernels_compile_clean(tmp_cache_dir):
    # The kernel that writes a K-grouped GEMM's tensor maps from sizes on the device: fp8 (K-major)
    # and bf16 (MN-major) operands; its source checks GroupMapsParams against config.
    from deep_gemm.jit.group_maps_source import group_maps_job
    jobs = [group_maps_job(mn_major, "sm_90a") for mn_major in (False, True)]
    for kernel in precompile(jobs, workers=WORKERS, progress=False):
        r = kernel.resources
        assert r.registers > 0 and not r.spills and not r.stack_bytes, kernel.log
        assert entry_functions(kernel.log) == [kernel.symbol]


def _bf16_plans():
    """The BF16 kernel's plans: dense M from 1 to the kernel's limit over the ANCHORS (N, K) pairs and
    a K that is not a multiple of 64, bf16 and fp32 D, accumulated; masked and contiguous, few and
    many groups, memory- and compute-bound rows per group; MN-major operands, dense and K-grouped (its
    sizes on the host and on the device)."""
    from deep_gemm.plan import BF16_DENSE_KERNEL_MAX_M, plan_bf16
    plans = {plan_bf16(m, n, k, NUM_SMS, out_fp32=fp32, accumulate=acc)
             for m in (1, 64, 65, BF16_DENSE_KERNEL_MAX_M) for n, k in ANCHOR_NK + ((4104, 4104),)
             for fp32, acc in ((False, False), (True, False), (True, True))}
    grouped_nk = ((4096, 7168), (7168, 2048), (4104, 4104), (2112, 7168))
    plans |= {plan_bf16(m, n, k, NUM_SMS, layout=LAYOUT_MASKED, num_groups=g)
              for g in (2, 32) for m in (32, 128, 512) for n, k in grouped_nk}
    plans |= {plan_bf16(g * m, n, k, NUM_SMS, layout=LAYOUT_CONTIGUOUS, num_groups=g)
              for g in (4, 32) for m in (40, 256, 4096) for n, k in grouped_nk}
    plans |= {plan_bf16(m, n, k, NUM_SMS, out_fp32=fp32, accumulate=fp32, a_mn_major=mn_a, b_mn_major=mn_b)
              for m in (8, 64, 128) for n, k in ((7168, 576), (2112, 7168), (4104, 1032))
              for mn_a, mn_b in ((True, False), (False, True), (True, True)) for fp32 in (False, True)}
    plans |= {plan_bf16(m, n, 0, NUM_SMS, layout=Layout.K_GROUPED, num_groups=g, accumulate=acc)
              for g, m, n in ((4, 7168, 4096), (8, 2048, 7168), (3, 64, 264)) for acc in (False, True)}
    plans |= {dataclasses.replace(c, device_sizes=True) for c in plans if c.layout == Layout.K_GROUPED}
    return sorted(plans, key=lambda c: c.name)


def test_bf16_kernels_compile_clean(tmp_cache_dir):
    configs = _bf16_plans()
    assert {c.block_m for c in configs} == {64, 128} and all(c.bf16_operands for c in configs)
    assert {c.layout for c in configs} == set(Layout)
    assert len({c.block_n for c in configs}) >= 4 and {192, 256} <= {c.block_n for c in configs}
    assert {(c.split_k > 1, c.b_mn_major) for c in configs if c.layout == Layout.DENSE} >= {(True, False), (True, True)}
    assert {(c.a_mn_major, c.b_mn_major) for c in configs} == {(False, False), (True, False), (False, True), (True, True)}
    bf16_arg = [f.name for f in dataclasses.fields(KernelConfig)].index("bf16_operands")
    assert all(c.template_args().split(", ")[bf16_arg] == "true" for c in configs)
    _compile_and_check(configs)
