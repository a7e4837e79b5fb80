"""Compile, with NVRTC for sm_90a and no GPU, every GEMM variant the planner can pick for
the ANCHORS shapes, and hold ptxas' report to zero spills, zero stack and a working
setmaxnreg.  Also drives `python -m deep_gemm precompile` end to end.

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

from deep_gemm.jit import clear_memory_cache, precompile, precompile_cli
from deep_gemm.jit.kernel_source import GEMM_KERNEL_NAME, gemm_source
from deep_gemm.jit.precompile_cli import ANCHOR_NK, DSV3_MOE_NK, Request, plan_all
from deep_gemm.plan import LAYOUT_CONTIGUOUS, LAYOUT_DENSE, LAYOUT_MASKED, KernelConfig, max_stages, plan_dense

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
    jobs = [(c.name, gemm_source(c), GEMM_KERNEL_NAME, "sm_90a") for c in configs]
    kernels = precompile(jobs, workers=WORKERS, progress=False)
    bad = []
    for c, k in zip(configs, kernels):
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
    assert {c.sa_loader_warp for c in configs} == {False, True}    # A's scales by TMA and by a warp
    assert {c.stage_k_blocks for c in configs} == {1, 2}           # one and two K blocks a stage
    kernels = _compile_and_check(configs)
    assert all(k.cubin.startswith(b"\x7fELF") for k in kernels)


def test_every_grouped_variant_compiles_clean(tmp_cache_dir):
    configs = plan_all(_requests_grouped(), NUM_SMS)
    assert {c.layout for c in configs} == {LAYOUT_CONTIGUOUS, LAYOUT_MASKED}
    _compile_and_check(configs)


# (N, K) of other models than the ANCHORS ones, so that a shape-dependent ptxas problem (an odd
# number of K blocks serialised every wgmma until perf-notes section 27) shows up before a user's
# model hits it. Dense projections: Llama-3 8B / 70B / 405B, Qwen2.5-72B (unfused gate and down),
# DeepSeek-V3's q_a projection and vocabulary head, and a 4608-wide pair. MoE experts (gate+up
# fused, down): Mixtral 8x7B, Qwen3-30B-A3B, Qwen3-235B, Qwen2-57B, DeepSeek-V2-Lite, gpt-oss, GLM-4.5.
MODEL_DENSE_NK = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192),
                  (8192, 8192), (57344, 8192), (8192, 28672), (18432, 16384), (16384, 16384),
                  (106496, 16384), (16384, 53248), (29568, 8192), (8192, 29568), (1536, 7168),
                  (4608, 7168), (7168, 4608), (129280, 7168))
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
    assert any(c.num_k_blocks % 2 == 1 and c.num_k_blocks >= 5 and c.pipeline for c in configs)
    _compile_and_check(configs)


def _forced(layout, n, k, **changes):
    base = plan_dense(4096, n, k, NUM_SMS, layout=layout, num_groups=1 if layout == LAYOUT_DENSE else 4)
    changes = {"split_k": 1, "block_m": 128, "pipeline": True, "stage_k_blocks": 1, **changes}
    return dataclasses.replace(base, **changes, num_stages=max_stages(
        changes["block_m"], changes.get("block_n", base.block_n), stage_k_blocks=changes["stage_k_blocks"]))


def test_prepared_kernel_variants_compile_clean(tmp_cache_dir):
    # Variants the planner does not choose (yet), so the sweeps above miss them. An odd number
    # of K blocks once made ptxas serialise the pipelined loop's wgmmas (C7514), which the planner
    # sweep above would only catch for K = 576; FIXED_SCALE_SPLIT compiles a main loop per scale
    # split (2 for BLOCK_N = 192, 4 for 160, 3 for 96, 8 for 144); PIPELINE_HALVES pipelines
    # promotion over the two N halves of each block, a loop shape ptxas is particular about.
    configs = [
        _forced(LAYOUT_DENSE, 7168, 1408),                                    # 11 K blocks
        _forced(LAYOUT_DENSE, 7168, 4224, split_k=4),                         # 33, split-capable
        _forced(LAYOUT_CONTIGUOUS, 2048, 1408),
        _forced(LAYOUT_MASKED, 2048, 1408, block_m=64),
        _forced(LAYOUT_DENSE, 7168, 640, block_m=64, block_n=32, stage_k_blocks=2),
    ]
    for layout in (LAYOUT_DENSE, LAYOUT_CONTIGUOUS, LAYOUT_MASKED):
        for block_n in (144, 160, 192):
            configs.append(_forced(layout, 4096, 7168, block_n=block_n, pipeline=False, fixed_scale_split=True))
            # Split-capable too: wide tiles sum their splits into the accumulators (3 x 80
            # registers spilled before).
            configs.append(_forced(layout, 4096, 7168, block_n=block_n, pipeline=False, fixed_scale_split=True,
                                   split_k=4))
    # Pipelined halves (PIPELINE_HALVES): every tile width, with and without the fixed split,
    # split-capable, clustered, on 64-row tiles, over an odd number of K blocks.
    for block_n in (128, 144, 160, 192):
        configs.append(_forced(LAYOUT_CONTIGUOUS, 4096, 7168, block_n=block_n, pipeline=False,
                               fixed_scale_split=block_n > 128, pipeline_halves=True))
    configs += [
        _forced(LAYOUT_MASKED, 4096, 7168, block_n=160, pipeline=False, fixed_scale_split=True, pipeline_halves=True,
                split_k=4),
        _forced(LAYOUT_DENSE, 2112, 896, block_n=192, pipeline=False, fixed_scale_split=True, pipeline_halves=True,
                cluster_n=2),
        _forced(LAYOUT_MASKED, 7168, 2048, block_m=64, block_n=128, pipeline=False, pipeline_halves=True),
        _forced(LAYOUT_DENSE, 7168, 1408, block_n=192, pipeline=False, pipeline_halves=True),
        _forced(LAYOUT_DENSE, 4096, 7168, block_m=64, block_n=32, pipeline=False, pipeline_halves=True,
                stage_k_blocks=2, sa_loader_warp=True),
    ]
    configs += [
        _forced(LAYOUT_DENSE, 2112, 896, block_n=192, pipeline=False, fixed_scale_split=True, cluster_n=2),
        _forced(LAYOUT_DENSE, 24576, 1536, block_m=64, block_n=96, pipeline=False, fixed_scale_split=True),
        _forced(LAYOUT_DENSE, 2112, 7168, block_m=64, block_n=96, pipeline=True, fixed_scale_split=True),
        _forced(LAYOUT_MASKED, 7168, 2048, block_m=64, block_n=160, pipeline=False, fixed_scale_split=True),
    ]
    kernels = _compile_and_check(configs)
    # The split copies are really there: a fixed-split kernel is larger than its run-time twin.
    assert configs[5].fixed_scale_split and configs[5].split_k == 1
    plain = _compile_and_check([dataclasses.replace(configs[5], fixed_scale_split=False)])[0]
    assert len(kernels[5].cubin) > len(plain.cubin)


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
        _forced(LAYOUT_MASKED, 4096, 7168, block_n=160, pipeline=False, fixed_scale_split=True, split_k=4),
        _forced(LAYOUT_CONTIGUOUS, 4096, 7168, block_n=192, pipeline=False, fixed_scale_split=True,
                pipeline_halves=True),
    ]
    kernels = _compile_and_check(configs)
    assert all(k.compiler.startswith("nvcc ") for k in kernels)


def test_sweep_covers_every_tile_choice():
    # Every (block_m, block_n) the planner picks for M up to 16384 already shows up in the
    # 1..8192 sweep above, so the compile tests miss no tile shape.
    for n, k in ANCHOR_NK:
        seen = {(c.block_m, c.block_n) for c in plan_all([Request(LAYOUT_DENSE, n, k, 1, SWEEP_M)], NUM_SMS)}
        wider = {(c.block_m, c.block_n) for c in
                 plan_all([Request(LAYOUT_DENSE, n, k, 1, range(8193, 16385, 7))], NUM_SMS)}
        assert wider <= seen, (n, k, wider - seen)


def test_loader_warp_with_a_cluster_does_not_compile(tmp_cache_dir):
    # It hung on the GPU (docs/perf-notes.md, section 24): refused at compile time instead.
    from deep_gemm.jit import compile_kernel
    from deep_gemm.jit.compiler import CompilationError
    config = dataclasses.replace(plan_dense(64, 2112, 7168, NUM_SMS), cluster_n=2, sa_loader_warp=True)
    with pytest.raises(CompilationError, match="loader warp runs without clusters"):
        compile_kernel(gemm_source(config), GEMM_KERNEL_NAME, arch="sm_90a", name=config.name)


@pytest.mark.parametrize("changes, needle", [
    (dict(k=576), "K % 128 == 0"),                         # the 3-D view needs whole K blocks
    (dict(cluster_n=2, sa_loader_warp=False), "no cluster"),
], ids=["k576", "cluster"])
def test_several_k_blocks_a_stage_is_refused_where_boxes_cannot_hold_them(tmp_cache_dir, changes, needle):
    from deep_gemm.jit import compile_kernel
    from deep_gemm.jit.compiler import CompilationError
    config = dataclasses.replace(plan_dense(64, 2112, 7168, NUM_SMS), stage_k_blocks=2, num_stages=8, **changes)
    with pytest.raises(CompilationError, match=needle):
        compile_kernel(gemm_source(config), GEMM_KERNEL_NAME, arch="sm_90a", name=config.name)


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
])
def test_cli_bad_arguments(argv, needle, capsys):
    rc, _, err = _run_cli(argv, capsys)
    assert rc == 2 and needle in err


def test_cli_fails_on_spilling_kernel(tmp_cache_dir, capsys, monkeypatch):
    # BLOCK_N = 256 with two math warpgroups needs 2 x 128 fp32 accumulators a thread: it
    # spills today (which is why the planner caps BLOCK_N); the CLI must say so and fail.
    spilling = KernelConfig(n=4096, k=7168, block_m=128, block_n=256, num_stages=3)
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


# Kernel features the planner does not pick today (docs/perf-notes.md sections 2 and 4) but
# which stay supported: multicast clusters of 2 and split-K clusters of 2, 4 and 8.
FEATURE_VARIANTS = [
    KernelConfig(n=7168, k=2048, block_m=128, block_n=128, num_stages=5, cluster_n=2),
    KernelConfig(n=2112, k=7168, block_m=64, block_n=16, num_stages=8, cluster_n=2, pipeline=False),
    KernelConfig(n=4096, k=7168, block_m=128, block_n=128, num_stages=5, layout=LAYOUT_MASKED,
                 num_groups=4, cluster_n=2),
    KernelConfig(n=2112, k=7168, block_m=64, block_n=128, num_stages=7, split_k=4, pipeline=False),
    KernelConfig(n=2112, k=7168, block_m=128, block_n=64, num_stages=7, split_k=2),
    KernelConfig(n=7168, k=576, block_m=64, block_n=32, num_stages=8, split_k=8, pipeline=False),
    KernelConfig(n=4096, k=7168, block_m=128, block_n=128, num_stages=4, layout=LAYOUT_CONTIGUOUS,
                 num_groups=8, split_k=2),
    # Several K blocks a stage (3-D TMA boxes): decode tiles with and without the scale loader
    # warp, split-K, 256-row tiles, both grouped layouts.
    KernelConfig(n=2112, k=7168, block_m=64, block_n=16, num_stages=10, stage_k_blocks=2, sa_loader_warp=True,
                 stream_b=True),
    KernelConfig(n=4096, k=7168, block_m=128, block_n=32, num_stages=2, stage_k_blocks=4, stream_b=True),
    KernelConfig(n=2112, k=7168, block_m=128, block_n=128, num_stages=2, stage_k_blocks=2, split_k=4),
    KernelConfig(n=7168, k=16384, block_m=256, block_n=128, num_stages=1, stage_k_blocks=2, pipeline=False),
    KernelConfig(n=4096, k=7168, block_m=128, block_n=128, num_stages=3, stage_k_blocks=2, layout=LAYOUT_MASKED,
                 num_groups=4, split_k=4),
    KernelConfig(n=4096, k=7168, block_m=128, block_n=128, num_stages=3, stage_k_blocks=2,
                 layout=LAYOUT_CONTIGUOUS, num_groups=8),
]


def test_cluster_and_split_k_variants_compile_clean(tmp_cache_dir):
    _compile_and_check(FEATURE_VARIANTS)
