"""`python -m deep_gemm precompile`: build, before serving, every kernel a workload needs.

M is a run-time value, but the planner's choice of tile (and so of kernel) depends
on M.  So for each requested (layout, N, K, groups) we plan every M of the range
(pure Python, cheap), keep the unique KernelConfigs and compile them in
parallel through deep_gemm.jit.precompile, filling the disk cache that the
first call of each shape would otherwise fill (and that CUDA-graph capture
cannot fill: loading a module during capture is not permitted).

    python -m deep_gemm precompile --preset deepseek-v3
    python -m deep_gemm precompile --shape 4096x7168 --grouped masked:32:4096x7168:128 --json
    python -m deep_gemm precompile --bf16 2112x7168 --bf16 masked:32:7168x2048:64 --bf16 contiguous:8:4096x7168
    python -m deep_gemm precompile --k-grouped 8:7168x4096 --k-grouped bf16:8:2048x7168

Exit status: 0 when every kernel compiled with no register spill, no stack frame and
no ignored setmaxnreg; 1 otherwise (the message names the kernels); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import time
from typing import Iterable, List, NamedTuple, Sequence

from ..config import KernelConfig, Layout
from ..plan import plan_dense
from .pad_source import pad_job, padded_k

DEFAULT_MAX_M = 16384
SUPPORTED_ARCHS = ("sm_90a",)   # the kernel uses wgmma/setmaxnreg: arch-specific sm_90a only

# ANCHORS.md: the dense DeepSeek-V3/R1 projections (N, K) and the benchmark's M values.
ANCHOR_NK = ((7168, 576), (2112, 7168), (24576, 1536), (32768, 512),
             (7168, 16384), (4096, 7168), (7168, 2048))
ANCHOR_M = (64, 128, 4096)

# DeepSeek-V3/R1 routed experts: gate+up fused (N = 2 x 2048, K = 7168) and down (7168, 2048).
# 256 experts; with expert parallelism each rank holds 256/EP of them.  NUM_GROUPS is a
# compile-time constant, so each G is its own kernel: G = 256 (no EP), 32, 16, 8 (EP 8, 16, 32).
DSV3_MOE_NK = ((4096, 7168), (7168, 2048))
DSV3_GROUPS = (8, 16, 32, 256)
# Masked layout (DeepEP low-latency decode): expected_m = tokens routed to one expert, a
# small number in decode; 1..1024 covers batch x top-8 / experts for any realistic batch.
DSV3_MASKED_EXPECTED_M = 1024


class Request(NamedTuple):
    """Plan `layout` for (n, k, num_groups) at every M in `m_values`
    (for the masked layout M is expected_m, the value the planner sees)."""
    layout: int
    n: int
    k: int
    num_groups: int
    m_values: Sequence[int]


def preset_requests(name: str, max_m: int) -> List[Request]:
    every_m = range(1, max_m + 1)
    if name == "anchors":
        return [Request(Layout.DENSE, n, k, 1, ANCHOR_M) for n, k in ANCHOR_NK]
    if name == "deepseek-v3":
        reqs = [Request(Layout.DENSE, n, k, 1, every_m) for n, k in ANCHOR_NK]
        for g in DSV3_GROUPS:
            for n, k in DSV3_MOE_NK:
                reqs.append(Request(Layout.CONTIGUOUS, n, k, g, every_m))
                reqs.append(Request(Layout.MASKED, n, k, g,
                                    range(1, min(max_m, DSV3_MASKED_EXPECTED_M) + 1)))
        return reqs
    raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")


PRESETS = ("anchors", "deepseek-v3")


def plan_all(requests: Iterable[Request], num_sms: int) -> List[KernelConfig]:
    """Unique configs, in first-planned order (deterministic)."""
    # DG_PRINT_CONFIGS would print one line per planned M here: silence it while planning.
    saved = os.environ.pop("DG_PRINT_CONFIGS", None)
    try:
        seen = {}
        for r in requests:
            for m in r.m_values:
                # A call with K % 16 != 0 runs on operands padded to a multiple of 16 (ops/pad.py).
                config = plan_dense(m, r.n, padded_k(r.k), num_sms, layout=r.layout, num_groups=r.num_groups)
                seen.setdefault(config, None)
        return list(seen)
    finally:
        if saved is not None:
            os.environ["DG_PRINT_CONFIGS"] = saved


# ---- argument parsing ---------------------------------------------------------------------

_INT = r"([1-9]\d*)"


def _parse_shape(text: str, max_m: int) -> Request:
    m = re.fullmatch(rf"{_INT}x{_INT}x{_INT}|{_INT}x{_INT}", text.strip().lower())
    if not m:
        raise ValueError(f"--shape must be MxNxK or NxK with positive integers, got {text!r}")
    if m.group(1):
        return Request(Layout.DENSE, int(m.group(2)), int(m.group(3)), 1, (int(m.group(1)),))
    return Request(Layout.DENSE, int(m.group(4)), int(m.group(5)), 1, range(1, max_m + 1))


def _parse_grouped(text: str, max_m: int) -> Request:
    m = re.fullmatch(rf"(contiguous|masked):{_INT}:{_INT}x{_INT}(?::{_INT})?", text.strip().lower())
    if not m or (m.group(1) == "contiguous" and m.group(5)):
        raise ValueError(f"--grouped must be contiguous:G:NxK or masked:G:NxK[:expected_m] with "
                         f"positive integers, got {text!r}")
    layout = Layout.CONTIGUOUS if m.group(1) == "contiguous" else Layout.MASKED
    ms = (int(m.group(5)),) if m.group(5) else range(1, max_m + 1)
    return Request(layout, int(m.group(3)), int(m.group(4)), int(m.group(2)), ms)


def _parse_bf16(text: str, max_m: int) -> Request:
    """NxK (a dense NT GEMM), contiguous:G:NxK or masked:G:NxK[:expected_m], K a multiple of 8; the
    Ms the BF16 kernel runs are kept by plan_bf16_all."""
    m = re.fullmatch(rf"{_INT}x{_INT}|(contiguous|masked):{_INT}:{_INT}x{_INT}(?::{_INT})?", text.strip().lower())
    k = m and int(m.group(2) or m.group(6))
    if not m or k % 8 or (m.group(3) == "contiguous" and m.group(7)):
        raise ValueError(f"--bf16 must be NxK, contiguous:G:NxK or masked:G:NxK[:expected_m] with positive "
                         f"integers, K a multiple of 8, got {text!r}")
    if m.group(1):
        return Request(Layout.DENSE, int(m.group(1)), k, 1, range(1, max_m + 1))
    ms = (int(m.group(7)),) if m.group(7) else range(1, max_m + 1)
    layout = Layout.CONTIGUOUS if m.group(3) == "contiguous" else Layout.MASKED
    return Request(layout, int(m.group(5)), k, int(m.group(4)), ms)


def plan_bf16_all(requests: Iterable[Request], num_sms: int) -> List[KernelConfig]:
    """The BF16 kernel's configs of each request's Ms that it runs: dense NT calls (M up to
    plan.BF16_DENSE_KERNEL_MAX_M) with a bf16 D, an fp32 D and an fp32 D accumulated; grouped calls
    (bf16 D) at every M (contiguous: rows, masked: expected_m)."""
    from ..plan import BF16_DENSE_KERNEL_MAX_M, plan_bf16
    seen = {}
    for r in requests:
        if r.layout != Layout.DENSE:
            for m in r.m_values:
                seen.setdefault(plan_bf16(m, r.n, r.k, num_sms, layout=r.layout, num_groups=r.num_groups), None)
            continue
        for m in (m for m in r.m_values if m <= BF16_DENSE_KERNEL_MAX_M):
            for fp32, acc in ((False, False), (True, False), (True, True)):
                seen.setdefault(plan_bf16(m, r.n, r.k, num_sms, out_fp32=fp32, accumulate=acc), None)
    return list(seen)


def _parse_k_grouped(text: str) -> tuple:
    """[bf16:]G:MxN -> (bf16, G, M, N): a K-grouped weight gradient (FP8 or BF16) of G groups."""
    m = re.fullmatch(rf"(bf16:|fp8:)?{_INT}:{_INT}x{_INT}", text.strip().lower())
    if not m:
        raise ValueError(f"--k-grouped must be [fp8:|bf16:]G:MxN with positive integers, got {text!r}")
    return m.group(1) == "bf16:", int(m.group(2)), int(m.group(3)), int(m.group(4))


def plan_k_grouped_all(requests: Iterable[tuple], num_sms: int) -> List[KernelConfig]:
    """Every kernel a K-grouped call of (bf16, G, M, N) may run (one serves every K): D written and
    accumulated, the sizes read on the host (up to K_GROUPED_MAX_GROUPS groups) and on the device."""
    from ..config import K_GROUPED_MAX_GROUPS
    from ..plan import plan_bf16
    seen = {}
    for bf16, g, m, n in requests:
        for acc in (False, True):
            if bf16:
                config = plan_bf16(m, n, 0, num_sms, accumulate=acc, layout=Layout.K_GROUPED, num_groups=g)
            else:
                config = plan_dense(m, n, 1, num_sms, layout=Layout.K_GROUPED, num_groups=g, row_scales_b=True,
                                    out_fp32=True, accumulate=acc)
            if g <= K_GROUPED_MAX_GROUPS:
                seen.setdefault(config, None)
            seen.setdefault(dataclasses.replace(config, device_sizes=True), None)
    return list(seen)


def default_arch() -> str:
    """The current GPU's arch, or sm_90a when there is none (compiling needs no GPU)."""
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}" + ("a" if major == 9 else "")
    except Exception:  # no usable torch/CUDA: cross-compile for Hopper
        pass
    return "sm_90a"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deep_gemm precompile",
        description="Compile the kernels that the given shapes need (for every M of a range "
                    "where M is left out) into the JIT cache ($DG_JIT_CACHE_DIR).")
    p.add_argument("--arch", help="target, e.g. sm_90a (default: the current GPU's, else sm_90a)")
    p.add_argument("--shape", action="append", default=[], metavar="MxNxK|NxK",
                   help="dense GEMM; NxK means every M from 1 to --max-m (repeatable)")
    p.add_argument("--grouped", action="append", default=[],
                   metavar="contiguous:G:NxK|masked:G:NxK[:expected_m]",
                   help="grouped MoE GEMM with G groups; without expected_m, every M "
                        "(contiguous: total rows; masked: expected_m) from 1 to --max-m")
    p.add_argument("--bf16", action="append", default=[], metavar="NxK|contiguous:G:NxK|masked:G:NxK[:expected_m]",
                   help="BF16 GEMM: dense NT (bf16_gemm_nt; bf16 and fp32 out; the kernel runs M up to 128), "
                        "contiguous or masked with G groups (m_grouped_bf16_gemm_nt_*): the kernels of every M "
                        "(contiguous: total rows; masked: expected_m) from 1 to --max-m (repeatable)")
    p.add_argument("--k-grouped", action="append", default=[], metavar="[fp8:|bf16:]G:MxN",
                   help="K-grouped weight gradient of G groups (k_grouped_wgrad_gemm_fp8_fp8_fp32_nt, "
                        "k_grouped_bf16_gemm_tn_contiguous): its kernels for sizes on the host and on the device, "
                        "D written and accumulated, and the kernel that writes the groups' tensor maps (repeatable)")
    p.add_argument("--preset", action="append", default=[], choices=PRESETS,
                   help="anchors: the dense shapes of ANCHORS.md; deepseek-v3: every dense and "
                        "MoE kernel of DeepSeek-V3/R1 for M up to --max-m")
    p.add_argument("--max-m", type=int, default=DEFAULT_MAX_M, help=f"default {DEFAULT_MAX_M}")
    p.add_argument("--num-sms", type=int, default=None,
                   help="SMs the kernels will use (default: deep_gemm.get_num_sms())")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: CPUs, <= 16)")
    p.add_argument("--json", action="store_true", help="print a JSON list of the kernels on stdout")
    p.add_argument("--dry-run", action="store_true", help="list the kernels without compiling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


CAST_DTYPES = ("bf16",)  # activations of DeepSeek-V3 (and most serving stacks) are bf16


def cast_jobs(ks: Iterable[int], arch: str) -> tuple:
    """(configs, jobs) of the FP8 cast kernels for every K, when deep_gemm.jit.cast_source
    exists (it is optional: without it the casts run in torch and there is nothing to build).

    A cast kernel depends on K, the input dtype and whether rows allow 16-byte accesses, never
    on M: both kinds for each K and CAST_DTYPES, with 16-byte accesses (contiguous inputs,
    K % 16 == 0) and element-wise (misaligned rows), as ops/cast.precompile_casts does.
    """
    try:
        mod = importlib.import_module(f"{__package__}.cast_source")
    except ImportError:
        return [], []
    try:
        configs = [mod.CastConfig(kind=kind, k=k, dtype=dtype, vec=vec)
                   for k in sorted(set(ks)) for kind in sorted(mod.KERNEL_NAMES) for dtype in CAST_DTYPES
                   for vec in ((True, False) if k % 16 == 0 else (False,))]
        jobs = [(c.name, mod.cast_source(c), c.kernel_name, arch) for c in configs]
    except (AttributeError, TypeError, ValueError) as e:  # an API we don't know: say so, go on
        print(f"precompile: cast kernels skipped, deep_gemm.jit.cast_source is not usable ({e})",
              file=sys.stderr)
        return [], []
    return configs, jobs


def _record(name: str, config, kernel) -> dict:
    r = kernel.resources
    return {"kernel": name, "config": dataclasses.asdict(config) if config is not None else {},
            "registers": r.registers, "spill_bytes": r.spill_store_bytes + r.spill_load_bytes,
            "stack_bytes": r.stack_bytes, "compile_s": round(kernel.compile_s, 4),
            "from_cache": kernel.from_cache, "setmaxnreg_ignored": r.setmaxnreg_ignored,
            "wgmma_serialized": r.wgmma_serialized}


def _problem(rec: dict) -> str:
    why = []
    if rec["spill_bytes"]:
        why.append(f"spills {rec['spill_bytes']} B")
    if rec["stack_bytes"]:
        why.append(f"stack frame {rec['stack_bytes']} B")
    if rec["setmaxnreg_ignored"]:
        why.append("setmaxnreg ignored (C7508)")
    if rec["wgmma_serialized"]:
        why.append("wgmmas serialised (C7514)")
    return ", ".join(why)


def main(argv: Sequence[str] = ()) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # -h or a usage error: argparse already printed why
        return int(e.code or 0)
    try:
        if args.max_m < 1:
            raise ValueError(f"--max-m must be >= 1, got {args.max_m}")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        requests = [_parse_shape(s, args.max_m) for s in args.shape]
        requests += [_parse_grouped(s, args.max_m) for s in args.grouped]
        for preset in args.preset:
            requests += preset_requests(preset, args.max_m)
        bf16 = [_parse_bf16(s, args.max_m) for s in args.bf16]
        k_grouped = [_parse_k_grouped(s) for s in args.k_grouped]
        if not requests and not bf16 and not k_grouped:
            raise ValueError("nothing to compile: give --shape, --grouped, --bf16, --k-grouped or --preset")
        arch = args.arch or default_arch()
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"--arch {arch}: deep_gemm's kernels need {', '.join(SUPPORTED_ARCHS)} "
                             f"(Hopper); pass --arch sm_90a to compile for it on any machine")
        if args.num_sms is None:
            from ..utils import get_num_sms
            args.num_sms = get_num_sms()
        if args.num_sms < 1:
            raise ValueError(f"--num-sms must be >= 1, got {args.num_sms}")
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"precompile: error: {e}", file=sys.stderr)
        return 2

    from .kernel_source import gemm_job
    t0 = time.perf_counter()
    configs = plan_all(requests, args.num_sms) + plan_bf16_all(bf16, args.num_sms)
    configs += plan_k_grouped_all(k_grouped, args.num_sms)
    plan_s = time.perf_counter() - t0
    jobs = [gemm_job(c, arch) for c in configs]
    owners: list = list(configs)
    for mn_major in sorted({c.bf16_operands for c in configs if c.device_sizes}):   # their group maps
        from .group_maps_source import group_maps_job
        owners.append(None)
        jobs.append(group_maps_job(mn_major, arch))
    if any(r.k % 16 for r in requests):   # such calls pad A and B along K first (ops/pad.py)
        owners.append(None)
        jobs.append(pad_job(arch))
    more_configs, more_jobs = cast_jobs({r.k for r in requests}, arch)
    owners += more_configs
    jobs += more_jobs
    if args.dry_run:
        names = [job[0] for job in jobs]
        print(json.dumps(names, indent=1) if args.json else "\n".join(names))
        print(f"{len(jobs)} kernels (planned in {plan_s:.2f} s)", file=sys.stderr)
        return 0

    from . import CompilationError, precompile
    t0 = time.perf_counter()
    try:
        kernels = precompile(jobs, workers=args.workers, progress=not args.no_progress)
    except (CompilationError, RuntimeError) as e:  # the message names the failed kernels
        print(e, file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    records = [_record(job[0], owner, k) for job, owner, k in zip(jobs, owners, kernels)]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        built = sum(not r["from_cache"] for r in records)
        print(f"precompiled {len(records)} kernels for {arch} in {wall:.1f} s "
              f"({built} compiled, {len(records) - built} from the cache; planned in {plan_s:.2f} s)")
    bad = [f"{r['kernel']} ({_problem(r)})" for r in records if _problem(r)]
    if bad:
        print(f"precompile: {len(bad)} kernel(s) would run slowly: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0
