"""`bench --suite chain`: programmatic dependent launch on a chain of dependent launches.

A model's MLP layers as decoding runs them: x [M, 7168] -> cast -> GEMM to 4096 -> cast -> GEMM
back to 7168, each kernel reading what the one before wrote, CHAIN_LAYERS layers (own weights)
back to back in one CUDA graph, captured once with set_pdl(False) and once with set_pdl(True).
bench.py runs it and hands itself over (its Timer and device description), so this module does not
import bench back.
"""
from __future__ import annotations

import json
import math
import statistics

import torch

CHAIN_MS = (1, 16, 64, 128)
CHAIN_HIDDEN, CHAIN_INTERMEDIATE, CHAIN_LAYERS = 7168, 4096, 4


def _chain_graph(x: torch.Tensor, layers, pdl: bool) -> tuple:
    """(graph, output) of the chain on x, captured on a side stream with set_pdl(pdl); two eager
    runs first load every kernel and fill the launch caches (capture can do neither)."""
    import deep_gemm

    def chain():
        h = x
        for up, down in layers:
            mid = deep_gemm.gemm_fp8_fp8_bf16_nt(deep_gemm.per_token_cast_to_fp8(h), up)
            h = deep_gemm.gemm_fp8_fp8_bf16_nt(deep_gemm.per_token_cast_to_fp8(mid), down)
        return h

    previous = deep_gemm.get_pdl()
    deep_gemm.set_pdl(pdl)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):   # the capture's stream: its split-K workspace exists by then
            chain()
            chain()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = chain()
    finally:
        deep_gemm.set_pdl(previous)
    return graph, out


def _pdl_kernels() -> str:
    """Which loaded kernel families are PDL-ready (launched with the attribute when PDL is on)."""
    from .ops import cast
    from .runtime import kernels
    found = []
    for family, loaded in (("GEMM", kernels._loaded), ("cast", cast._loaded)):
        ready = {k.pdl_ready for k in loaded.values()}
        found.append(f"{family} " + {frozenset({True}): "yes", frozenset({False}): "no",
                                     frozenset(): "none loaded"}.get(frozenset(ready), "some"))
    return ", ".join(found)


def bench_chain(bench, iters: int, flush: str = "write", ms=CHAIN_MS, verbose: bool = True) -> list:
    """µs per replay of the chain's graph with PDL off and on, for each M (median of `iters` replays
    of each, alternating, with the Timer's L2 flush before each); rows of {m, off_us, on_us,
    ratio, identical}. identical: both graphs gave the same bits."""
    import deep_gemm
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)

    def weight(n, k):   # scaled so that activations stay near 1 from layer to layer
        return deep_gemm.per_block_cast_to_fp8(
            torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) / math.sqrt(k))
    layers = [(weight(CHAIN_INTERMEDIATE, CHAIN_HIDDEN), weight(CHAIN_HIDDEN, CHAIN_INTERMEDIATE))
              for _ in range(CHAIN_LAYERS)]
    flush_l2 = bench.Timer(device, iters, flush=flush).flushes[0]
    rows = []
    for m in ms:
        x = torch.randn(m, CHAIN_HIDDEN, device=device, generator=gen, dtype=torch.bfloat16)
        graphs = [_chain_graph(x, layers, pdl) for pdl in (False, True)]
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(iters)] for _ in graphs]
        for i in range(iters):
            for (graph, _), pairs in zip(graphs, events):
                flush_l2()
                pairs[i][0].record()
                graph.replay()
                pairs[i][1].record()
        torch.cuda.synchronize()
        off, on = (statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3 for pairs in events)
        same = torch.equal(graphs[0][1], graphs[1][1])
        rows.append({"m": m, "off_us": round(off, 2), "on_us": round(on, 2), "ratio": round(on / off, 3),
                     "identical": same})
        del graphs, events
    if verbose:
        print(f"PDL on a chain of {CHAIN_LAYERS} MLP layers (cast -> GEMM {CHAIN_HIDDEN}->{CHAIN_INTERMEDIATE} -> "
              f"cast -> GEMM {CHAIN_INTERMEDIATE}->{CHAIN_HIDDEN} each), one CUDA graph per setting, median of "
              f"{iters} replays; PDL-ready kernels: {_pdl_kernels()}")
        print(f"{'M':>6} {'PDL off us':>11} {'PDL on us':>10} {'on/off':>7}  results")
        for r in rows:
            print(f"{r['m']:>6} {r['off_us']:11.1f} {r['on_us']:10.1f} {r['ratio']:7.3f}  "
                  f"{'identical' if r['identical'] else 'DIFFER'}")
    return rows


def run_chain(bench, args, iters: int) -> int:
    """--suite chain: bench_chain, its rows written to --json; fails if PDL changed a result."""
    rows = bench_chain(bench, iters, flush=args.flush)
    with open(args.json, "w") as f:
        json.dump({"device": bench._device_info(), "iters": iters, "flush": args.flush, "pdl_kernels": _pdl_kernels(),
                   "chain": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0 if all(r["identical"] for r in rows) else 1
