"""Host time of the calls (`bench --suite host`) and of an MoE layer's training step (`--suite train_step`).

--suite host: CPU time to issue one call, median over HOST_CALLS calls back to back without a sync, in
the four call patterns of issue #24, for our dense GEMM beside cuBLASLt (torch._scaled_mm, through
baselines.prepare_cublas) on the issue's shapes:
  same       the same tensors every call (our launch cache),
  rotation   ROTATION buffers of A, its scales and out in turn (each seen before),
  new        tensors at addresses not seen before, same shapes (our launch templates),
  m_change   M moving over 8 batch sizes with new scale tensors every call (A and out views of one
             buffer; each size seen before).
Every tensor is allocated before the timing: the "new" tensors are views of one buffer at distinct
offsets (their values are never checked here). Then the same and new patterns of the other public
GEMMs and casts, ours only.

--suite train_step: the GEMMs of one MoE layer's forward and backward with DeepSeek-V3's expert shapes
and the casts that feed them, on new tensors every step: per step, host time to issue it and GPU time to
run it (the GPU given a head start, so that it never waits for the host); the host keeps ahead when its
time per step is below the GPU's.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

HOST_SHAPES = ((64, 7168, 2048), (128, 2112, 7168), (4096, 7168, 2048), (1000, 4096, 7168))
PATTERNS = ("same", "rotation", "new", "m_change")
PATTERN_TITLES = {"same": "same tensors", "rotation": "8 in rotation", "new": "new addresses",
                  "m_change": "M changing"}
TARGET_US = {"same": 5.0, "rotation": 5.0, "new": 10.0, "m_change": 10.0}   # issue #24, ours
HOST_CALLS = 200
ROTATION = 8
M_SIZES = 8
FP8 = torch.float8_e4m3fn


# ---- timing ---------------------------------------------------------------------------------------
def per_call_us(calls: Sequence[Callable[[], object]]) -> dict:
    """CPU time of each call, issued back to back (no sync between them): median and mean µs."""
    torch.cuda.synchronize()
    times = []
    for fn in calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return {"median_us": statistics.median(times) * 1e6, "mean_us": statistics.fmean(times) * 1e6}


# ---- tensors at distinct addresses, allocated up front ------------------------------------------------
def views(shape: tuple, dtype, count: int, device, strides: Optional[tuple] = None, step_bytes: int = 256) -> list:
    """`count` tensors of `shape` (and `strides`), each at its own address, step_bytes apart in one
    buffer (they overlap: only their addresses and layout matter here). Values: 1.0 (fp8) or zeros,
    so a kernel reading them meets no NaN."""
    element = torch.empty(0, dtype=dtype).element_size()
    strides = strides or torch.empty(shape, device="meta").stride()
    extent = (1 + sum((s - 1) * st for s, st in zip(shape, strides))) * element
    raw = torch.full((extent + step_bytes * count,), 0x38 if dtype == FP8 else 0, dtype=torch.uint8,
                     device=device)                             # fp8: 1.0 in e4m3; else zeros
    out = []
    for i in range(count):
        start = i * step_bytes
        flat = raw[start:start + extent]
        out.append(flat.view(dtype).as_strided(shape, strides))
    return out


def col_major_scales(m: int, kb: int, count: int, device) -> list:
    """`count` fp32 scale tensors [m, kb] in the column-major TMA-aligned layout, distinct addresses."""
    return views((m, kb), torch.float32, count, device, strides=(1, (m + 3) // 4 * 4))


def batch_sizes(m: int, count: int = M_SIZES) -> List[int]:
    """`count` batch sizes from m down, multiples of 8 where m allows (cuBLASLt's scales want M % 4 == 0)."""
    step = max(8, m // count // 8 * 8)
    return [max(8, m - i * step) for i in range(count)]


# ---- the dense patterns, ours and cuBLASLt -----------------------------------------------------------
def _dense_calls(m: int, n: int, k: int, device, calls: int) -> Dict[str, Dict[str, list]]:
    """{peer: {pattern: [zero-argument calls]}} for one shape; every tensor made here."""
    import deep_gemm
    from .baselines import prepare_cublas
    gemm = deep_gemm.gemm_fp8_fp8_bf16_nt
    kb = (k + 127) // 128
    b, sb = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device=device, dtype=torch.bfloat16))
    rhs = (b, sb)

    def operand_sets(rows: int, count: int):
        return list(zip(views((rows, k), FP8, count, device), col_major_scales(rows, kb, count, device),
                        views((rows, n), torch.bfloat16, count, device)))

    sets = {"same": operand_sets(m, 1), "rotation": operand_sets(m, ROTATION), "new": operand_sets(m, calls + 1)}
    ms = batch_sizes(m)
    a_all, out_all = torch.ones(m, k, device=device).to(FP8), torch.empty(m, n, device=device, dtype=torch.bfloat16)
    per_m = calls // len(ms) + 2
    scales = {mm: col_major_scales(mm, kb, per_m, device) for mm in ms}
    # The M pattern: each size once (warm-up), then sizes in turn, every call with scales never used.
    sets["m_change"] = [(a_all[:mm], scales[mm][0], out_all[:mm]) for mm in ms] + \
        [(a_all[:ms[i % len(ms)]], scales[ms[i % len(ms)]][1 + i // len(ms)], out_all[:ms[i % len(ms)]])
         for i in range(calls)]
    ours = {p: [lambda a=a, sa=sa, out=out: gemm((a, sa), rhs, out) for a, sa, out in s] for p, s in sets.items()}
    try:
        cublas = {p: [prepare_cublas(a, sa, b, sb) for a, sa, _ in s] for p, s in sets.items()}
    except NotImplementedError as exc:
        cublas = {"unavailable": str(exc)}
    return {"ours": ours, "cublaslt": cublas}


def _run_patterns(calls_by_pattern: dict, calls: int) -> dict:
    """{pattern: timing}: warm-up (the first call or set of each pattern once, twice for rotation),
    then `calls` calls of the pattern."""
    out = {}
    for pattern in PATTERNS:
        fns = calls_by_pattern.get(pattern)
        if not fns:
            continue
        if pattern == "same":
            fns[0]()
            fns[0]()
            timed = fns * calls
        elif pattern == "rotation":
            for fn in fns * 2:
                fn()
            timed = [fns[i % len(fns)] for i in range(calls)]
        elif pattern == "new":
            fns[0]()                          # the layout's first call: the long path
            timed = fns[1:calls + 1]
        else:
            for fn in fns[:M_SIZES]:          # each batch size once
                fn()
            timed = fns[M_SIZES:M_SIZES + calls]
        out[pattern] = per_call_us(timed)
    return out


def bench_dense_host(shapes=HOST_SHAPES, calls: int = HOST_CALLS, device=None) -> list:
    """Rows {shape, ours: {pattern: timing}, cublaslt: {...} or {"unavailable": why}}."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    rows = []
    for m, n, k in shapes:
        peers = _dense_calls(m, n, k, device, calls)
        row = {"label": f"{m}x{n}x{k}", "m": m, "n": n, "k": k}
        for peer, by_pattern in peers.items():
            row[peer] = by_pattern if "unavailable" in by_pattern else _run_patterns(by_pattern, calls)
        rows.append(row)
        del peers
        torch.cuda.empty_cache()
    return rows


# ---- the other public calls: same tensors and new addresses, ours ------------------------------------
def _other_calls(device, calls: int) -> Dict[str, list]:
    """{name: [calls]}: calls[0] is the first (long path), calls[1:] on tensors at new addresses."""
    import deep_gemm
    bf16 = torch.bfloat16
    count = calls + 1
    out: Dict[str, list] = {}

    def weights(*shape):
        return deep_gemm.per_block_cast_to_fp8(torch.randn(*shape, device=device, dtype=bf16))

    # MoE: 8 experts, 4096 routed rows (contiguous), 8 x 256 rows at most (masked), N 4096, K 7168.
    g, n, k = 8, 4096, 7168
    w = weights(g, n, k)
    idx = (torch.arange(4096, device=device, dtype=torch.int32) // 512)
    sets = zip(views((4096, k), FP8, count, device), col_major_scales(4096, k // 128, count, device),
               views((4096, n), bf16, count, device))
    out["contiguous 8x512 4096x7168"] = [
        lambda a=a, sa=sa, o=o, w=w: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sa), w, o, idx)
        for a, sa, o in sets]
    masked_m = torch.full((g,), 128, device=device, dtype=torch.int32)
    sets = zip(views((g, 256, k), FP8, count, device),
               views((g, 256, k // 128), torch.float32, count, device, strides=(256 * (k // 128), 1, 256)),
               views((g, 256, n), bf16, count, device))
    out["masked 8x256 4096x7168"] = [
        lambda a=a, sa=sa, o=o, w=w: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a, sa), w, o, masked_m, 128)
        for a, sa, o in sets]
    # Weight gradient, dense: dW [7168, 2048] += dY^T X over 4096 tokens.
    mm, nn, kk = 7168, 2048, 4096
    rhs = deep_gemm.per_token_cast_to_fp8(torch.randn(nn, kk, device=device, dtype=bf16))
    dw = torch.zeros(mm, nn, device=device)
    sets = zip(views((mm, kk), FP8, count, device), col_major_scales(mm, kk // 128, count, device))
    out["wgrad 7168x2048x4096"] = [lambda a=a, sa=sa: deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt((a, sa), rhs, dw)
                                   for a, sa in sets]
    d = torch.zeros(mm, nn, device=device)
    sets = zip(views((mm, kk), FP8, count, device), col_major_scales(mm, kk // 128, count, device))
    out["fp8_gemm_nt (1,1,128) fp32 c=d"] = [
        lambda a=a, sa=sa: deep_gemm.fp8_gemm_nt((a, sa), rhs, d, c=d, recipe=(1, 1, 128)) for a, sa in sets]
    # Weight gradients, K-grouped: 8 experts, [7168, 2048] each, ~512 tokens each; the sizes as Python
    # ints, then as an int32 tensor on the device (CUDA-graph safe: no host read of the sizes).
    ks = [512, 496, 528, 512, 480, 544, 512, 512]
    kb = sum((x + 127) // 128 for x in ks)
    dws = torch.zeros(len(ks), mm, nn, device=device)
    for label, sizes in (("", ks), (", sizes on device", torch.tensor(ks, device=device, dtype=torch.int32))):
        sets = zip(views((mm * sum(ks),), FP8, count, device), views((kb, mm), torch.float32, count, device),
                   views((nn * sum(ks),), FP8, count, device), views((kb, nn), torch.float32, count, device))
        out["k_grouped wgrad 8x7168x2048 k~512" + label] = [
            lambda a=a, sa=sa, b=b, sb=sb, sizes=sizes:
                deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt((a, sa), (b, sb), dws, sizes)
            for a, sa, b, sb in sets]
    # The casts (their outputs allocated per call, as callers get them).
    for name, fn, shape in (("per_token_cast_to_fp8 [4096, 7168]", deep_gemm.per_token_cast_to_fp8, (4096, 7168)),
                            ("per_block_cast_to_fp8 [2048, 7168]", deep_gemm.per_block_cast_to_fp8, (2048, 7168)),
                            ("per_token_cast_to_fp8_transposed [4096, 2048]",
                             deep_gemm.per_token_cast_to_fp8_transposed, (4096, 2048))):
        out[name] = [lambda x=x, fn=fn: fn(x) for x in views(shape, bf16, count, device)]
    out["k_grouped_per_token_cast_to_fp8_transposed [4096, 2048]"] = [
        lambda x=x: deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, ks)
        for x in views((sum(ks), 2048), bf16, count, device)]
    # The same cast into outputs the caller holds (no allocation per call).
    from .ops.cast import per_token_cast_into
    sets = zip(views((4096, 7168), bf16, count, device), views((4096, 7168), FP8, count, device),
               col_major_scales(4096, 7168 // 128, count, device))
    out["per_token_cast_into [4096, 7168]"] = [lambda x=x, q=q, s=s: per_token_cast_into(x, q, s) for x, q, s in sets]
    return out


def bench_other_host(calls: int = HOST_CALLS, device=None) -> list:
    device = device or torch.device("cuda", torch.cuda.current_device())
    rows = []
    for name, fns in _other_calls(device, calls).items():
        fns[0]()
        fns[0]()
        same = per_call_us([fns[0]] * calls)
        new = per_call_us(fns[1:])
        rows.append({"label": name, "same": same, "new": new})
    torch.cuda.empty_cache()
    return rows


def print_host(dense_rows: list, other_rows: list, calls: int) -> None:
    print(f"host µs per call: median of {calls} calls back to back, no sync (targets for ours: same tensors and "
          f"rotation <= {TARGET_US['same']:.0f}, new addresses and M changing <= {TARGET_US['new']:.0f})")
    head = f"{'shape':18}" + "".join(f" | {PATTERN_TITLES[p]:>15}" for p in PATTERNS)
    print(head)
    print(f"{'':18}" + "".join(f" | {'ours':>6} {'cuBLAS':>8}" for _ in PATTERNS))
    for r in dense_rows:
        cells = []
        for p in PATTERNS:
            ours = r["ours"].get(p, {}).get("median_us")
            theirs = r["cublaslt"].get(p, {}).get("median_us") if "unavailable" not in r["cublaslt"] else None
            flag = "" if ours is None or ours <= TARGET_US[p] else "!"
            cells.append(f" | {_fmt(ours):>5}{flag:1} {_fmt(theirs):>8}")
        print(f"{r['label']:18}" + "".join(cells))
    if any("unavailable" in r["cublaslt"] for r in dense_rows):
        print(f"cuBLASLt: {dense_rows[0]['cublaslt'].get('unavailable', 'n/a')[:200]}")
    print("('!': above the target)")
    print()
    print(f"{'other calls (ours)':56} {'same':>7} {'new':>7}   (median µs; mean of new; '!': above a target)")
    for r in other_rows:
        over = r["same"]["median_us"] > TARGET_US["same"] or r["new"]["median_us"] > TARGET_US["new"]
        flag = " !" if over else ""
        print(f"{r['label']:56} {r['same']['median_us']:7.1f} {r['new']['median_us']:7.1f}   "
              f"({r['new']['mean_us']:.1f}){flag}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def host_summary(dense_rows: list, other_rows: list) -> dict:
    """Whether ours met every target, and the worst cell per pattern."""
    worst = {}
    for r in dense_rows:
        for p, t in r["ours"].items():
            worst[p] = max(worst.get(p, 0.0), t["median_us"])
    for r in other_rows:
        worst["same"] = max(worst.get("same", 0.0), r["same"]["median_us"])
        worst["new"] = max(worst.get("new", 0.0), r["new"]["median_us"])
    return {"worst_us": worst, "met": all(v <= TARGET_US[p] for p, v in worst.items())}


# ---- an MoE layer's training step --------------------------------------------------------------------
HIDDEN, INTERMEDIATE, EXPERTS, TOKENS = 7168, 2048, 8, 4096
TRAIN_STEPS, TRAIN_WARMUP = 12, 2


def _routing(seed: int) -> List[int]:
    """Rows per expert: TOKENS routed rows over EXPERTS, each padded to the contiguous layout's 128
    (deep_gemm.get_m_alignment_for_contiguous_layout())."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.6, 1.4) for _ in range(EXPERTS)]
    counts = [int(TOKENS * w / sum(weights)) for w in weights]
    counts[0] += TOKENS - sum(counts)
    return [(c + 127) // 128 * 128 for c in counts]


def train_step_calls(device, steps: int, varied_routing: bool):
    """(steps closures, calls per step): each closure issues one step's casts and GEMMs on that step's
    own tensors. The activation between the two forward GEMMs is a view of the first one's output
    (SiLU and the gate product are not ours), and h stands in for its own gradient in the backward."""
    import deep_gemm
    bf16 = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=bf16, generator=gen) / 8
    w1, w2 = randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN), randn(EXPERTS, HIDDEN, INTERMEDIATE)
    w1t, w2t = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()   # K-major for the dgrads
    dw1 = torch.zeros(EXPERTS, 2 * INTERMEDIATE, HIDDEN, device=device)
    dw2 = torch.zeros(EXPERTS, HIDDEN, INTERMEDIATE, device=device)
    routings = [_routing(s if varied_routing else 0) for s in range(steps)]
    closures = []
    for ks in routings:
        t = sum(ks)
        m_indices = torch.repeat_interleave(torch.arange(EXPERTS, device=device, dtype=torch.int32),
                                            torch.tensor(ks, device=device))
        x, dy = randn(t, HIDDEN), randn(t, HIDDEN)
        h = torch.empty(t, 2 * INTERMEDIATE, device=device, dtype=bf16)
        y, dx = (torch.empty(t, HIDDEN, device=device, dtype=bf16) for _ in range(2))
        da = torch.empty(t, INTERMEDIATE, device=device, dtype=bf16)

        def step(ks=ks, m_indices=m_indices, x=x, dy=dy, h=h, y=y, dx=dx, da=da):
            cast, block = deep_gemm.per_token_cast_to_fp8, deep_gemm.per_block_cast_to_fp8
            kcast = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed
            grouped = deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
            w1q, w2q, w1tq, w2tq = block(w1), block(w2), block(w1t), block(w2t)
            # forward
            grouped(cast(x), w1q, h, m_indices)
            act = h[:, :INTERMEDIATE]
            grouped(cast(act), w2q, y, m_indices)
            # backward: input gradients
            grouped(cast(dy), w2tq, da, m_indices)
            grouped(cast(h), w1tq, dx, m_indices)
            # backward: weight gradients, K = each expert's tokens
            deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(kcast(dy, ks), kcast(act, ks), dw2, ks)
            deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(kcast(h, ks), kcast(x, ks), dw1, ks)
        closures.append(step)
    return closures, 18


# The GPU waits this long before the timed steps, while the host issues them all: it then runs them
# back to back, so its time per step is the steps' own, however slow the host.
GPU_HEAD_START_CYCLES = 100_000_000    # ~50 ms at Hopper clocks


def bench_train_step(steps: int = TRAIN_STEPS, warmup: int = TRAIN_WARMUP, device=None) -> list:
    """Rows {routing, host µs per step (median, mean), GPU µs per step, host_ahead, calls}: host
    time to issue each step, and the GPU's time to run them, given a head start (so the GPU never
    waits for the host). The host keeps ahead when its mean time per step is the smaller."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    rows = []
    for varied in (False, True):
        closures, calls = train_step_calls(device, warmup + steps, varied)
        for step in closures[:warmup]:       # compile, load, first sight of the layouts
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(GPU_HEAD_START_CYCLES)
        start.record()
        host = []
        for step in closures[warmup:]:
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
        end.record()
        torch.cuda.synchronize()
        gpu_us = start.elapsed_time(end) * 1e3 / steps
        host_mean = statistics.fmean(host) * 1e6
        rows.append({"routing": "new every step" if varied else "fixed", "steps": steps, "calls": calls,
                     "host_median_us": statistics.median(host) * 1e6, "host_mean_us": host_mean,
                     "gpu_us": gpu_us, "host_per_call_us": host_mean / calls, "host_ahead": host_mean < gpu_us,
                     "gpu_started_late": sum(host) * 1e6 > GPU_HEAD_START_CYCLES / 1.98e3})
        del closures
        torch.cuda.empty_cache()
    return rows


def print_train_step(rows: list) -> None:
    print(f"MoE layer training step: {EXPERTS} experts, hidden {HIDDEN}, expert intermediate {INTERMEDIATE}, "
          f"{TOKENS} routed tokens (padded per expert to 128); per step {rows[0]['calls']} calls: 4 weight casts, "
          f"4 contiguous GEMMs (2 forward, 2 input gradients) fed by 4 per-token casts, 2 K-grouped weight-gradient "
          f"GEMMs fed by 4 K-grouped transposed casts; new activation tensors every step")
    print(f"{'routing':16} {'host µs/step':>13} {'(mean)':>9} {'GPU µs/step':>12} {'host µs/call':>13}  host ahead")
    for r in rows:
        late = "  (the host outran the GPU's head start: GPU time includes waiting)" if r["gpu_started_late"] else ""
        print(f"{r['routing']:16} {r['host_median_us']:13.0f} {r['host_mean_us']:9.0f} {r['gpu_us']:12.0f} "
              f"{r['host_per_call_us']:13.1f}  {'yes' if r['host_ahead'] else 'NO'}{late}")
