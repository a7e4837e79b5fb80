"""`python -m deep_gemm bench --suite bf16`: our BF16 GEMMs beside cuBLAS (through torch) on the
ANCHORS.md BF16 shapes, in one run.

Rows: the four dense layouts (nt, nn, tn, tt; bf16 out) over the FP8 dense grid, NT with an fp32 out
at decode sizes, the grouped contiguous layout over the FP8 contiguous table's group sizes, and the
masked layout over the FP8 masked table's.
Every row is a bench.Problem timed by bench.measure, so the method, the table and the JSON rows are
the bench's own; the cuBLASLt column holds cuBLAS through torch (torch.matmul on the same operand
layout; torch._grouped_mm, or one torch.matmul per expert, on the contiguous rows; one torch.matmul
per expert on each group's valid rows, masked) and Triton is n/a.
Correctness: calc_diff against a float64 product of the bf16 inputs.

This module adds the builders, the summary (ours / cuBLAS speed per layout, per M band and for the
grouped rows) and the small CPU shapes that the run without a Hopper GPU checks. bench imports it, so
it does not import bench back: the functions that make Problems are handed the bench module (as
bench_sweep is handed bench.make_dense), and read its ANCHORS.md grid there.
"""
from __future__ import annotations

import functools
import itertools
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .bench_common import contiguous_seed, geomean, k_grouped_seed, masked_seed

SUITES = ("bf16", "bf16_grouped", "bf16_masked", "bf16_k_grouped")  # the rows' suite names
LAYOUTS = ("nt", "nn", "tn", "tt")              # DeepGEMM's letters: t = the operand is given MN-major
FP32_MS = (64, 128)                             # NT with an fp32 out: decode sizes, where out bytes are few
FP32_NKS = ((7168, 2048), (4096, 7168), (2112, 7168))
# The dense rows take bench.DENSE_MS x bench.DENSE_NKS, the grouped ones the (groups, M per group,
# N, K) of bench.DEEPGEMM_CONTIGUOUS with that suite's group sizes: ANCHORS.md's BF16 tables do.
GROUP_ROWS = 16                                 # group sizes rounded to this (torch._grouped_mm's row alignment)
SMALL_M = 128                                   # the summary's M bands: M <= SMALL_M (decode) and above

# Without a Hopper GPU: the same builders on tiny shapes, our functions' CPU path checked.
CPU_DENSE = ((64, 256, 384),)                   # (M, N, K), every layout
CPU_FP32 = ((32, 128, 256),)
CPU_GROUPED = ((3, 48, 192, 256),)              # (groups, M per group, N, K)
CPU_MASKED = ((3, 32, 64, 128),)                # (groups, expected M, N, K)
CPU_K_GROUPED = ((3, 40, 24, 256),)             # (groups, M, N, average K)

TABLE_TITLE = ("BF16: the cuBLASLt column is cuBLAS through torch.matmul on the same operand layout, bf16 out "
               "(also on the 'fp32' rows, where ours writes fp32), and torch._grouped_mm or one torch.matmul per "
               "expert on the grouped rows; no Triton peer. % floor takes the FP8 compute ceiling (BF16 tensor "
               "cores peak at about half of it).")


@dataclass
class Case:
    """One row before bench makes it a Problem (Case.problem): what is timed, the float64 reference
    and the part of a result compared with it (the run without a GPU checks our call with these)."""
    suite: str
    label: str
    shape: dict
    flops: float
    nbytes: float
    ours: tuple                                 # (deep_gemm function name, its arguments)
    cublas: Callable                            # the cuBLASLt slot's prepare()
    out: torch.Tensor                           # what our call writes
    ref: torch.Tensor
    checked: Callable = lambda result: result   # result of a peer -> the rows compared with ref

    def problem(self, bench):
        """bench.Problem of this row; `bench` is the deep_gemm.bench module."""
        name, args = self.ours
        return bench.Problem(
            suite=self.suite, label=self.label, shape=self.shape, flops=self.flops, nbytes=self.nbytes,
            deepgemm_us=None, deepgemm_tflops=None,
            peers={"ours": bench._ours(name, *args, out=self.out), "cublaslt": self.cublas,
                   "triton": _unavailable("no Triton BF16 peer in this suite")},
            check=lambda result: bench._diff(self.checked(result), self.ref),
            poison=lambda: self.out.fill_(float("nan")))


def _prepared(fn: Callable, *args, **kwargs) -> Callable:
    """A peer's prepare() for a call that needs no set-up."""
    return lambda: functools.partial(fn, *args, **kwargs)


def _unavailable(reason: str) -> Callable:
    def prepare():
        raise NotImplementedError(reason)
    return prepare


# ---------------------------------------------------------------------------------------------
# Dense.
# ---------------------------------------------------------------------------------------------
def make_bf16_dense(layout: str, m: int, n: int, k: int, device, out_dtype=torch.bfloat16) -> Case:
    """d [M, N] = op(a) @ op(b) through deep_gemm.bf16_gemm_<layout>, a given [M, K] or [K, M] and b
    [N, K] or [K, N] as the layout says; cuBLAS gets the same tensors, transposed views where needed."""
    from .reference import bf16_gemm
    torch.manual_seed(m * 1_000_003 + n * 1009 + k + LAYOUTS.index(layout))
    a_mk = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b_nk = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    a = a_mk.T.contiguous() if layout[0] == "t" else a_mk
    b = b_nk.T.contiguous() if layout[1] == "n" else b_nk
    ref = bf16_gemm(a, b, torch.empty(m, n, dtype=torch.float64, device=device), layout)
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    fp32 = out_dtype == torch.float32
    return Case(
        "bf16", f"{layout} {m}x{n}x{k}" + (" fp32" if fp32 else ""),
        {"layout": layout, "m": m, "n": n, "k": k, "out": "fp32" if fp32 else "bf16"},
        flops=2.0 * m * n * k, nbytes=float(2 * (m * k + n * k) + out.element_size() * m * n),
        ours=(f"bf16_gemm_{layout}", (a, b, out)),
        cublas=_prepared(torch.matmul, a.T if layout[0] == "t" else a, b if layout[1] == "n" else b.T),
        out=out, ref=ref)


# ---------------------------------------------------------------------------------------------
# Grouped, contiguous layout.
# ---------------------------------------------------------------------------------------------
def group_sizes(bench, groups: int, m_per_group: int, n: int, k: int) -> List[int]:
    """The FP8 contiguous suite's draw (bench.make_contiguous' seed), each rounded to GROUP_ROWS."""
    counts = bench._draw_counts(groups, m_per_group, contiguous_seed(groups, m_per_group, n, k))
    return [(c + GROUP_ROWS // 2) // GROUP_ROWS * GROUP_ROWS for c in counts]


def contiguous_layout(counts: List[int], align: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m_indices, valid_rows): each group's rows padded to a multiple of `align` (padding -1), and
    the index of every valid row in the padded layout, group after group."""
    padded = [-(-c // align) * align for c in counts]
    starts = [0, *itertools.accumulate(padded)][:-1]
    valid_rows = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts)])
    m_indices = torch.full((sum(padded),), -1, dtype=torch.int32)
    m_indices[valid_rows] = torch.arange(len(counts), dtype=torch.int32).repeat_interleave(torch.tensor(counts))
    return m_indices.to(device), valid_rows.to(device)


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device) -> bool:
    """Whether this torch has torch._grouped_mm and it runs bf16 operands on `device` (older torch
    lacks it; on CUDA it wants a recent GPU)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    a = torch.randn(2 * GROUP_ROWS, 64, device=device, dtype=torch.bfloat16)
    b = torch.randn(2, 32, 64, device=device, dtype=torch.bfloat16)
    offs = torch.tensor([GROUP_ROWS, 2 * GROUP_ROWS], dtype=torch.int32, device=device)
    try:
        torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _per_expert(a_valid: torch.Tensor, b: torch.Tensor, counts: List[int], out_valid: torch.Tensor) -> Callable:
    """cuBLAS without a grouped call: one torch.matmul per expert into its rows of out_valid."""
    parts = list(zip(a_valid.split(counts), b, out_valid.split(counts)))

    def call():
        for x, w, y in parts:
            torch.matmul(x, w.T, out=y)
        return out_valid
    return lambda: call


def make_bf16_contiguous(groups: int, m_per_group: int, n: int, k: int, counts: List[int], device) -> Case:
    """deep_gemm.m_grouped_bf16_gemm_nt_contiguous on the padded layout beside cuBLAS on the valid
    rows alone, packed (the grouped peers need no padding, so they are not charged for it); counts:
    each group's rows."""
    from .api import get_m_alignment_for_contiguous_layout
    from .reference import m_grouped_bf16_gemm_nt_contiguous
    valid = sum(counts)
    m_indices, valid_rows = contiguous_layout(counts, get_m_alignment_for_contiguous_layout(), device)
    torch.manual_seed(contiguous_seed(groups, m_per_group, n, k))
    a_valid = torch.randn(valid, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, device=device, dtype=torch.bfloat16)
    a = torch.zeros(m_indices.numel(), k, device=device, dtype=torch.bfloat16)
    a[valid_rows] = a_valid
    ref = m_grouped_bf16_gemm_nt_contiguous(
        a, b, torch.zeros(m_indices.numel(), n, dtype=torch.float64, device=device), m_indices)[valid_rows]
    out = torch.empty((m_indices.numel(), n), dtype=torch.bfloat16, device=device)
    if grouped_mm_runs(device):
        peer = "torch._grouped_mm"
        offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)
        cublas = _prepared(torch._grouped_mm, a_valid, b.transpose(-2, -1), offs=offs)
    else:
        peer = "torch.matmul per expert"
        cublas = _per_expert(a_valid, b, counts, torch.empty(valid, n, dtype=torch.bfloat16, device=device))
    return Case(
        "bf16_grouped", f"grouped {groups}x{m_per_group} {n}x{k}",
        {"groups": groups, "m_per_group": m_per_group, "n": n, "k": k, "m_total": m_indices.numel(),
         "valid_m": valid, "cublas_peer": peer},
        flops=2.0 * valid * n * k, nbytes=float(2 * (valid * k + groups * n * k) + 2 * valid * n),
        ours=("m_grouped_bf16_gemm_nt_contiguous", (a, b, out, m_indices)),
        cublas=cublas, out=out, ref=ref,
        # ours returns the padded layout, the peers the valid rows packed
        checked=lambda result: result[valid_rows] if result.shape[0] != valid else result)


# ---------------------------------------------------------------------------------------------
# Grouped, masked layout.
# ---------------------------------------------------------------------------------------------
def masked_sizes(bench, groups: int, expected_m: int, n: int, k: int) -> Tuple[int, List[int]]:
    """(max_m, each group's valid rows) as the FP8 masked suite draws them (bench.make_masked)."""
    return bench.masked_sizes(groups, expected_m, n, k)


def make_bf16_masked(groups: int, expected_m: int, n: int, k: int, sizes: Tuple[int, List[int]], device) -> Case:
    """deep_gemm.m_grouped_bf16_gemm_nt_masked beside cuBLAS on each group's valid rows alone (one
    torch.matmul per expert, the counts known on the host); sizes: masked_sizes(...)."""
    max_m, counts = sizes
    torch.manual_seed(masked_seed(groups, expected_m, n, k))
    a = torch.randn(groups, max_m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, device=device, dtype=torch.bfloat16)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    valid = sum(counts)
    a_valid = torch.cat([a[g, :c] for g, c in enumerate(counts)])
    ref = torch.cat([a[g, :c].double() @ b[g].double().T for g, c in enumerate(counts)])
    out = torch.empty((groups, max_m, n), dtype=torch.bfloat16, device=device)
    return Case(
        "bf16_masked", f"masked {groups}x{expected_m} {n}x{k}",
        {"groups": groups, "expected_m": expected_m, "n": n, "k": k, "max_m": max_m, "valid_m": valid},
        flops=2.0 * valid * n * k, nbytes=float(2 * (valid * k + groups * n * k) + 2 * valid * n),
        ours=("m_grouped_bf16_gemm_nt_masked", (a, b, out, masked_m, expected_m)),
        cublas=_per_expert(a_valid, b, counts, torch.empty(valid, n, dtype=torch.bfloat16, device=device)),
        out=out, ref=ref,
        # ours returns the [G, max_m, N] layout, the peer the valid rows packed
        checked=lambda result: torch.cat([result[g, :c] for g, c in enumerate(counts)]) if result.dim() == 3
        else result)


# ---------------------------------------------------------------------------------------------
# K-grouped (weight gradients).
# ---------------------------------------------------------------------------------------------
def make_bf16_k_grouped(groups: int, m: int, n: int, avg_k: int, ks: List[int], device) -> Case:
    """deep_gemm.k_grouped_bf16_gemm_tn_contiguous (d [G, M, N] fp32 = a_g^T b_g, each group's K of
    ks) beside cuBLAS on one dense GEMM of the same total size ([M, sum K] x [sum K, N], bf16 out):
    the dense rate the K-grouped call is held to. Both are checked summed over the groups against
    an fp32 product of the bf16 inputs (exact products; float64 costs seconds a row here)."""
    torch.manual_seed(k_grouped_seed(groups, m, n, avg_k))
    total = sum(ks)
    a = torch.randn(total, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(total, n, device=device, dtype=torch.bfloat16)
    ref = (a.T.float() @ b.float()).double()
    out = torch.empty((groups, m, n), dtype=torch.float32, device=device)
    layout = torch.tensor(ks, dtype=torch.int32, device=device)
    return Case(
        "bf16_k_grouped", f"k-grouped {groups}x{m}x{n} k~{avg_k}", {"groups": groups, "m": m, "n": n, "avg_k": avg_k,
                                                                    "ks": ks},
        flops=2.0 * m * n * total, nbytes=float(2 * (m + n) * total + 4 * groups * m * n),
        ours=("k_grouped_bf16_gemm_tn_contiguous", (a, b, out, ks, layout)),
        cublas=_prepared(torch.matmul, a.T, b), out=out, ref=ref,
        checked=lambda result: result.sum(0) if result.dim() == 3 else result)


# ---------------------------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------------------------
def makers(bench, dense, fp32, grouped, masked, k_grouped) -> List[Callable]:
    """device -> Case, for every layout on each dense (M, N, K), NT with an fp32 out on each of
    `fp32`, a grouped row per (groups, M per group, N, K), a masked row per (groups, expected M,
    N, K) and a K-grouped row per (groups, M, N, average K)."""
    return ([functools.partial(make_bf16_dense, lay, *s) for lay in LAYOUTS for s in dense] +
            [functools.partial(make_bf16_dense, "nt", *s, out_dtype=torch.float32) for s in fp32] +
            [functools.partial(make_bf16_contiguous, *s, group_sizes(bench, *s)) for s in grouped] +
            [functools.partial(make_bf16_masked, *s, masked_sizes(bench, *s)) for s in masked] +
            [functools.partial(make_bf16_k_grouped, *s, bench.k_grouped_sizes(*s)) for s in k_grouped])


def cases(bench, dense, fp32, grouped, masked, k_grouped) -> List[Callable]:
    """Deferred Problem builders (bench.suite_cases' form) of makers(...)."""
    return [lambda dev, make=make: make(device=dev).problem(bench)
            for make in makers(bench, dense, fp32, grouped, masked, k_grouped)]


def suite_cases(quick: bool, bench) -> List[Callable]:
    """The suite's builders; quick: two Ms on two (N, K) pairs, one fp32 row and the two grouped
    extremes of each grouped layout (few large groups, many small ones). bench: the deep_gemm.bench
    module."""
    ms, nks = bench.DENSE_MS, bench.DENSE_NKS
    grouped, masked = list(bench.DEEPGEMM_CONTIGUOUS), list(bench.DEEPGEMM_MASKED)
    k_grouped = list(bench.DEEPGEMM_K_GROUPED_US)
    if quick:
        return cases(bench, [(m, n, k) for m in (ms[0], ms[-1]) for n, k in nks[:2]],
                     [(FP32_MS[0], *FP32_NKS[0])], [grouped[0], grouped[-1]], [masked[0], masked[-1]],
                     [k_grouped[0], k_grouped[-1]])
    return cases(bench, [(m, n, k) for m in ms for n, k in nks],
                 [(m, n, k) for m in FP32_MS for n, k in FP32_NKS], grouped, masked, k_grouped)


def reference_checks(bench) -> List[tuple]:
    """(label, call, expected) of our functions on the CPU_* shapes on the CPU, for the run without a
    Hopper GPU (bench.run_reference_only, which passes itself as `bench`). Our output is poisoned
    first, so a call that writes nothing fails."""
    checks = []
    for make in makers(bench, CPU_DENSE, CPU_FP32, CPU_GROUPED, CPU_MASKED, CPU_K_GROUPED):
        case = make(device=torch.device("cpu"))
        problem = case.problem(bench)
        problem.poison()
        call = problem.peers["ours"]()
        checks.append((f"bf16 {case.label}", lambda c=case, f=call: c.checked(f()), case.ref))
    return checks


# ---------------------------------------------------------------------------------------------
# Summary (pure: rows as bench.measure returns them).
# ---------------------------------------------------------------------------------------------
def _speed_vs_cublas(row: dict) -> Optional[float]:
    """cuBLAS time / ours (> 1: ours is faster) when both results are correct, else None."""
    ours, peer = (row["peers"].get(p, {}) for p in ("ours", "cublaslt"))
    if ours.get("status") != "ok" or peer.get("status") != "ok" or not ours.get("us") or not peer.get("us"):
        return None
    return peer["us"] / ours["us"]


def _ratio(rows: List[dict]) -> dict:
    speeds = [s for s in map(_speed_vs_cublas, rows) if s is not None]
    return {"rows": len(speeds), "of": len(rows), "geomean_speed_vs_cublas": geomean(speeds)}


def bf16_summary(rows: List[dict]) -> dict:
    """summary["bf16"]: geomean of ours / cuBLAS speed per layout (fp32-out rows apart), per M band of
    the bf16-out rows, over the grouped rows (with the grouped peers that ran), the masked rows and
    the K-grouped rows (against one dense GEMM of their size)."""
    dense = [r for r in rows if r.get("suite") == "bf16"]
    bf16_out = [r for r in dense if r.get("out") == "bf16"]
    grouped = [r for r in rows if r.get("suite") == "bf16_grouped"]
    masked = [r for r in rows if r.get("suite") == "bf16_masked"]
    small = [r["peers"]["ours"]["pct_floor"] for r in masked if r["expected_m"] <= SMALL_M
             and r["peers"].get("ours", {}).get("status") == "ok" and r["peers"]["ours"].get("pct_floor")]
    return {
        "layouts": {lay: _ratio([r for r in bf16_out if r["layout"] == lay]) for lay in LAYOUTS},
        "nt_fp32_out": _ratio([r for r in dense if r.get("out") == "fp32"]),
        "bands": {f"M<={SMALL_M}": _ratio([r for r in bf16_out if r["m"] <= SMALL_M]),
                  f"M>{SMALL_M}": _ratio([r for r in bf16_out if r["m"] > SMALL_M])},
        "grouped": dict(_ratio(grouped), peers=sorted({r.get("cublas_peer", "?") for r in grouped})),
        "masked": dict(_ratio(masked), small_rows=len(small), small_pct_floor=geomean(small)),
        "k_grouped": _ratio([r for r in rows if r.get("suite") == "bf16_k_grouped"]),
    }


def _cell(name: str, ratio: dict) -> str:
    g = ratio["geomean_speed_vs_cublas"]
    return f"{name} {'n/a' if g is None else f'{g:.2f}x'} ({ratio['rows']}/{ratio['of']})"


def print_bf16_summary(s: dict, out=None) -> None:
    out = out or sys.stdout
    print("bf16, ours vs cuBLAS: geomean of cuBLAS time / ours (> 1: ours faster; rows where both are correct / "
          "rows):", file=out)
    print("  " + "; ".join([_cell(lay, s["layouts"][lay]) for lay in LAYOUTS] +
                           [_cell("nt fp32 out", s["nt_fp32_out"])]), file=out)
    print("  " + "; ".join(_cell(band, ratio) for band, ratio in s["bands"].items())
          + "; " + _cell(f"grouped vs {' / '.join(s['grouped']['peers']) or 'n/a'}", s["grouped"]), file=out)
    masked = s.get("masked")
    if masked and masked["of"]:
        pct = masked["small_pct_floor"]
        print("  " + _cell("masked vs torch.matmul per expert", masked) + f"; masked, expected M <= {SMALL_M}: "
              f"ours {'n/a' if pct is None else f'{pct:.0f}%'} of the floor ({masked['small_rows']} rows)", file=out)
    k_grouped = s.get("k_grouped")
    if k_grouped and k_grouped["of"]:
        print("  " + _cell("k-grouped vs one dense torch.matmul of the same size", k_grouped), file=out)
