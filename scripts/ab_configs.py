"""Time the planner's kernel for some shapes against the same kernel with config fields changed, in turn.

    python scripts/ab_configs.py --change block_n=128 --change out_buffers=0 --change pipelined=true \
        --shape wgrad:7168x2112x4096 --shape wgrad:1536x24576x8192

Every kernel of the run is compiled first, in parallel (deep_gemm.jit.precompile). Each shape's
planned config and its variant run through runtime/kernels.prepare_gemm on the same
operands; both results are checked against the float64 reference, then both are timed in turn within
one loop (the bench's Timer: L2 flushed before every call, median), so a drift of the GPU's clocks
weighs on each alike. Kinds: `dense` (bf16 D, B scaled per 128 x 128 block), `wgrad` (fp32 D
accumulated, both operands scaled per row), `kgrouped:G:MxNxK` (G groups of about K tokens each,
as the bench's K-grouped rows draw them), `contig:G:MxNxK` (the M-grouped contiguous layout, G
experts of about M rows each with the bench's group sizes and data, each padded to the layout's
alignment and its padding rows computed with its expert) and `bf16contig:G:MxNxK` (the same layout
in BF16 with the BF16 suite's group sizes; padding rows zero and unchecked). A field of the variant
that changes what fits in shared memory (block_n, out_buffers) gets the most stages that fit. Prints one line per shape:
planned µs, variant µs and variant / planned.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys

import torch

import deep_gemm
from deep_gemm import bench, bench_bf16, plan
from deep_gemm.bench_common import contiguous_seed
from deep_gemm.config import KernelConfig, Layout, max_stages
from deep_gemm.jit.kernel_source import gemm_job
from deep_gemm.jit.precompile import precompile
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs, k_grouped_operand
from deep_gemm.runtime.kernels import device_arch, prepare_gemm


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text)


def _changes(items) -> dict:
    names = {f.name for f in dataclasses.fields(KernelConfig)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names or not value:
            raise SystemExit(f"--change must be FIELD=VALUE with a KernelConfig field, got {item!r}")
        out[name] = _value(value)
    return out


_SMEM_FIELDS = {"block_m", "block_n", "stage_k_blocks", "out_buffers"}


def _variant(config: KernelConfig, changes: dict) -> KernelConfig:
    """config with `changes`; where they change what a stage costs, with the most stages that fit."""
    if "num_stages" in changes or not _SMEM_FIELDS & set(changes):
        return dataclasses.replace(config, **changes)
    variant = dataclasses.replace(config, **changes, num_stages=1)
    cap = plan.BF16_STAGES if variant.bf16_operands else 8 // variant.stage_k_blocks
    return dataclasses.replace(variant, num_stages=max_stages(
        variant.block_m, variant.block_n, cap=cap, stage_k_blocks=variant.stage_k_blocks, out_bytes=variant.out_bytes,
        row_scales_b=variant.row_scales_b, bf16_operands=variant.bf16_operands, out_buffers=variant.out_buffers))


def _time(label: str, config: KernelConfig, changes: dict, prepare, want, timer, checked=lambda out: out) -> str:
    """Both kernels on the same operands (prepare(config) -> (launch, out)), checked (the rows of out
    that `checked` selects against want), then timed in turn."""
    variant = _variant(config, changes)
    runs = [prepare(c) for c in (config, variant)]
    for launch, _ in runs:
        launch.fire()
    torch.cuda.synchronize()
    diffs = [calc_diff(checked(out).double(), want) for _, out in runs]
    (t0, _), (t1, _) = timer.kernel_us_in_turn([launch.fire for launch, _ in runs])
    ok = all(d < 1e-5 for d in diffs)
    return (f"{label}: {config.name} {t0:.1f} us, {variant.name} {t1:.1f} us, variant / planned {t1 / t0:.3f}"
            f"{'' if ok else f'  WRONG (calc_diff {diffs})'}")


def planned(kind: str, *dims: int) -> KernelConfig:
    """The planner's config for a shape of the command line (kind, then its numbers)."""
    num_sms = deep_gemm.get_num_sms()
    if kind == "kgrouped":
        g, m, n = dims[:3]
        return plan.plan_k_grouped(m, n, num_sms, g, accumulate=True)
    if kind in ("contig", "bf16contig"):   # (all rows, N, K, groups)
        m, n, k, g = dims
        if kind == "bf16contig":
            return plan.plan_bf16(m, n, k, num_sms, layout=Layout.CONTIGUOUS, num_groups=g)
        return plan.plan_cached(m, n, k, num_sms, int(Layout.CONTIGUOUS), g, False, False, False)
    wgrad = kind == "wgrad"
    return plan.plan_dense(*dims, num_sms, row_scales_b=wgrad, out_fp32=wgrad, accumulate=wgrad)


def run_k_grouped(g: int, m: int, n: int, avg_k: int, changes: dict, timer) -> str:
    num_sms = deep_gemm.get_num_sms()
    ks = bench.k_grouped_sizes(g, m, n, avg_k)
    parts = [bench._wgrad_operands(m, n, k, "cuda") for k in ks]
    (a, sa), (b, sb) = k_grouped_operand([p for p, _ in parts]), k_grouped_operand([q for _, q in parts])
    want = torch.stack([dequantize_lhs(*p, dtype=torch.float64) @ dequantize_lhs(*q, dtype=torch.float64).T
                        for p, q in parts])
    del parts
    config = planned("kgrouped", g, m, n)

    def prepare(c):
        out = torch.zeros(g, m, n, device="cuda")
        return prepare_gemm(c, a=a, a_rows=m, sa=sa.T, sa_rows=m, b=b, b_rows=n, sb=sb.T, out=out, out_rows=m,
                            shape_m=m, group_info=None, num_sms=num_sms, k_sizes=tuple(ks)), out
    return _time(f"kgrouped {g}x{m}x{n} k~{avg_k}", config, changes, prepare, want, timer)


def run_contiguous(g: int, m_per_group: int, n: int, k: int, changes: dict, timer) -> str:
    num_sms = deep_gemm.get_num_sms()
    torch.manual_seed(contiguous_seed(g, m_per_group, n, k))
    padded = _padded(_group_sizes("contig", g, m_per_group, n, k))
    m = sum(padded)
    (a, sa), (b, sb) = bench._cast_pair(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                                        torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16))
    index = torch.repeat_interleave(torch.arange(g, dtype=torch.int32), torch.tensor(padded)).cuda()
    lhs = dequantize_lhs(a, sa, dtype=torch.float64).split(padded)
    want = torch.cat([rows @ dequantize_rhs(b[i], sb[i], dtype=torch.float64).T for i, rows in enumerate(lhs)])
    config = planned("contig", m, n, k, g)

    def prepare(c):
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        return prepare_gemm(c, a=a, a_rows=m, sa=sa, sa_rows=m, b=b.view(g * n, k), b_rows=g * n, sb=sb, out=out,
                            out_rows=m, shape_m=m, group_info=index, num_sms=num_sms), out
    return _time(f"contig {g}x{m_per_group}x{n}x{k} ({m} rows)", config, changes, prepare, want, timer)


def run_bf16_contiguous(g: int, m_per_group: int, n: int, k: int, changes: dict, timer) -> str:
    """The BF16 suite's contiguous case (its group sizes; padding rows unchecked)."""
    num_sms = deep_gemm.get_num_sms()
    counts = _group_sizes("bf16contig", g, m_per_group, n, k)
    index, valid = bench_bf16.contiguous_layout(counts, deep_gemm.get_m_alignment_for_contiguous_layout(), "cuda")
    m = index.numel()
    a = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    a[valid] = torch.randn(valid.numel(), k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16)
    want = torch.cat([rows.double() @ b[i].double().T for i, rows in enumerate(a[valid].split(counts))])
    config = planned("bf16contig", m, n, k, g)

    def prepare(c):
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        return prepare_gemm(c, a=a, a_rows=m, sa=None, sa_rows=0, b=b.view(g * n, k), b_rows=g * n, sb=None, out=out,
                            out_rows=m, shape_m=m, group_info=index, num_sms=num_sms), out
    return _time(f"bf16contig {g}x{m_per_group}x{n}x{k} ({m} rows)", config, changes, prepare, want, timer,
                 checked=lambda out: out[valid])


def run_shape(kind: str, m: int, n: int, k: int, changes: dict, timer) -> str:
    num_sms = deep_gemm.get_num_sms()
    wgrad = kind == "wgrad"
    a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    cast_b = deep_gemm.per_token_cast_to_fp8 if wgrad else deep_gemm.per_block_cast_to_fp8
    b = cast_b(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    want = dequantize_lhs(*a, dtype=torch.float64) @ (dequantize_lhs if wgrad else dequantize_rhs)(
        *b, dtype=torch.float64).T
    config = planned(kind, m, n, k)

    def prepare(c):
        out = torch.zeros(m, n, device="cuda") if wgrad else torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        return prepare_gemm(c, a=a[0], a_rows=m, sa=a[1], sa_rows=m, b=b[0], b_rows=n, sb=b[1], out=out, out_rows=m,
                            shape_m=m, group_info=None, num_sms=num_sms), out
    return _time(f"{kind} {m}x{n}x{k}", config, changes, prepare, want, timer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE", required=True)
    p.add_argument("--shape", action="append", default=[], metavar="dense:MxNxK|wgrad:MxNxK|kgrouped:G:MxNxK",
                   required=True)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    changes = _changes(args.change)
    shapes = [_parse(shape) for shape in args.shape]
    # Every kernel both ways first, in parallel, so that the loop below only loads them.
    arch = device_arch(torch.cuda.current_device())
    configs = [planned(kind, *_plan_dims(kind, dims)) for kind, dims in shapes]
    precompile([gemm_job(c, arch) for config in configs for c in (config, _variant(config, changes))])
    timer = bench.Timer("cuda", args.iters)
    for kind, dims in shapes:
        run = {"kgrouped": run_k_grouped, "contig": run_contiguous, "bf16contig": run_bf16_contiguous}.get(kind) \
            or functools.partial(run_shape, kind)
        print(run(*dims, changes, timer), flush=True)
    return 0


def _parse(shape: str) -> tuple:
    """(kind, numbers) of one --shape."""
    match = re.fullmatch(r"(dense|wgrad):(\d+)x(\d+)x(\d+)", shape) or re.fullmatch(
        r"(kgrouped|contig|bf16contig):(\d+):(\d+)x(\d+)x(\d+)", shape)
    if not match:
        raise SystemExit(f"--shape must be dense:MxNxK, wgrad:MxNxK, kgrouped:G:MxNxK, contig:G:MxNxK or "
                         f"bf16contig:G:MxNxK, got {shape!r}")
    return match.group(1), tuple(map(int, match.groups()[1:]))


def _group_sizes(kind: str, g: int, m_per_group: int, n: int, k: int) -> list:
    """A contiguous case's group sizes as its bench suite draws them (FP8 or BF16)."""
    if kind == "bf16contig":
        return bench_bf16.group_sizes(bench, g, m_per_group, n, k)
    return bench._draw_counts(g, m_per_group, contiguous_seed(g, m_per_group, n, k))


def _padded(counts: list) -> list:
    align = deep_gemm.get_m_alignment_for_contiguous_layout()
    return [-(-c // align) * align for c in counts]


def _plan_dims(kind: str, dims: tuple) -> tuple:
    """planned()'s numbers for a --shape's: a contiguous case's rows are its padded group sizes' sum."""
    if kind not in ("contig", "bf16contig"):
        return dims
    g, m_per_group, n, k = dims
    return sum(_padded(_group_sizes(kind, g, m_per_group, n, k))), n, k, g


if __name__ == "__main__":
    sys.exit(main())
