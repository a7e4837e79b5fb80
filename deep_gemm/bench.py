"""`python -m deep_gemm bench`: our kernels beside cuBLASLt and Triton on the ANCHORS.md shapes.

Method (as in ANCHORS.md): GPU time of the kernel(s) of one call, read from the torch profiler,
median over --iters calls, with a 256 MB buffer overwritten before every call so L2 starts
cold (the flush kernel itself is not counted). Host overhead is measured apart: CPU time to
issue one call, HOST_CALLS calls back to back without synchronising, median per call.
Correctness: calc_diff against a float64 product of the dequantized FP8 inputs.

A suite turns its shapes into Problems; every Problem offers each peer as a `prepare()` that
returns the zero-argument call to time. Adding a layout means adding a suite.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .bench_common import PEER_TITLES, PEERS, contiguous_seed, geomean, k_grouped_seed, masked_seed, save_figure
from .bench_bf16 import SUITES as BF16_SUITES

# ---------------------------------------------------------------------------------------------
# Ceilings, measured on the H100 of ANCHORS.md: device copy (read + write) and FP8 tensor cores.
# On another GPU the copy is measured at the start of the run (hbm_ceiling); the FP8 rate is
# kept, since the H200 and the H100 SXM share SMs, clocks and tensor cores.
# ---------------------------------------------------------------------------------------------
HBM_BYTES_PER_S = 3.0e12
FP8_FLOPS_PER_S = 1.5e15
ANCHORS_GPU = "H100"            # DeepGEMM's times ("vs DG") were measured on this GPU

FLUSH_BYTES = 256 << 20         # more than the 50 MB L2, so nothing of the last call survives
DEFAULT_ITERS = 50
QUICK_ITERS = 10
HOST_CALLS = 30                 # "20+ calls back to back"
WRONG_DIFF = 1e-5               # calc_diff above this is a wrong result (right ones sit near 1e-6)

# ---------------------------------------------------------------------------------------------
# Shapes and DeepGEMM's numbers from ANCHORS.md (H100 80GB HBM3, torch 2.11, CUDA 13.0).
# ---------------------------------------------------------------------------------------------
DENSE_MS = (64, 128, 4096)
DENSE_NKS = ((7168, 576), (2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
# Shapes nobody lists (issue #3): M from 1 to past a power of two, N and K off the usual grid
# (K = 1000 is not a multiple of 16 and is padded, N = 3000 is not a multiple of 128).
ODD_MS = (1, 7, 64, 200, 333, 1000, 4097)
ODD_NKS = ((2112, 7168), (3000, 1000))

# (M, N, K) -> DeepGEMM µs
DEEPGEMM_DENSE_US = {
    (64, 7168, 576): 5.2, (64, 2112, 7168): 12.0, (64, 24576, 1536): 20.3, (64, 32768, 512): 10.9,
    (64, 7168, 16384): 52.5, (64, 4096, 7168): 17.5, (64, 7168, 2048): 9.3,
    (128, 7168, 576): 5.6, (128, 2112, 7168): 13.3, (128, 24576, 1536): 21.5, (128, 32768, 512): 12.1,
    (128, 7168, 16384): 56.2, (128, 4096, 7168): 19.9, (128, 7168, 2048): 10.7,
    (4096, 7168, 576): 41.7, (4096, 2112, 7168): 107.8, (4096, 24576, 1536): 241.4,
    (4096, 32768, 512): 145.1, (4096, 7168, 16384): 652.1, (4096, 4096, 7168): 176.3,
    (4096, 7168, 2048): 99.0,
}
# (groups, M per group, N, K) -> (DeepGEMM µs, DeepGEMM TFLOPS)
DEEPGEMM_CONTIGUOUS = {
    (4, 8192, 4096, 7168): (1484.6, 1351), (4, 8192, 7168, 2048): (768.1, 1253),
    (8, 4096, 4096, 7168): (1648.0, 1201), (8, 4096, 7168, 2048): (898.2, 1250),
    (32, 256, 4096, 7168): (565.9, 863), (32, 256, 7168, 2048): (303.8, 830),
}
# (groups, expected M, N, K) -> (DeepGEMM µs, DeepGEMM TFLOPS)
DEEPGEMM_MASKED = {
    (1, 1024, 4096, 7168): (86.1, 842), (1, 1024, 7168, 2048): (44.9, 772),
    (2, 512, 4096, 7168): (51.1, 1061), (2, 512, 7168, 2048): (43.6, 671),
    (4, 256, 4096, 7168): (94.3, 650), (4, 256, 7168, 2048): (46.4, 690),
    (16, 64, 4096, 7168): (230.5, 284), (16, 64, 7168, 2048): (103.2, 294),
    (32, 32, 4096, 7168): (333.0, 179), (32, 32, 7168, 2048): (178.7, 178),
}
# Weight gradients (DeepGEMM's own harness, same H100): (M, N, K) -> DeepGEMM µs of
# wgrad_gemm_fp8_fp8_fp32_nt, and (groups, M, N, average K) -> µs of the K-grouped one.
DEEPGEMM_WGRAD_US = {
    (7168, 2112, 4096): 139, (7168, 2112, 8192): 248, (1536, 24576, 4096): 323, (1536, 24576, 8192): 603,
    (512, 32768, 4096): 162, (512, 32768, 8192): 285, (16384, 7168, 4096): 1011, (16384, 7168, 8192): 1897,
    (7168, 4096, 4096): 261, (7168, 4096, 8192): 479, (2048, 7168, 4096): 135, (2048, 7168, 8192): 243,
}
DEEPGEMM_K_GROUPED_US = {
    (4, 7168, 4096, 4096): 1059, (4, 2048, 7168, 4096): 538, (4, 7168, 4096, 8192): 1928,
    (4, 2048, 7168, 8192): 978, (8, 7168, 4096, 4096): 2138, (8, 2048, 7168, 4096): 1092,
}


def roofline_floor_s(flops: float, nbytes: float, hbm_bytes_per_s: float = HBM_BYTES_PER_S) -> float:
    return max(nbytes / hbm_bytes_per_s, flops / FP8_FLOPS_PER_S)


def hbm_ceiling(device) -> tuple:
    """(bytes/s, source) of the floor's memory term on this GPU: ANCHORS.md's 3.0 TB/s on the
    H100 it was measured on, else a device-to-device copy of 1 GiB timed here (read + write
    bytes, median of 20), since an H200's HBM is ~1.4x faster and would inflate "% of floor"."""
    name = torch.cuda.get_device_name(device)
    if ANCHORS_GPU in name:
        return HBM_BYTES_PER_S, f"ANCHORS.md ({ANCHORS_GPU})"
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):                           # warm-up
        dst.copy_(src)
    us = gpu_event_us(lambda: dst.copy_(src), 20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (us * 1e-6), "device copy of 1 GiB measured on this GPU"


def gpu_event_us(fn, iters: int) -> float:
    """Median GPU time of fn() in µs between two CUDA events, `iters` calls back to back (for
    work far larger than L2, where no flush is needed)."""
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) * 1e3


# ---------------------------------------------------------------------------------------------
# Problems.
# ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    suite: str
    label: str
    shape: dict                                   # what identifies the row (M, N, K, groups, ...)
    flops: float
    nbytes: float
    deepgemm_us: Optional[float]
    deepgemm_tflops: Optional[float]
    peers: Dict[str, Callable[[], Callable]]      # peer -> prepare() -> fn() (the call to time)
    check: Callable[[object], float]              # result of fn() -> calc_diff vs float64
    poison: Callable[[], None] = lambda: None     # fill our output with NaN before checking it


def _public(name: str):
    """deep_gemm.<name>, imported lazily: the kernels may not exist yet when this runs."""
    import deep_gemm
    fn = getattr(deep_gemm, name, None)
    if fn is None:
        raise NotImplementedError(f"deep_gemm.{name} does not exist yet")
    return fn


def _ours(name: str, *args, out: torch.Tensor) -> Callable:
    """Our peer's prepare(): deep_gemm.<name>(*args), returning `out`."""
    def prepare():
        fn = _public(name)

        def call():
            fn(*args)
            return out
        return call
    return prepare


def _cast_pair(x_a: torch.Tensor, x_b: torch.Tensor):
    from .api import per_block_cast_to_fp8, per_token_cast_to_fp8
    return per_token_cast_to_fp8(x_a), per_block_cast_to_fp8(x_b)


def _ref64(a, sa, b, sb) -> torch.Tensor:
    from .reference import dequantize_lhs, dequantize_rhs
    return dequantize_lhs(a, sa, torch.float64) @ dequantize_rhs(b, sb, torch.float64).T


def _diff(result, ref) -> float:
    from .reference import calc_diff
    return calc_diff(result, ref)


def make_dense(m: int, n: int, k: int, device, suite: str = "dense") -> Problem:
    from .baselines import prepare_cublas, prepare_triton
    torch.manual_seed(m * 1_000_003 + n * 1009 + k)
    (a, sa), (b, sb) = _cast_pair(torch.randn(m, k, device=device, dtype=torch.bfloat16),
                                  torch.randn(n, k, device=device, dtype=torch.bfloat16))
    ref = _ref64(a, sa, b, sb)
    out = torch.empty((m, n), dtype=torch.bfloat16, device=device)

    ours = _ours("gemm_fp8_fp8_bf16_nt", (a, sa), (b, sb), out, out=out)

    return Problem(
        suite=suite, label=f"{m}x{n}x{k}", shape={"m": m, "n": n, "k": k},
        flops=2.0 * m * n * k, nbytes=float(m * k + n * k + 2 * m * n),
        deepgemm_us=DEEPGEMM_DENSE_US.get((m, n, k)) if suite == "dense" else None, deepgemm_tflops=None,
        peers={"ours": ours,
               "cublaslt": lambda: prepare_cublas(a, sa, b, sb),
               "triton": lambda: prepare_triton(a, sa, b, sb)},
        check=lambda result: _diff(result, ref), poison=lambda: out.fill_(float("nan")))


def _per_group(prepare, parts):
    """Run a dense peer once per group (how cuBLASLt serves MoE without a grouped kernel)."""
    fns = [prepare(*p) for p in parts]
    return lambda: [f() for f in fns]


def _grouped_problem(suite, label, shape, groups, n, k, a, sa, b, sb, rows, ours, out, dg):
    """rows[g] = (index into a/out of group g's valid rows as a slice tuple, count)."""
    from .baselines import prepare_cublas, prepare_triton
    parts = [(a[r], sa[r], b[g], sb[g]) for g, (r, cnt) in enumerate(rows) if cnt]
    ref = torch.cat([_ref64(*p) for p in parts]) if parts else torch.empty(0, n, device=a.device)
    valid = sum(cnt for _, cnt in rows)

    def check(result):
        if isinstance(result, list):
            got = torch.cat(result) if result else ref
        else:
            got = torch.cat([result[r] for r, cnt in rows if cnt]) if parts else ref
        return _diff(got, ref)

    dg_us, dg_tflops = dg if dg else (None, None)
    return Problem(
        suite=suite, label=label, shape=shape,
        flops=2.0 * valid * n * k, nbytes=float(valid * k + groups * n * k + 2 * valid * n),
        deepgemm_us=dg_us, deepgemm_tflops=dg_tflops,
        peers={"ours": ours,
               "cublaslt": lambda: _per_group(prepare_cublas, parts),
               "triton": lambda: _per_group(prepare_triton, parts)},
        check=check, poison=lambda: out.fill_(float("nan")))


def _draw_counts(groups: int, expected: int, seed: int) -> List[int]:
    rng = random.Random(seed)
    return [int(expected * rng.uniform(0.7, 1.3)) for _ in range(groups)]


def masked_sizes(groups: int, expected_m: int, n: int, k: int, seed: Optional[int] = None) -> tuple:
    """(max_m, each group's valid rows) of a masked case; seed: of the group sizes (None: the case's own)."""
    max_m = 4096 if expected_m >= 256 else 256
    seed = masked_seed(groups, expected_m, n, k) if seed is None else seed
    return max_m, [min(c, max_m) for c in _draw_counts(groups, expected_m, seed)]


def make_contiguous(groups: int, m_per_group: int, n: int, k: int, device, seed=None) -> Problem:
    """seed: of the random group sizes (None: the case's own, as in every bench run)."""
    from .api import get_m_alignment_for_contiguous_layout
    align = get_m_alignment_for_contiguous_layout()
    seed = contiguous_seed(groups, m_per_group, n, k) if seed is None else seed
    torch.manual_seed(seed)
    counts = _draw_counts(groups, m_per_group, seed)
    padded = [(c + align - 1) // align * align for c in counts]
    m_total = sum(padded)
    (a, sa), (b, sb) = _cast_pair(torch.randn(m_total, k, device=device, dtype=torch.bfloat16),
                                  torch.randn(groups, n, k, device=device, dtype=torch.bfloat16))
    m_indices = torch.full((m_total,), -1, dtype=torch.int32)
    rows, start = [], 0
    for g, (c, p) in enumerate(zip(counts, padded)):
        m_indices[start:start + c] = g
        rows.append(((slice(start, start + c),), c))
        start += p
    m_indices = m_indices.to(device)
    out = torch.empty((m_total, n), dtype=torch.bfloat16, device=device)

    ours = _ours("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", (a, sa), (b, sb), out, m_indices, out=out)

    return _grouped_problem("contiguous", f"{groups}x{m_per_group} {n}x{k}",
                            {"groups": groups, "m_per_group": m_per_group, "n": n, "k": k,
                             "m_total": m_total, "valid_m": sum(counts)},
                            groups, n, k, a, sa, b, sb, rows, ours, out,
                            DEEPGEMM_CONTIGUOUS.get((groups, m_per_group, n, k)))


def make_masked(groups: int, expected_m: int, n: int, k: int, device, seed=None) -> Problem:
    """seed: of the random group sizes (None: the case's own, as in every bench run)."""
    seed = masked_seed(groups, expected_m, n, k) if seed is None else seed
    torch.manual_seed(seed)
    max_m, counts = masked_sizes(groups, expected_m, n, k, seed)
    (a, sa), (b, sb) = _cast_pair(torch.randn(groups, max_m, k, device=device, dtype=torch.bfloat16),
                                  torch.randn(groups, n, k, device=device, dtype=torch.bfloat16))
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    rows = [((g, slice(0, c)), c) for g, c in enumerate(counts)]
    out = torch.empty((groups, max_m, n), dtype=torch.bfloat16, device=device)

    ours = _ours("m_grouped_gemm_fp8_fp8_bf16_nt_masked", (a, sa), (b, sb), out, masked_m, expected_m, out=out)

    return _grouped_problem("masked", f"{groups}x{expected_m} {n}x{k}",
                            {"groups": groups, "expected_m": expected_m, "n": n, "k": k,
                             "max_m": max_m, "valid_m": sum(counts)},
                            groups, n, k, a, sa, b, sb, rows, ours, out,
                            DEEPGEMM_MASKED.get((groups, expected_m, n, k)))


def _only_ours(kind: str) -> Callable:
    def unavailable():
        raise NotImplementedError(f"no {kind} kernel with per-row scales on both operands")
    return unavailable


def _wgrad_operands(rows_a: int, rows_b: int, k: int, device):
    from .api import per_token_cast_to_fp8
    return (per_token_cast_to_fp8(torch.randn(rows_a, k, device=device, dtype=torch.bfloat16)),
            per_token_cast_to_fp8(torch.randn(rows_b, k, device=device, dtype=torch.bfloat16)))


def make_wgrad(m: int, n: int, k: int, device) -> Problem:
    """out [M, N] fp32 += A [M, K] B [N, K]^T, both scaled per row (a weight gradient, K the tokens)."""
    from .reference import dequantize_lhs
    torch.manual_seed(m * 1_000_003 + n * 1009 + k)
    lhs, rhs = _wgrad_operands(m, n, k, device)
    ref = dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_lhs(*rhs, dtype=torch.float64).T
    out = torch.zeros((m, n), dtype=torch.float32, device=device)

    ours = _ours("wgrad_gemm_fp8_fp8_fp32_nt", lhs, rhs, out, out=out)

    return Problem(
        suite="wgrad", label=f"{m}x{n}x{k}", shape={"m": m, "n": n, "k": k},
        flops=2.0 * m * n * k, nbytes=float(m * k + n * k + 8 * m * n),   # out read and written in fp32
        deepgemm_us=DEEPGEMM_WGRAD_US.get((m, n, k)), deepgemm_tflops=None,
        peers={"ours": ours, "cublaslt": _only_ours("cuBLASLt"), "triton": _only_ours("Triton")},
        check=lambda result: _diff(result, ref), poison=lambda: out.zero_())


def k_grouped_sizes(groups: int, m: int, n: int, avg_k: int) -> List[int]:
    """A K-grouped case's group sizes: 0.97-1.03 x avg_k each, in steps of 128 (its own seed)."""
    rng = random.Random(k_grouped_seed(groups, m, n, avg_k))
    return [int(avg_k * rng.uniform(0.97, 1.03)) // 128 * 128 for _ in range(groups)]


def make_k_grouped(groups: int, m: int, n: int, avg_k: int, device, device_sizes: bool = False) -> Problem:
    """out [G, M, N] fp32 += A_g B_g^T over each group's K (0.97-1.03 x avg_k in steps of 128).
    device_sizes: the sizes passed as an int32 tensor on the GPU (the graph-safe path: one more
    kernel writes the groups' tensor maps, as DeepGEMM's kernel does in its producer)."""
    from .reference import dequantize_lhs, k_grouped_operand
    torch.manual_seed(k_grouped_seed(groups, m, n, avg_k))
    ks = k_grouped_sizes(groups, m, n, avg_k)
    parts = [_wgrad_operands(m, n, k, device) for k in ks]
    lhs = k_grouped_operand([a for a, _ in parts])
    rhs = k_grouped_operand([b for _, b in parts])
    ref = torch.stack([dequantize_lhs(*p, dtype=torch.float64) @ dequantize_lhs(*q, dtype=torch.float64).T
                       for p, q in parts])
    del parts
    out = torch.zeros((groups, m, n), dtype=torch.float32, device=device)

    sizes = torch.tensor(ks, dtype=torch.int32, device=device) if device_sizes else ks
    ours = _ours("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", lhs, rhs, out, sizes, out=out)

    total_k = sum(ks)
    return Problem(
        suite="k_grouped", label=f"{groups}x{m}x{n} k~{avg_k}" + (" dev" if device_sizes else ""),
        shape={"groups": groups, "m": m, "n": n, "avg_k": avg_k, "ks": ks, "device_sizes": device_sizes},
        flops=2.0 * m * n * total_k, nbytes=float((m + n) * total_k + 8 * groups * m * n),
        deepgemm_us=DEEPGEMM_K_GROUPED_US.get((groups, m, n, avg_k)), deepgemm_tflops=None,
        peers={"ours": ours, "cublaslt": _only_ours("cuBLASLt"), "triton": _only_ours("Triton")},
        check=lambda result: _diff(result, ref), poison=lambda: out.zero_())


def suite_cases(suite: str, quick: bool, shapes: List[tuple]) -> List[Callable]:
    """Deferred problem builders for one suite (built one at a time to bound memory)."""
    if suite == "sweep":
        from .bench_sweep import suite_cases as sweep_cases
        return sweep_cases(quick, make_dense)
    if suite == "bf16":
        from .bench_bf16 import suite_cases as bf16_cases
        return bf16_cases(quick, sys.modules[__name__])     # this module: bench_bf16 does not import it
    if suite == "dense":
        if shapes:
            mnks = list(shapes)
        elif quick:
            mnks = [(m, n, k) for m in (64, 4096) for n, k in DENSE_NKS[:3]]
        else:
            mnks = [(m, n, k) for m in DENSE_MS for n, k in DENSE_NKS]
        return [lambda dev, s=s: make_dense(*s, dev) for s in mnks]
    if suite == "odd":
        mnks = [(m, n, k) for n, k in ODD_NKS for m in (ODD_MS[::3] if quick else ODD_MS)]
        return [lambda dev, s=s: make_dense(*s, dev, suite="odd") for s in mnks]
    if suite == "wgrad":
        dense = list(DEEPGEMM_WGRAD_US)[:2] if quick else list(DEEPGEMM_WGRAD_US)
        grouped = list(DEEPGEMM_K_GROUPED_US)[:1] if quick else list(DEEPGEMM_K_GROUPED_US)
        return ([lambda dev, s=s: make_wgrad(*s, dev) for s in dense] +
                [lambda dev, s=s, on=on: make_k_grouped(*s, dev, on) for s in grouped for on in (False, True)])
    table = {"contiguous": (DEEPGEMM_CONTIGUOUS, make_contiguous), "masked": (DEEPGEMM_MASKED, make_masked)}
    keys, make = table[suite]
    keys = list(keys)[:2] if quick else list(keys)
    return [lambda dev, s=s: make(*s, dev) for s in keys]


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
def _gpu_events(prof) -> List[tuple]:
    """(start µs, duration µs, name) of every GPU activity the profiler saw, in start order."""
    cuda = torch.autograd.DeviceType.CUDA
    found = []
    for e in prof.events():
        if getattr(e, "device_type", None) != cuda:
            continue
        tr = e.time_range
        found.append((tr.start, tr.end - tr.start, e.name))
    found.sort()
    return found


def _profile(fn, repeat: int = 1):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "Profiler clears events at the end of each cycle"
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeat):
                fn()
            torch.cuda.synchronize()
        return _gpu_events(prof)


class Timer:
    """Kernel time of one call from the profiler, with L2 flushed before each call.

    flush="write" (the bench's and ANCHORS.md's method) overwrites FLUSH_BYTES: L2 then holds
    only dirty lines, so a call's reads also pay for writing those back to HBM. flush="read"
    reads FLUSH_BYTES instead (L2 full of clean lines: closer to a serving step, whose previous
    kernels mostly read weights). Both leave nothing of the previous call in L2.
    """

    def __init__(self, device, iters: int, flush: str = "write"):
        self.iters = iters
        self.buf = torch.ones(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        # Candidate flushes with distinct kernel names: the first whose kernels the measured call
        # does not also launch is used, so its kernels can be told apart by name.
        if flush == "write":
            self.flushes = [lambda: self.buf.fill_(7), lambda: self.buf.bitwise_not_(), lambda: self.buf.neg_()]
        elif flush == "read":
            # Row-wise reductions: one kernel each (a full reduction to one value would also
            # memset its semaphores, a "Memset" event that cuBLASLt's calls share).
            rows = self.buf.view(-1, 4096)
            self.flushes = [lambda: rows.sum(dim=1, dtype=torch.int32), lambda: rows.amax(dim=1),
                            lambda: rows.amin(dim=1)]
        else:
            raise ValueError(f"flush must be 'write' or 'read', got {flush!r}")
        self.flush_names = [None] * len(self.flushes)

    def _flush_for(self, own: set):
        for i, flush in enumerate(self.flushes):
            if self.flush_names[i] is None:
                self.flush_names[i] = {name for _, _, name in _profile(flush)}
            if self.flush_names[i] and not (self.flush_names[i] & own):
                return flush, self.flush_names[i]
        raise RuntimeError("cannot tell the L2 flush kernel apart from the measured call's kernels")

    def kernel_us(self, fn) -> tuple:
        """(median µs per call, kernels per call). fn must have run once already (warm-up)."""
        return self.kernel_us_in_turn([fn])[0]

    def kernel_us_in_turn(self, fns) -> list:
        """[(median µs per call, kernels per call)] of each of `fns`, timed in turn within every
        iteration (flush, fns[0], flush, fns[1], ...), so that a drift of the GPU's clocks over the
        run (power, temperature) weighs on each alike. Each fn must have run once already."""
        own_counts, own = [], set()
        for fn in fns:
            events = _profile(fn)
            if not events:
                raise RuntimeError("the call launched no GPU kernel")
            own_counts.append(len(events))
            own |= {name for _, _, name in events}
        flush, flush_names = self._flush_for(own)

        def step():
            for fn in fns:
                flush()
                fn()
        events = _profile(step, self.iters)
        segments, current, in_flush = [], None, False
        for _, dur, name in events:
            if name in flush_names:
                if not in_flush and current is not None:
                    segments.append(current)
                current, in_flush = 0.0, True
            else:
                in_flush = False
                if current is not None:
                    current += dur
        if current is not None:
            segments.append(current)
        if len(segments) != self.iters * len(fns):
            raise RuntimeError(f"profiler returned {len(segments)} calls for {self.iters} iterations of {len(fns)}")
        return [(statistics.median(segments[i::len(fns)]), count) for i, count in enumerate(own_counts)]


def host_overhead_us(fn, calls: int = HOST_CALLS) -> float:
    """Median CPU time to issue one call, `calls` calls back to back, no synchronisation inside."""
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------
def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def measure(problem: Problem, timer: Timer, peers=PEERS, hbm_bytes_per_s: float = HBM_BYTES_PER_S) -> dict:
    """One row: each peer run once and checked (ours into a poisoned out), then the peers that ran
    timed in turn (Timer.kernel_us_in_turn), and their host time per call."""
    floor_us = roofline_floor_s(problem.flops, problem.nbytes, hbm_bytes_per_s) * 1e6
    row = {"suite": problem.suite, "label": problem.label, **problem.shape,
           "flops": problem.flops, "bytes": problem.nbytes, "floor_us": floor_us,
           "deepgemm_us": problem.deepgemm_us, "deepgemm_tflops": problem.deepgemm_tflops, "peers": {}}
    ran = {}
    for peer in peers:
        entry = {"status": "n/a"}
        try:
            fn = problem.peers[peer]()
            if peer == "ours":
                problem.poison()
            result = fn()                      # warm-up (JIT, autotune) and the checked result
            torch.cuda.synchronize()
            diff = problem.check(result)
            entry = {"status": "ok" if diff <= WRONG_DIFF else "WRONG", "diff": diff}
            if getattr(fn, "config", None) is not None:
                entry["config"] = list(fn.config)
            ran[peer] = fn
        except (ImportError, NotImplementedError) as exc:
            entry["reason"] = _short(exc)
        except Exception as exc:               # a peer failing must not end the run
            entry = {"status": "error", "reason": _short(exc)}
        row["peers"][peer] = entry
    for peer, timing in _time_in_turn(timer, ran).items():
        entry = row["peers"][peer]
        if isinstance(timing, BaseException):
            row["peers"][peer] = {"status": "error", "reason": _short(timing)}
            continue
        us, kernels = timing
        entry.update({"us": us, "kernels": kernels, "tflops": problem.flops / us * 1e-6,
                      "pct_floor": 100.0 * floor_us / us, "host_us": host_overhead_us(ran[peer])})
    ours = row["peers"].get("ours", {})
    if ours.get("us") and problem.deepgemm_us:
        if problem.deepgemm_tflops:            # grouped: our row counts differ from DeepGEMM's draw
            row["speedup_vs_deepgemm"] = ours["tflops"] / problem.deepgemm_tflops
        else:
            row["speedup_vs_deepgemm"] = problem.deepgemm_us / ours["us"]
    return row


def _time_in_turn(timer: Timer, fns: dict) -> dict:
    """{peer: (µs, kernels) or the exception}: the peers timed in turn; if that fails (a flush
    that cannot be told apart from some peer's kernels), each alone."""
    try:
        return dict(zip(fns, timer.kernel_us_in_turn(list(fns.values()))))
    except Exception:
        pass
    out = {}
    for peer, fn in fns.items():
        try:
            out[peer] = timer.kernel_us(fn)
        except Exception as exc:
            out[peer] = exc
    return out


def _floor_geomeans(rows: List[dict]) -> dict:
    summary = {}
    for peer in PEERS:
        ok = [r["peers"][peer] for r in rows if r["peers"].get(peer, {}).get("status") == "ok"]
        summary[peer] = {"rows": len(ok), "geomean_pct_floor": geomean(e["pct_floor"] for e in ok)}
    return summary


def summarise(rows: List[dict]) -> dict:
    """Geomeans over the ANCHORS.md inference suites; the odd shapes and the weight gradients get
    their own (summary["odd"], summary["wgrad"])."""
    anchors = [r for r in rows if r["suite"] not in ("odd", "wgrad", "k_grouped", "sweep", *BF16_SUITES)]
    summary = _floor_geomeans(anchors)
    summary["ours"]["geomean_speedup_vs_deepgemm"] = _speedup(anchors)
    odd = [r for r in rows if r["suite"] == "odd"]
    if odd:
        summary["odd"] = _floor_geomeans(odd)
    wgrad = [r for r in rows if r["suite"] in ("wgrad", "k_grouped")]
    if wgrad:
        summary["wgrad"] = {**_floor_geomeans(wgrad)["ours"], "geomean_speedup_vs_deepgemm": _speedup(wgrad),
                            "min_speedup_vs_deepgemm": min((r["speedup_vs_deepgemm"] for r in wgrad
                                                            if r.get("speedup_vs_deepgemm")), default=None)}
    if any(r["suite"] == "sweep" for r in rows):
        from .bench_sweep import sweep_summary
        summary["sweep"] = sweep_summary(rows)
    if any(r["suite"] in BF16_SUITES for r in rows):
        from .bench_bf16 import bf16_summary
        summary["bf16"] = bf16_summary(rows)
    return summary


def _speedup(rows: List[dict]) -> Optional[float]:
    return geomean(r.get("speedup_vs_deepgemm") for r in rows if r["peers"].get("ours", {}).get("status") == "ok")


def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def _peer_cells(entry: dict) -> tuple:
    if entry.get("us") is None:
        return entry.get("status", "n/a"), ""
    mark = "!" if entry["status"] == "WRONG" else ""
    return f"{entry['us']:.1f}", f"{entry['tflops']:.0f}{mark}"


def print_table(rows: List[dict], out=None) -> None:
    out = out or sys.stdout
    head = ("suite", "shape", "ours µs", "TFLOPS", "% floor", "vs DG", "host µs",
            "cuBLASLt µs", "TFLOPS", "Triton µs", "TFLOPS", "check")
    lines = []
    for r in rows:
        ours = r["peers"].get("ours", {})
        us, tf = _peer_cells(ours)
        if ours.get("us") is None:
            check = ours.get("reason", ours.get("status", "n/a"))[:48]
        else:
            check = f"{'ok' if ours['status'] == 'ok' else 'WRONG'} ({ours['diff']:.1e})"
        cu = _peer_cells(r["peers"].get("cublaslt", {}))
        tr = _peer_cells(r["peers"].get("triton", {}))
        lines.append((r["suite"], r["label"], us, tf, _fmt(ours.get("pct_floor"), ".0f", ""),
                      _fmt(r.get("speedup_vs_deepgemm"), ".2f", ""), _fmt(ours.get("host_us"), ".1f", ""),
                      cu[0], cu[1], tr[0], tr[1], check))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    for line in (head, *lines):
        print("  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(line, widths))), file=out)
    print("(! = wrong result: calc_diff > %.0e against float64; vs DG = speedup over DeepGEMM's "
          "ANCHORS.md time)" % WRONG_DIFF, file=out)


def print_summary(summary: dict, out=None) -> None:
    out = out or sys.stdout
    parts = []
    anchors_ran = summary["ours"]["rows"] or not {"sweep", "bf16"} & set(summary)   # (--suite sweep|bf16 run none)
    for peer in PEERS if anchors_ran else ():   # the ANCHORS.md suites
        g = summary[peer]["geomean_pct_floor"]
        pct = "n/a" if g is None else f"{g:.0f}%"
        parts.append(f"{PEER_TITLES[peer]} {pct} of floor ({summary[peer]['rows']} correct rows)")
    sp = summary["ours"]["geomean_speedup_vs_deepgemm"]
    if parts:
        print("geomean: " + "; ".join(parts) + f"; ours vs DeepGEMM {_fmt(sp, '.2f')}x", file=out)
    if "odd" in summary:
        print("odd shapes, geomean: " + "; ".join(
            f"{PEER_TITLES[peer]} {_fmt(summary['odd'][peer]['geomean_pct_floor'], '.0f')}% of floor "
            f"({summary['odd'][peer]['rows']} correct rows)" for peer in PEERS), file=out)
    if "wgrad" in summary:
        w = summary["wgrad"]
        print(f"weight gradients, geomean: ours {_fmt(w['geomean_pct_floor'], '.0f')}% of floor ({w['rows']} correct "
              f"rows); vs DeepGEMM {_fmt(w['geomean_speedup_vs_deepgemm'], '.2f')}x (lowest "
              f"{_fmt(w['min_speedup_vs_deepgemm'], '.2f')}x)", file=out)
    if "sweep" in summary:
        from .bench_sweep import print_sweep_summary
        print_sweep_summary(summary["sweep"], out=out)
    if "bf16" in summary:
        from .bench_bf16 import print_bf16_summary
        print_bf16_summary(summary["bf16"], out=out)


# ---------------------------------------------------------------------------------------------
# Plot (optional: matplotlib).
# ---------------------------------------------------------------------------------------------
def plot(rows: List[dict], path: str, title: str) -> Optional[str]:
    """TFLOPS and % of the roofline floor against M, one column per (N, K). Returns a reason
    when no plot was written."""
    # Dense and odd rows share (N, K) columns; a shape in both is drawn once (the dense row).
    by_shape = {}
    for r in rows:
        if r["suite"] in ("dense", "odd"):
            by_shape.setdefault((r["m"], r["n"], r["k"]), r)
    dense = list(by_shape.values())
    if not dense:
        return "no dense rows to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    pairs = sorted({(r["n"], r["k"]) for r in dense}, key=lambda p: (p[1], p[0]))
    fig, axes = plt.subplots(2, len(pairs), figsize=(3.4 * len(pairs), 6.4), squeeze=False)
    styles = {"ours": ("C0", "-o"), "cublaslt": ("C1", "-s"), "triton": ("C2", "-^")}
    for col, (n, k) in enumerate(pairs):
        sel = sorted((r for r in dense if (r["n"], r["k"]) == (n, k)), key=lambda r: r["m"])
        for peer, (color, style) in styles.items():
            pts = [(r["m"], r["peers"][peer]) for r in sel if r["peers"].get(peer, {}).get("us")]
            if pts:
                ms = [m for m, _ in pts]
                axes[0][col].plot(ms, [e["tflops"] for _, e in pts], style, color=color, label=PEER_TITLES[peer])
                axes[1][col].plot(ms, [e["pct_floor"] for _, e in pts], style, color=color, label=PEER_TITLES[peer])
        dg = [(r["m"], r["flops"] / r["deepgemm_us"] * 1e-6, 100 * r["floor_us"] / r["deepgemm_us"])
              for r in sel if r.get("deepgemm_us")]
        if dg:
            for row, values in ((0, [d[1] for d in dg]), (1, [d[2] for d in dg])):
                axes[row][col].plot([d[0] for d in dg], values, "--x", color="gray",
                                    label=f"DeepGEMM ({ANCHORS_GPU})")
        axes[0][col].set_title(f"N={n}, K={k}", fontsize=9)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M")
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("TFLOPS")
    axes[1][0].set_ylabel("% of roofline floor")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, title, path, dpi=110)
    return None


# ---------------------------------------------------------------------------------------------
# Without a Hopper GPU: exercise the reference path on small shapes.
# ---------------------------------------------------------------------------------------------
def hopper_missing_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return "this torch was built without CUDA"
        return "no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"{torch.cuda.get_device_name()} is sm_{major}{minor}; the kernels need sm_90"
    return None


def run_reference_only(args) -> int:
    from . import reference as ref
    print("dense and grouped reference results (CPU) against a float64 product of the dequantized inputs:")
    rows, bad = [], 0
    gen = torch.Generator().manual_seed(0)

    def record(label, fn, expect):
        nonlocal bad
        t0 = time.perf_counter()
        got = fn()
        ms = (time.perf_counter() - t0) * 1e3
        diff, rel = ref.calc_diff(got, expect), ref.rel_error(got, expect)
        ok = diff <= WRONG_DIFF
        bad += not ok
        rows.append({"label": label, "ms": ms, "diff": diff, "rel_error": rel, "ok": ok})
        print(f"  {label:<34} {ms:8.1f} ms  calc_diff {diff:.1e}  rel_error {rel:.1e}  {'ok' if ok else 'WRONG'}")

    # --shape: those shapes only; else the suite's small shapes ('all': every layout).
    suites = {"dense", "odd", "contiguous", "masked", "wgrad"} if args.suite == "all" else {args.suite}
    dense = [s for suite, shapes in (("dense", [(64, 256, 384)] + ([] if args.quick else [(128, 512, 576)])),
                                     ("odd", [(33, 130, 200)] + ([] if args.quick else [(7, 300, 1000)])))
             if suite in suites for s in shapes]
    if args.shape:
        dense, suites = args.shape, set()
    for m, n, k in dense:
        a, sa = ref.per_token_cast_to_fp8(torch.randn(m, k, generator=gen))
        b, sb = ref.per_block_cast_to_fp8(torch.randn(n, k, generator=gen))
        record(f"dense {m}x{n}x{k}", lambda: ref.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb)), _ref64(a, sa, b, sb))

    groups, n, k, align = 3, 192, 256, 128
    if "contiguous" in suites:
        _reference_contiguous(record, gen, groups, n, k, align)
    if "masked" in suites:
        _reference_masked(record, gen, groups, n, k)
    if "wgrad" in suites:
        _reference_wgrad(record, gen, n, k)
    if "bf16" in suites:
        from .bench_bf16 import reference_checks
        for label, call, expect in reference_checks(sys.modules[__name__]):
            record(label, call, expect)

    with open(args.json, "w") as f:
        json.dump({"mode": "reference-only", "reason": args.no_hopper, "rows": rows}, f, indent=1)
    print(f"wrote {args.json} (no plot: the reference path is not timed)")
    return 1 if bad else 0


def _reference_contiguous(record, gen, groups, n, k, align) -> None:
    from . import reference as ref
    counts = [int(torch.randint(1, align + 1, (1,), generator=gen)) for _ in range(groups)]
    a, sa = ref.per_token_cast_to_fp8(torch.randn(groups * align, k, generator=gen))
    b, sb = ref.per_block_cast_to_fp8(torch.randn(groups, n, k, generator=gen))
    m_indices = torch.full((groups * align,), -1, dtype=torch.int32)
    for g, c in enumerate(counts):
        m_indices[g * align:g * align + c] = g
    out = torch.zeros(groups * align, n, dtype=torch.bfloat16)
    valid = m_indices >= 0
    expect = torch.cat([_ref64(a[g * align:g * align + c], sa[g * align:g * align + c], b[g], sb[g])
                        for g, c in enumerate(counts)])
    record(f"contiguous {groups}x{align} {n}x{k}",
           lambda: ref.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), (b, sb), out, m_indices)[valid], expect)


def _reference_wgrad(record, gen, n, k) -> None:
    from . import reference as ref
    m, ks = 160, [256, 128, 384]
    xs = [ref.per_token_cast_to_fp8(torch.randn(rows, kk, generator=gen)) for rows in (m, n) for kk in ks]
    start = torch.randn(m, n, generator=gen)
    a, b = xs[2], xs[5]
    expect = start.double() + ref.dequantize_lhs(*a, dtype=torch.float64) @ ref.dequantize_lhs(*b, dtype=torch.float64).T
    record(f"wgrad {m}x{n}x{ks[2]}", lambda: ref.gemm_fp8_fp8_nt(a, b, start.clone(), True, True), expect)
    flat = [ref.k_grouped_operand(part) for part in (xs[:3], xs[3:])]
    expect = torch.stack([ref.dequantize_lhs(*p, dtype=torch.float64) @ ref.dequantize_lhs(*q, dtype=torch.float64).T
                          for p, q in zip(xs[:3], xs[3:])])
    record(f"k-grouped {len(ks)}x{m}x{n}", lambda: ref.k_grouped_gemm_fp8_fp8_nt(
        flat[0], flat[1], torch.zeros(len(ks), m, n), ks, True), expect)


def _reference_masked(record, gen, groups, n, k) -> None:
    from . import reference as ref
    b, sb = ref.per_block_cast_to_fp8(torch.randn(groups, n, k, generator=gen))
    max_m = 96
    a, sa = ref.per_token_cast_to_fp8(torch.randn(groups, max_m, k, generator=gen))
    masked = torch.tensor([int(torch.randint(0, max_m + 1, (1,), generator=gen)) for _ in range(groups)],
                          dtype=torch.int32)
    out = torch.zeros(groups, max_m, n, dtype=torch.bfloat16)
    cnt = masked.tolist()
    expect = torch.cat([_ref64(a[g, :c], sa[g, :c], b[g], sb[g]) for g, c in enumerate(cnt)])
    record(f"masked {groups}x{max_m} {n}x{k}",
           lambda: torch.cat([r[:c] for r, c in zip(
               ref.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), (b, sb), out, masked, 64), cnt)]), expect)


# ---------------------------------------------------------------------------------------------
# Host time per call and an MoE layer's training step (--suite host / train_step: bench_host.py).
# ---------------------------------------------------------------------------------------------
def run_host(args) -> int:
    """--suite host (host time per call in issue #24's patterns, then the training step) or
    --suite train_step (the step alone): tables printed, rows written to --json. Exits 0: the
    timings are reported, not judged (the tables mark cells above their targets)."""
    from . import bench_host
    record = {"device": _device_info(), "suite": args.suite}
    if args.suite == "host":
        calls = bench_host.HOST_CALLS // (4 if args.quick else 1)
        dense = bench_host.bench_dense_host(calls=calls)
        other = bench_host.bench_other_host(calls=calls)
        bench_host.print_host(dense, other, calls)
        from .runtime import tma
        record["tensor_maps"] = tma.patching()
        print(f"tensor maps at new addresses: {record['tensor_maps']}")
        print()
        record.update(host_calls=calls, host=dense, host_other=other,
                      host_summary=bench_host.host_summary(dense, other))
    steps = bench_host.bench_train_step()
    bench_host.print_train_step(steps)
    record["train_step"] = steps
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------
def _parse_shape(text: str) -> tuple:
    try:
        m, n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants MxNxK (e.g. 128x7168x2048), got {text!r}")
    if m < 0 or n < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"--shape wants M >= 0, N >= 1, K >= 1, got {text!r}")
    return m, n, k


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deep_gemm bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("dense", "odd", "contiguous", "masked", "wgrad", "casts", "chain", "host",
                                       "train_step", "sweep", "bf16", "all"),
                   default="all",
                   help="which layouts to run ('odd': dense shapes off the usual grid, M from 1 to 4097; 'wgrad': "
                        "the weight-gradient GEMMs, dense and K-grouped, fp32 out accumulated), or the FP8 cast "
                        "kernels, or 'chain': dependent cast/GEMM launches with PDL off and on, or 'host': CPU time "
                        "per call on the same tensors, buffers in rotation, new addresses and changing M, beside "
                        "cuBLASLt, then an MoE layer's training step, or 'train_step': that step alone, or 'sweep': "
                        "popular models' linear layers, M from 1 to 8192, with a summary per M band, or 'bf16': the "
                        "BF16 GEMMs (four dense layouts, grouped contiguous) beside cuBLAS through torch "
                        "(default: all of them but chain, host, train_step, sweep and bf16). Without a Hopper "
                        "GPU: the layouts' reference path only (bf16: our BF16 functions on small CPU shapes)")
    p.add_argument("--shape", type=_parse_shape, action="append", default=[], metavar="MxNxK",
                   help="a dense shape to run instead of the ANCHORS.md ones (repeatable)")
    p.add_argument("--iters", type=int, default=None, help=f"calls timed per shape (default {DEFAULT_ITERS})")
    p.add_argument("--json", default=None, help="where to write the results (default bench.json)")
    p.add_argument("--plot", default=None, help="where to write the plot (default bench.png; GPU only)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated implementations to time, of {', '.join(PEERS)} (default: all)")
    p.add_argument("--flush", choices=("write", "read"), default=None,
                   help="how L2 is flushed before each call: overwrite 256 MB (default, ANCHORS.md's method) "
                        "or read it (clean L2, closer to a serving step); see bench.Timer")
    return p


def _device_info() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # The kernels' code depends on the compiler's version (NVRTC 13.0.88 and 13.5.37 give
    # different SASS for every planner kernel), so the timings name it.
    from .jit.compiler import get_compiler
    try:
        info["jit_compiler"] = get_compiler().identity
    except (RuntimeError, ImportError, OSError) as exc:  # no NVRTC: every row says so too
        info["jit_compiler"] = f"unavailable ({_short(exc)})"
    return info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Options that only time kernels: named when given without a GPU, which refuses them.
    timing_given = [f"--{name}" for name in ("iters", "peers", "flush", "plot") if getattr(args, name) is not None]
    args.json = args.json or "bench.json"
    args.plot = args.plot or "bench.png"
    args.peers = args.peers or ",".join(PEERS)
    args.flush = args.flush or "write"
    if args.shape and args.suite not in ("dense", "all"):
        print("--shape gives dense shapes; use it with --suite dense", file=sys.stderr)
        return 2
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    if not peers or any(p not in PEERS for p in peers) or "ours" not in peers:
        print(f"--peers must list some of {', '.join(PEERS)}, ours included; got {args.peers!r}", file=sys.stderr)
        return 2
    iters = args.iters or (QUICK_ITERS if args.quick else DEFAULT_ITERS)
    if args.suite == "sweep" and not args.iters:
        from .bench_sweep import SWEEP_ITERS
        iters = min(iters, SWEEP_ITERS)
    if iters < 1:
        print("--iters must be >= 1", file=sys.stderr)
        return 2

    args.no_hopper = hopper_missing_reason()
    if args.no_hopper:
        print(f"no Hopper GPU found ({args.no_hopper}): running the reference path on small shapes")
        refused = timing_given + ([f"--suite {args.suite}"] if args.suite in ("casts", "chain", "host", "train_step",
                                                                                  "sweep") else [])
        if refused:
            print(f"{', '.join(refused)}: time the kernels, which needs a Hopper GPU; without one the bench "
                  f"checks the reference path of --suite dense|odd|contiguous|masked|wgrad|bf16|all or --shape, with "
                  f"--quick and --json", file=sys.stderr)
            return 2
        return run_reference_only(args)
    if args.suite == "chain":
        from .bench_chain import run_chain
        return run_chain(sys.modules[__name__], args, iters)
    if args.suite in ("host", "train_step"):
        return run_host(args)

    device = torch.device("cuda", torch.cuda.current_device())
    info = _device_info()
    all_suites = ["dense", "odd", "contiguous", "masked", "wgrad", "casts"]
    suites = ["dense"] if args.shape else (all_suites if args.suite == "all" else [args.suite])
    run_casts = "casts" in suites
    suites = [s for s in suites if s != "casts"]
    from .baselines import cublas_form, triton_available
    form, probe_log = cublas_form(device)
    print(f"{info['gpu']} ({info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}, "
          f"triton {info['triton'] or 'missing'}, JIT {info['jit_compiler']}; {iters} timed calls per shape, "
          f"L2 flushed by {'writing' if args.flush == 'write' else 'reading'} {FLUSH_BYTES >> 20} MB before each")
    print(f"cuBLASLt call: {form or 'n/a'}")
    for line in probe_log:
        print(f"  probe: {line}")
    if not triton_available():
        print("triton is not installed: the Triton column is n/a")
    hbm, hbm_source = hbm_ceiling(device)
    print(f"floor = max(bytes / {hbm / 1e12:.2f} TB/s ({hbm_source}), flops / {FP8_FLOPS_PER_S / 1e15:.1f} PFLOPS)")
    cross_device = ANCHORS_GPU not in info["gpu"]
    if cross_device:
        print(f"note: DeepGEMM's times (vs DG) were measured on an {ANCHORS_GPU}, not on this {info['gpu']}: "
              f"memory-bound rows compare across GPUs")

    timer = Timer(device, iters, flush=args.flush)
    rows = []
    for suite in suites:
        for build in suite_cases(suite, args.quick, args.shape):
            problem = build(device)
            row = measure(problem, timer, peers=peers, hbm_bytes_per_s=hbm)
            rows.append(row)
            ours = row["peers"]["ours"]
            print(f"  {suite:<10} {problem.label:<24} ours {_fmt(ours.get('us'), '.1f', ours.get('status'))} µs",
                  flush=True)
            del problem
            torch.cuda.empty_cache()

    summary = None
    if rows:
        print()
        if args.suite == "bf16":
            from .bench_bf16 import TABLE_TITLE
            print(TABLE_TITLE)
        print_table(rows)
        summary = summarise(rows)
        print_summary(summary)
    cast_rows = []
    if run_casts:
        print()
        from .bench_casts import bench_casts
        cast_rows = bench_casts(sys.modules[__name__], iters=iters, hbm_bytes_per_s=hbm)
    with open(args.json, "w") as f:
        json.dump({"device": info, "iters": iters, "host_calls": HOST_CALLS, "flush_bytes": FLUSH_BYTES,
                   "flush": args.flush,
                   "ceilings": {"hbm_bytes_per_s": hbm, "hbm_source": hbm_source,
                                "fp8_flops_per_s": FP8_FLOPS_PER_S},
                   "deepgemm_cross_device": cross_device,
                   "cublaslt_form": form, "cublaslt_probe": probe_log,
                   "rows": rows, "summary": summary, "casts": cast_rows}, f, indent=1)
    print(f"wrote {args.json}")
    if rows:
        draw = plot
        if args.suite == "sweep":
            from .bench_sweep import plot_sweep as draw
        why = draw(rows, args.plot, f"{info['gpu']}: ours vs cuBLASLt vs Triton (FP8 1x128 / 128x128 scaling)")
        print(f"wrote {args.plot}" if why is None else f"no plot: {why}")
    # A wrong result of ours (or a cast that differs from the reference) fails the run.
    wrong = [r["label"] for r in rows if r["peers"].get("ours", {}).get("status") in ("WRONG", "error")]
    wrong += [r["name"] for r in cast_rows if not r["bit_identical"]]
    if wrong:
        print(f"wrong results: {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
