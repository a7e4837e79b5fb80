"""Where a call's host time goes, on a GPU: the call patterns of `bench --suite host`, each timed
plainly (median µs), then under cProfile (its top functions by own time), and the driver's own
launch calls timed alone.

    python scripts/host_profile.py [dense] [other] [driver]

dense: 128x2112x7168 on the same tensors, 8 in rotation, new addresses and M changing.
other: the bench's other calls (grouped, training, K-grouped, casts), same tensors and new addresses;
       for each, whether its cached launch runs through a one-kernel graph.
driver: cuLaunchKernelEx, cuGraphLaunch and the node update of a template's graph, each alone, on
       one launch and alternating over eight (what the rotation pattern does).
cProfile's own overhead inflates every call several times over: read its lists for proportions.
"""
from __future__ import annotations

import cProfile
import io
import itertools
import os
import pstats
import sys

import torch

from deep_gemm import bench_host
from deep_gemm.ops import cast as cast_ops
from deep_gemm.ops import gemm as gemm_ops

CALLS = 400


def median_us(fns) -> float:
    return bench_host.per_call_us(fns)["median_us"]


def profile(name: str, fns, top: int = 14) -> None:
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for fn in fns:
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()][3:top + 5]
    print(f"--- cProfile: {name}")
    for line in lines:
        print("   ", line.replace(os.getcwd() + "/", "")[:150])


def _cached_launches() -> dict:
    """{(cache, key): launch} of every launch the GEMMs and the casts have cached."""
    return {(i, key): entry[-1][1] for i, cache in enumerate((gemm_ops._launches, cast_ops._launches))
            for key, entry in cache._entries.items()}


def _cycle(items: list, count: int) -> list:
    return list(itertools.islice(itertools.cycle(items), count))


def dense(device, shape=(128, 2112, 7168)) -> list:
    """The host suite's dense patterns of one shape, timed as the suite times them, then profiled;
    returns the rotation's cached launches."""
    calls = bench_host._dense_calls(*shape, device, CALLS)["ours"]
    for _ in range(2):   # cached before the snapshot: the two patterns then cache the rotation's launches only
        calls["same"][0]()
    before = _cached_launches()
    timings = bench_host._run_patterns({p: calls[p] for p in ("same", "rotation")}, CALLS)
    launches = [launch for key, launch in _cached_launches().items() if key not in before]
    timings.update(bench_host._run_patterns({p: calls[p] for p in ("new", "m_change")}, CALLS))
    print(f"dense {shape}: " + ", ".join(f"{p} {t['median_us']:.2f} µs" for p, t in timings.items()))
    profile("dense same", [calls["same"][0]] * 2000)
    profile("dense rotation", _cycle(calls["rotation"], 2000))
    fresh = bench_host._dense_calls(*shape, device, CALLS)["ours"]
    fresh["new"][0]()
    profile("dense new addresses", fresh["new"][1:], 20)
    for fn in fresh["m_change"][:bench_host.M_SIZES]:
        fn()
    profile("dense M changing", fresh["m_change"][bench_host.M_SIZES:], 20)
    return launches


def other(device) -> None:
    for name, fns in bench_host._other_calls(device, CALLS).items():
        before = _cached_launches()
        for _ in range(3):
            fns[0]()
        graphs = [getattr(launch, "_graph", None) is not None
                  for key, launch in _cached_launches().items() if key not in before]
        graph = "n/a" if not graphs else all(graphs)
        print(f"{name}: same {median_us([fns[0]] * CALLS):.2f} µs, new {median_us(fns[1:]):.2f} µs "
              f"(cached launch in a graph: {graph})")
    for name, fns in bench_host._other_calls(device, CALLS).items():
        fns[0]()
        fns[0]()
        profile(f"{name}, same tensors", [fns[0]] * 1000)
        profile(f"{name}, new addresses", fns[1:])


def driver(launches: list) -> None:
    """The driver calls alone, on the cached launches of the rotation pattern."""
    with_graph = [launch for launch in launches if getattr(launch, "_graph", None) is not None]
    print(f"rotation launches: {len(launches)}, with a graph: {len(with_graph)}")
    if not launches:
        return

    def each(make, over) -> float:
        return median_us([make(launch) for launch in _cycle(over, CALLS)])

    def direct(launch):
        return lambda: launch._launch(launch._config, launch.function, launch.address, 0)

    def graph(launch):
        return lambda: launch._graph_launch(launch._graph, launch._cu_stream)

    first = launches[:1]
    print(f"cuLaunchKernelEx: one launch {each(direct, first):.2f} µs, alternating over "
          f"{len(launches)} {each(direct, launches):.2f}")
    if with_graph:
        print(f"cuGraphLaunch: one graph {each(graph, with_graph[:1]):.2f} µs, alternating over "
              f"{len(with_graph)} {each(graph, with_graph):.2f}")
    print(f"PreparedLaunch.fire: one {each(lambda l: l.fire, first):.2f} µs, alternating "
          f"{each(lambda l: l.fire, launches):.2f}")
    # A template's own launch, once in a graph: the node update that precedes each graph launch.
    owns = [template._own for entry in gemm_ops._launches._templates.values() for _, template in entry
            if getattr(template, "_own", None) is not None and template._own._node is not None]
    if owns:
        own = owns[0]
        node = own._node
        print(f"cuGraphExecKernelNodeSetParams {median_us([lambda: node[0](own._graph, node[1], node[2])] * CALLS):.2f}"
              f" µs; a template's own fire (update + graph launch) {median_us([own.fire] * CALLS):.2f}")


def main(argv) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("host_profile.py needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    parts = argv or ["dense", "other", "driver"]
    launches = dense(device) if "dense" in parts or "driver" in parts else []
    if "driver" in parts:
        driver(launches)
    if "other" in parts:
        other(device)


if __name__ == "__main__":
    main(sys.argv[1:])
