"""`python -m deep_gemm bench --suite sweep` (issue #23) on the CPU: its shape list, its summary on
synthetic rows, the refusal without a Hopper GPU, the README line."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from deep_gemm import bench, bench_sweep as sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- the shape list ------------------------------------------------------------------------------
def test_shape_list_size_and_uniqueness():
    shapes = sweep.sweep_shapes()
    assert len(shapes) >= 150
    keys = [(s["m"], s["n"], s["k"]) for s in shapes]
    assert len(keys) == len(set(keys))
    assert all(s["n"] >= 1 and s["k"] >= 1 and 1 <= s["m"] <= 8192 for s in shapes)
    assert all(s["family"] for s in shapes)
    quick = sweep.sweep_shapes(quick=True)
    assert 0 < len(quick) < len(shapes) and {sweep.band_of(s["m"]) for s in quick} == {b for b, _, _ in sweep.BANDS}


def test_shape_list_covers_every_band_and_odd_ms():
    shapes = sweep.sweep_shapes()
    ms = {s["m"] for s in shapes}
    assert min(ms) == 1 and max(ms) == 8192
    assert set(ms) == set(sweep.SWEEP_MS)
    for band, _, _ in sweep.BANDS:
        assert sum(sweep.band_of(s["m"]) == band for s in shapes) >= 20, band
    assert any(m % 8 for m in ms if m > 8) and any(m % 64 and m > 64 for m in ms)
    assert {3, 5, 13, 65, 100, 333, 1000, 3000, 6000} <= ms
    # every family spans decode and prefill
    for f in sweep.families():
        fm = [s["m"] for s in shapes if (s["n"], s["k"]) == (f["n"], f["k"])]
        assert min(fm) <= 64 and max(fm) > 2048, f["family"]


def test_shape_list_models_and_vocab_head():
    shapes = sweep.sweep_shapes()
    for model in ("Llama-3 8B", "Llama-3 70B", "Qwen2.5 7B", "Qwen3 32B", "Qwen3 235B-A22B", "DeepSeek-V3",
                  "Mixtral 8x7B", "gpt-oss 120b"):
        assert sum(model in s["models"] for s in shapes) >= 8, model
    vocab = [s for s in shapes if (s["n"], s["k"]) == (129280, 7168)]
    assert vocab and "vocab" in vocab[0]["family"] and 1024 in {s["m"] for s in vocab}
    nks = {(s["n"], s["k"]) for s in shapes}
    assert {(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384), (36864, 7168),
            (7168, 18432), (4096, 7168), (7168, 2048), (14336, 4096), (4096, 14336), (5760, 2880)} <= nks
    # a layer two models share is one family carrying both names
    shared = next(f for f in sweep.families() if (f["n"], f["k"]) == (4096, 14336))
    assert "Llama-3 8B down" in shared["family"] and "Mixtral 8x7B" in shared["family"]


def test_band_of():
    assert [sweep.band_of(m) for m in (1, 64, 65, 512, 513, 2048, 2049, 8192)] == \
        ["1-64", "1-64", "65-512", "65-512", "513-2048", "513-2048", ">2048", ">2048"]
    with pytest.raises(ValueError):
        sweep.band_of(0)


def test_sweep_is_a_suite_of_dense_builders_outside_all():
    assert bench.build_parser().parse_args(["--suite", "sweep"]).suite == "sweep"
    cases = bench.suite_cases("sweep", quick=False, shapes=[])
    assert len(cases) == len(sweep.sweep_shapes()) and all(callable(c) for c in cases)
    assert "sweep" not in bench.build_parser().get_default("suite")


# ---- summary on synthetic rows -------------------------------------------------------------------
def _entry(m, n, k, us, status="ok", config=None):
    flops = 2.0 * m * n * k
    floor = bench.roofline_floor_s(flops, m * k + n * k + 2 * m * n) * 1e6
    e = {"status": status, "diff": 1e-6, "us": us, "tflops": flops / us * 1e-6, "pct_floor": 100 * floor / us,
         "host_us": 5.0, "kernels": 1}
    if config:
        e["config"] = config
    return e, floor


def _row(m, n, k, ours_frac, cublas_frac=None, triton_frac=None, ours_status="ok"):
    """A sweep row whose peers run at the given fraction of the floor (None: n/a)."""
    flops = 2.0 * m * n * k
    floor = bench.roofline_floor_s(flops, m * k + n * k + 2 * m * n) * 1e6
    peers = {}
    for peer, frac in (("ours", ours_frac), ("cublaslt", cublas_frac), ("triton", triton_frac)):
        if frac is None:
            peers[peer] = {"status": "n/a", "reason": "NotImplementedError: missing"}
        else:
            peers[peer], _ = _entry(m, n, k, floor / frac, status=ours_status if peer == "ours" else "ok",
                                    config=[128, 128, 5] if peer == "ours" else None)
    return {"suite": "sweep", "label": f"{m}x{n}x{k} fam", "m": m, "n": n, "k": k, "family": "fam",
            "band": sweep.band_of(m), "flops": flops, "bytes": 0.0, "floor_us": floor, "deepgemm_us": None,
            "deepgemm_tflops": None, "peers": peers}


def _rows():
    return [_row(1, 2112, 7168, 0.40, 0.30, 0.20),
            _row(13, 576, 7168, 0.80, 0.50, None),
            _row(100, 1536, 7168, 0.50, 0.60, 0.30),      # cuBLASLt wins
            _row(333, 4096, 7168, 0.70, 0.65, 0.75),      # Triton wins
            _row(1000, 7168, 2048, 0.80, 0.70, 0.50),
            _row(3000, 129280, 7168, 0.90, 0.85, 0.60),
            _row(8192, 4096, 4096, 0.30, 0.85, 0.60, ours_status="WRONG")]   # ours wrong: both peers win


def test_summary_geomeans_per_band():
    s = sweep.sweep_summary(_rows())
    assert s["shapes"] == 7
    assert s["overall"]["ours"]["rows"] == 6                       # the wrong row does not count
    expect = (40 * 80 * 50 * 70 * 80 * 90) ** (1 / 6)
    assert s["overall"]["ours"]["geomean_pct_floor"] == pytest.approx(expect)
    bands = s["bands"]
    assert bands["1-64"]["ours"]["geomean_pct_floor"] == pytest.approx((40 * 80) ** 0.5)
    assert bands["1-64"]["triton"]["rows"] == 1 and bands["1-64"]["shapes"] == 2
    assert bands["65-512"]["cublaslt"]["geomean_pct_floor"] == pytest.approx((60 * 65) ** 0.5)
    assert bands["513-2048"]["ours"]["geomean_pct_floor"] == pytest.approx(80)
    assert bands[">2048"]["ours"]["rows"] == 1 and bands[">2048"]["shapes"] == 2
    assert bands[">2048"]["cublaslt"]["geomean_pct_floor"] == pytest.approx((85 * 85) ** 0.5)


def test_summary_peer_wins_and_worst_ten():
    rows = _rows()
    s = sweep.sweep_summary(rows)
    wins = s["peer_wins"]
    assert [w["m"] for w in wins["cublaslt"]["shapes"]] == [100, 8192] and wins["cublaslt"]["count"] == 2
    assert [w["m"] for w in wins["triton"]["shapes"]] == [333, 8192]
    assert wins["cublaslt"]["shapes"][0]["ratio"] == pytest.approx(0.60 / 0.50)
    assert wins["cublaslt"]["shapes"][1]["ratio"] is None            # ours wrong
    assert s["ours_ge_all_peers"] == 4
    worst = s["worst"]
    assert len(worst) == 7                                            # fewer rows than ten: all of them
    assert worst[0]["m"] == 8192 and worst[0]["status"] == "WRONG"   # a wrong result first
    assert [w["m"] for w in worst[1:4]] == [1, 100, 333]
    assert worst[1]["config"] == [128, 128, 5] and worst[1]["band"] == "1-64"
    many = [_row(m, 4096, 7168, 0.5 + i / 100, 0.1, 0.1) for i, m in enumerate(sweep.SWEEP_MS[:15])]
    assert [w["m"] for w in sweep.worst(many)] == list(sweep.SWEEP_MS[:10])
    assert sweep.peer_wins(many) == {"cublaslt": [], "triton": []}


def test_summary_through_bench_and_printed(capsys, tmp_path):
    rows = _rows()
    summary = bench.summarise(rows)
    assert summary["sweep"] == sweep.sweep_summary(rows)
    assert summary["ours"]["rows"] == 0                               # the ANCHORS geomean ignores sweep rows
    json.dumps(summary)                                               # goes into bench.json as it is
    bench.print_table(rows)
    bench.print_summary(summary)
    text = capsys.readouterr().out
    assert "geomean: " not in text                                    # no ANCHORS rows ran
    assert "sweep: 7 shapes" in text and "65-512" in text and ">2048" in text
    assert "cuBLASLt faster than ours on 2 shape(s):" in text and "100x1536x7168 fam" in text
    assert "worst 7 of ours" in text and "config [128, 128, 5]" in text
    why = sweep.plot_sweep(rows, str(tmp_path / "s.png"), "test")
    if importlib.util.find_spec("matplotlib"):
        assert why is None and (tmp_path / "s.png").stat().st_size > 0
    else:
        assert why == "matplotlib is not installed"
    assert sweep.plot_sweep([], str(tmp_path / "t.png"), "test") == "no sweep rows to plot"


# ---- the CLI without a GPU, and the README ---------------------------------------------------------
def test_sweep_without_gpu_is_refused(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "deep_gemm", "bench", "--suite", "sweep"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no Hopper GPU found" in res.stdout
    assert "--suite sweep: time the kernels, which needs a Hopper GPU" in res.stderr
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()


def test_readme_names_the_sweep():
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("python -m deep_gemm bench "))
    assert "sweep" in line
    assert "`--suite sweep`" in text
