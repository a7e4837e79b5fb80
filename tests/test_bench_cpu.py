"""The benchmark CLI without a Hopper GPU, and the harness' pure helpers (CPU)."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from deep_gemm import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=180):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")      # take the no-GPU path on any machine
    return subprocess.run([sys.executable, "-m", "deep_gemm", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_without_gpu_runs_reference(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.time()
    res = _run("bench", "--quick", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.time() - t0 < 120
    assert "no Hopper GPU found (" in res.stdout
    assert "running the reference path on small shapes" in res.stdout
    assert "WRONG" not in res.stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "reference-only" and data["rows"] and all(r["ok"] for r in data["rows"])


def test_bench_rejects_bad_shape():
    res = _run("bench", "--shape", "12x34")
    assert res.returncode == 2 and "MxNxK" in res.stderr


def test_bench_suites_include_the_casts():
    from deep_gemm.bench import build_parser
    assert build_parser().parse_args(["--suite", "casts"]).suite == "casts"
    assert build_parser().parse_args([]).suite == "all"


def test_info_and_precompile_commands_do_not_crash():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for key in ("torch", "GPU", "NVRTC", "nvcc", "kernel cache"):
        assert key in res.stdout
    res = _run("precompile", "--help")
    assert "Traceback" not in res.stderr


def test_roofline_floor():
    # 4096 x 7168 x 16384 is compute-bound: 962 GFLOP at 1500 TFLOPS = 641.4 µs (ANCHORS.md).
    m, n, k = 4096, 7168, 16384
    floor = bench.roofline_floor_s(2.0 * m * n * k, m * k + n * k + 2 * m * n)
    assert floor * 1e6 == pytest.approx(641.4, abs=0.1)
    # 64 x 2112 x 7168 is memory-bound: 5.3 µs.
    m, n, k = 64, 2112, 7168
    assert bench.roofline_floor_s(2.0 * m * n * k, m * k + n * k + 2 * m * n) * 1e6 == pytest.approx(5.3, abs=0.05)


def test_anchor_tables_cover_the_default_shapes():
    assert {(m, n, k) for m in bench.DENSE_MS for n, k in bench.DENSE_NKS} == set(bench.DEEPGEMM_DENSE_US)
    assert len(bench.DEEPGEMM_CONTIGUOUS) == 6 and len(bench.DEEPGEMM_MASKED) == 10


def _row(label, m, n, k, us, status="ok", diff=1.4e-6, dg=None):
    flops = 2.0 * m * n * k
    floor = bench.roofline_floor_s(flops, m * k + n * k + 2 * m * n) * 1e6
    entry = {"status": status, "diff": diff, "us": us, "tflops": flops / us * 1e-6,
             "pct_floor": 100 * floor / us, "host_us": 5.0, "kernels": 1}
    row = {"suite": "dense", "label": label, "m": m, "n": n, "k": k, "flops": flops, "floor_us": floor,
           "deepgemm_us": dg, "deepgemm_tflops": None,
           "peers": {"ours": entry, "cublaslt": dict(entry, status="WRONG", diff=float("nan")),
                     "triton": {"status": "n/a", "reason": "NotImplementedError: triton is not installed"}}}
    if dg:
        row["speedup_vs_deepgemm"] = dg / us
    return row


def test_table_summary_and_plot_from_synthetic_rows(tmp_path, capsys):
    rows = [_row("64x2112x7168", 64, 2112, 7168, 10.0, dg=12.0),
            _row("4096x2112x7168", 4096, 2112, 7168, 100.0, dg=107.8),
            _row("128x2112x7168", 128, 2112, 7168, 12.0, status="WRONG", diff=0.3, dg=13.3)]
    bench.print_table(rows)
    summary = bench.summarise(rows)
    bench.print_summary(summary)
    text = capsys.readouterr().out
    assert "WRONG" in text and "n/a" in text and "!" in text
    assert summary["ours"]["rows"] == 2 and summary["triton"]["geomean_pct_floor"] is None
    expect = (12.0 / 10.0 * 107.8 / 100.0) ** 0.5          # the wrong row does not count
    assert summary["ours"]["geomean_speedup_vs_deepgemm"] == pytest.approx(expect)
    why = bench.plot(rows, str(tmp_path / "p.png"), "test")
    try:
        import matplotlib  # noqa: F401
        assert why is None and (tmp_path / "p.png").stat().st_size > 0
    except ImportError:
        assert why == "matplotlib is not installed"


def test_roofline_floor_takes_the_gpus_copy_rate():
    # An H200's measured copy rate shrinks the memory term; the compute term is unchanged.
    m, n, k = 64, 2112, 7168
    nbytes = m * k + n * k + 2 * m * n
    assert bench.roofline_floor_s(2.0 * m * n * k, nbytes, 4.3e12) == pytest.approx(nbytes / 4.3e12)
    m, n, k = 4096, 7168, 16384
    assert bench.roofline_floor_s(2.0 * m * n * k, m * k + n * k + 2 * m * n, 4.3e12) * 1e6 == \
        pytest.approx(641.4, abs=0.1)


def test_odd_suite_shapes():
    cases = bench.suite_cases("odd", quick=False, shapes=[])
    assert len(cases) == len(bench.ODD_MS) * len(bench.ODD_NKS)
    assert len(bench.suite_cases("odd", quick=True, shapes=[])) < len(cases)
    assert min(bench.ODD_MS) == 1 and 64 in bench.ODD_MS       # M < 64 is compared with M = 64
    assert any(k % 16 for _, k in bench.ODD_NKS) and any(n % 128 for n, _ in bench.ODD_NKS)


def test_odd_rows_stay_out_of_the_anchors_geomeans(capsys):
    anchors = [_row("64x2112x7168", 64, 2112, 7168, 10.0, dg=12.0)]
    odd = dict(_row("7x2112x7168", 7, 2112, 7168, 50.0), suite="odd")
    summary = bench.summarise(anchors + [odd])
    assert summary == dict(bench.summarise(anchors), odd=summary["odd"])
    assert summary["odd"]["ours"]["rows"] == 1
    assert summary["odd"]["ours"]["geomean_pct_floor"] == pytest.approx(odd["peers"]["ours"]["pct_floor"])
    bench.print_summary(summary)
    assert "odd shapes, geomean" in capsys.readouterr().out


def test_device_record_names_the_jit_compiler(monkeypatch):
    # The kernels' SASS depends on the NVRTC version (patch releases too): every bench run
    # records which compiler made them, or why there is none.
    import types

    import torch

    from deep_gemm.jit import compiler
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132))
    monkeypatch.setattr(compiler, "get_compiler", lambda: types.SimpleNamespace(identity="nvrtc 13.0 (wheel x)"))
    info = bench._device_info()
    assert info["jit_compiler"] == "nvrtc 13.0 (wheel x)" and info["sms"] == 132

    def missing():
        raise RuntimeError("cannot load libnvrtc: not found")
    monkeypatch.setattr(compiler, "get_compiler", missing)
    assert bench._device_info()["jit_compiler"] == "unavailable (RuntimeError: cannot load libnvrtc: not found)"


class _FakeGpu:
    """Stands in for the profiler: calls append (start, µs, kernel name) events, and _profile returns
    those of the calls it ran."""

    def __init__(self):
        self.events, self.calls = [], []

    def profile(self, fn, repeat=1):
        self.events = []
        for _ in range(repeat):
            fn()
        return self.events

    def kernel(self, name, us, tag=None):
        def call():
            self.calls.append(tag or name)
            self.events.append((0, us() if callable(us) else us, name))
        return call


def _fake_timer(gpu, iters, flush_name="flush"):
    timer = bench.Timer.__new__(bench.Timer)      # no 256 MB flush buffer on the device
    timer.iters = iters
    timer.flushes = [gpu.kernel(flush_name, 50.0, tag="flush")]
    timer.flush_names = [None]
    return timer


def test_timer_times_calls_in_turn(monkeypatch):
    # Each iteration runs flush, a, flush, b: a GPU whose clocks drift over the run slows both alike,
    # and each call's kernels (a has two) are summed between flushes.
    gpu = _FakeGpu()
    monkeypatch.setattr(bench, "_profile", gpu.profile)
    drift = iter(range(100))
    first, second = gpu.kernel("gemm_a", 3.0), gpu.kernel("gemm_a_tail", 4.0)
    a = lambda: (first(), second())   # noqa: E731
    b = gpu.kernel("cublas", lambda: 20.0 + next(drift))
    timer = _fake_timer(gpu, iters=5)
    # (b's first call, which names its kernels, draws 20; the 5 timed calls 21..25)
    assert timer.kernel_us_in_turn([a, b]) == [(7.0, 2), (23.0, 1)]
    assert gpu.calls[-25:] == ["flush", "gemm_a", "gemm_a_tail", "flush", "cublas"] * 5
    assert timer.kernel_us(a) == (7.0, 2)


def test_measure_falls_back_to_timing_each_alone(monkeypatch):
    # Peers whose kernels share the names of both flushes cannot be timed in turn: each is then timed
    # alone (with the flush it does not share), and a failing peer's error stays in its own entry.
    gpu = _FakeGpu()
    monkeypatch.setattr(bench, "_profile", gpu.profile)
    monkeypatch.setattr(bench, "host_overhead_us", lambda fn: 1.0)
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda *args: None)
    timer = _fake_timer(gpu, iters=3)
    timer.flushes.append(gpu.kernel("flush_two", 50.0, tag="flush"))
    timer.flush_names.append(None)

    def failing():
        raise RuntimeError("no kernel for this shape")
    problem = bench.Problem(
        suite="dense", label="t", shape={"m": 1, "n": 1, "k": 1}, flops=2e9, nbytes=1e6, deepgemm_us=None,
        deepgemm_tflops=None,
        peers={"ours": lambda: gpu.kernel("flush_two", 10.0), "cublaslt": lambda: gpu.kernel("flush", 12.0),
               "triton": lambda: failing},
        check=lambda result: 0.0, poison=lambda: None)
    row = bench.measure(problem, timer)
    assert row["peers"]["ours"]["us"] == 10.0 and row["peers"]["ours"]["status"] == "ok"
    assert row["peers"]["cublaslt"]["us"] == 12.0
    assert row["peers"]["triton"]["status"] == "error" and "no kernel" in row["peers"]["triton"]["reason"]
    with pytest.raises(RuntimeError, match="cannot tell the L2 flush"):
        timer.kernel_us_in_turn([gpu.kernel("flush_two", 10.0), gpu.kernel("flush", 12.0)])
