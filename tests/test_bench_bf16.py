"""`python -m deep_gemm bench --suite bf16` on the CPU: its cases, every case's problem built on tiny
shapes with our call and cuBLAS' (torch) checked, the summary on synthetic rows, the CLI without a GPU."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from deep_gemm import bench, bench_bf16

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---- the cases -------------------------------------------------------------------------------------
def test_suite_builds_every_anchors_case_and_stays_out_of_all():
    cases = bench.suite_cases("bf16", quick=False, shapes=[])
    dense = len(bench_bf16.LAYOUTS) * len(bench.DENSE_MS) * len(bench.DENSE_NKS)
    fp32 = len(bench_bf16.FP32_MS) * len(bench_bf16.FP32_NKS)
    grouped = len(bench.DEEPGEMM_CONTIGUOUS) + len(bench.DEEPGEMM_MASKED) + len(bench.DEEPGEMM_K_GROUPED_US)
    assert len(cases) == dense + fp32 + grouped == 112 and all(callable(c) for c in cases)
    assert 0 < len(bench.suite_cases("bf16", quick=True, shapes=[])) < len(cases)
    parser = bench.build_parser()
    assert parser.parse_args(["--suite", "bf16"]).suite == "bf16"
    assert parser.get_default("suite") == "all"


@pytest.fixture
def tiny(monkeypatch):
    """The suite's shape lists cut to tiny ones (M, N and K multiples of 8, as the BF16 rules ask)."""
    monkeypatch.setattr(bench, "DENSE_MS", (16, 24))
    monkeypatch.setattr(bench, "DENSE_NKS", ((40, 32), (24, 64)))
    monkeypatch.setattr(bench, "DEEPGEMM_CONTIGUOUS", {(3, 24, 40, 32): None, (2, 40, 24, 16): None})
    monkeypatch.setattr(bench, "DEEPGEMM_MASKED", {(3, 24, 40, 32): None, (2, 300, 24, 16): None})
    monkeypatch.setattr(bench, "DEEPGEMM_K_GROUPED_US", {(3, 40, 24, 256): None})
    monkeypatch.setattr(bench_bf16, "FP32_MS", (8,))
    monkeypatch.setattr(bench_bf16, "FP32_NKS", ((24, 32),))


def _run_peer(problem, peer):
    call = problem.peers[peer]()
    if peer == "ours":
        problem.poison()
    return problem.check(call())


def test_every_case_runs_and_checks_on_cpu(tiny):
    problems = [build(CPU) for build in bench.suite_cases("bf16", quick=False, shapes=[])]
    assert len(problems) == 4 * 2 * 2 + 1 + 2 + 2 + 1
    labels = [p.label for p in problems]
    assert "nt 16x40x32" in labels and "tt 24x24x64" in labels and "nt 8x24x32 fp32" in labels
    assert "masked 3x24 40x32" in labels and "masked 2x300 24x16" in labels and "k-grouped 3x40x24 k~256" in labels
    assert len(set(labels)) == len(labels)
    for p in problems:
        assert p.deepgemm_us is None and p.suite in bench_bf16.SUITES
        for peer in ("ours", "cublaslt"):
            assert _run_peer(p, peer) <= bench.WRONG_DIFF, (p.label, peer)
        with pytest.raises(NotImplementedError):
            p.peers["triton"]()


def test_poison_reaches_what_ours_returns(tiny):
    # a call that wrote nothing would leave the poison in place and fail its check
    for build in bench.suite_cases("bf16", quick=True, shapes=[]):
        p = build(CPU)
        result = p.peers["ours"]()()
        assert p.check(result) <= bench.WRONG_DIFF
        p.poison()
        assert not p.check(result) <= bench.WRONG_DIFF, p.label


def _contiguous(groups, m_per_group, n, k):
    counts = bench_bf16.group_sizes(bench, groups, m_per_group, n, k)
    return bench_bf16.make_bf16_contiguous(groups, m_per_group, n, k, counts, CPU).problem(bench)


def test_flops_and_bytes():
    p = bench_bf16.make_bf16_dense("tn", 16, 24, 32, CPU).problem(bench)
    assert p.flops == 2 * 16 * 24 * 32 and p.nbytes == 2 * (16 * 32 + 24 * 32) + 2 * 16 * 24
    p = bench_bf16.make_bf16_dense("nt", 16, 24, 32, CPU, out_dtype=torch.float32).problem(bench)
    assert p.nbytes == 2 * (16 * 32 + 24 * 32) + 4 * 16 * 24 and p.shape["out"] == "fp32"
    g = _contiguous(3, 24, 40, 32)
    valid = g.shape["valid_m"]
    assert valid == sum(bench_bf16.group_sizes(bench, 3, 24, 40, 32))
    assert g.flops == 2 * valid * 40 * 32 and g.nbytes == 2 * (valid * 32 + 3 * 40 * 32) + 2 * valid * 40
    sizes = bench_bf16.masked_sizes(bench, 3, 24, 40, 32)
    m = bench_bf16.make_bf16_masked(3, 24, 40, 32, sizes, CPU).problem(bench)
    valid = m.shape["valid_m"]
    assert valid == sum(sizes[1]) and m.shape["max_m"] == sizes[0] == 256
    assert m.flops == 2 * valid * 40 * 32 and m.nbytes == 2 * (valid * 32 + 3 * 40 * 32) + 2 * valid * 40


def test_masked_sizes_are_the_fp8_suites():
    max_m, counts = bench_bf16.masked_sizes(bench, 4, 256, 4096, 7168)
    assert max_m == 4096 and counts == bench._draw_counts(4, 256, 4 * 7907 + 256 * 37 + 4096 + 7168)
    assert bench_bf16.masked_sizes(bench, 32, 32, 7168, 2048)[0] == 256


def test_group_sizes_and_contiguous_layout():
    counts = bench_bf16.group_sizes(bench, 4, 8192, 4096, 7168)
    assert all(c % bench_bf16.GROUP_ROWS == 0 and 0.69 * 8192 <= c <= 1.31 * 8192 for c in counts)
    # the FP8 contiguous suite's draw, rounded
    fp8 = bench._draw_counts(4, 8192, 4 * 7919 + 8192 * 31 + 4096 + 7168)
    assert all(abs(c - d) <= bench_bf16.GROUP_ROWS // 2 for c, d in zip(counts, fp8))
    m_indices, valid_rows = bench_bf16.contiguous_layout([16, 0, 48], 32, CPU)
    assert m_indices.tolist() == [0] * 16 + [-1] * 16 + [2] * 48 + [-1] * 16
    assert valid_rows.tolist() == list(range(16)) + list(range(32, 80))


def test_grouped_peer_without_grouped_mm(monkeypatch):
    monkeypatch.setattr(bench_bf16, "grouped_mm_runs", lambda device: False)
    p = _contiguous(3, 24, 40, 32)
    assert p.shape["cublas_peer"] == "torch.matmul per expert"
    assert _run_peer(p, "cublaslt") <= bench.WRONG_DIFF
    assert _run_peer(p, "ours") <= bench.WRONG_DIFF


def test_reference_checks_pass():
    checks = bench_bf16.reference_checks(bench)
    assert len(checks) == len(bench_bf16.LAYOUTS) + 4
    for label, call, expect in checks:
        assert label.startswith("bf16 ")
        assert bench._diff(call(), expect) <= bench.WRONG_DIFF, label


# ---- the summary on synthetic rows -------------------------------------------------------------------
def _peer(us, status="ok"):
    if us is None:
        return {"status": status, "reason": "NotImplementedError: missing"}
    return {"status": status, "diff": 1e-6, "us": us, "tflops": 1.0, "pct_floor": 50.0, "host_us": 5.0}


def _dense(layout, m, ours, cublas, out="bf16", ours_status="ok"):
    return {"suite": "bf16", "label": f"{layout} {m}x7168x2048", "layout": layout, "m": m, "n": 7168, "k": 2048,
            "out": out, "peers": {"ours": _peer(ours, ours_status), "cublaslt": _peer(cublas),
                                  "triton": _peer(None, "n/a")}}


def _grouped(ours, cublas, peer="torch._grouped_mm"):
    return {"suite": "bf16_grouped", "label": "grouped 4x8192 4096x7168", "groups": 4, "m_per_group": 8192,
            "n": 4096, "k": 7168, "cublas_peer": peer,
            "peers": {"ours": _peer(ours), "cublaslt": _peer(cublas), "triton": _peer(None, "n/a")}}


def _masked(expected_m, ours, cublas, pct_floor):
    row = {"suite": "bf16_masked", "label": f"masked 16x{expected_m} 4096x7168", "groups": 16,
           "expected_m": expected_m, "n": 4096, "k": 7168,
           "peers": {"ours": _peer(ours), "cublaslt": _peer(cublas), "triton": _peer(None, "n/a")}}
    if ours is not None:
        row["peers"]["ours"]["pct_floor"] = pct_floor
    return row


def _rows():
    return [_dense("nt", 64, 10.0, 20.0), _dense("nt", 4096, 100.0, 50.0),
            _dense("nn", 128, 10.0, 10.0),
            _dense("tn", 64, 10.0, None),                       # cuBLAS missing: not counted
            _dense("tn", 4096, 10.0, 12.0, ours_status="WRONG"),   # ours wrong: not counted
            _dense("nt", 64, 10.0, 40.0, out="fp32"),
            _grouped(100.0, 150.0), _grouped(None, 100.0),          # ours missing: not counted
            _masked(64, 10.0, 20.0, 40.0), _masked(32, 10.0, 5.0, 90.0), _masked(512, 10.0, 10.0, 10.0)]


def test_summary_ratios_per_layout_band_and_grouped():
    s = bench_bf16.bf16_summary(_rows())
    assert s["layouts"]["nt"] == {"rows": 2, "of": 2, "geomean_speed_vs_cublas": pytest.approx(1.0)}
    assert s["layouts"]["nn"]["geomean_speed_vs_cublas"] == pytest.approx(1.0)
    assert s["layouts"]["tn"] == {"rows": 0, "of": 2, "geomean_speed_vs_cublas": None}
    assert s["layouts"]["tt"] == {"rows": 0, "of": 0, "geomean_speed_vs_cublas": None}
    assert s["nt_fp32_out"]["geomean_speed_vs_cublas"] == pytest.approx(4.0)
    assert s["bands"]["M<=128"]["rows"] == 2 and s["bands"]["M<=128"]["geomean_speed_vs_cublas"] == \
        pytest.approx(2 ** 0.5)
    assert s["bands"]["M>128"]["geomean_speed_vs_cublas"] == pytest.approx(0.5)
    assert s["grouped"] == {"rows": 1, "of": 2, "geomean_speed_vs_cublas": pytest.approx(1.5),
                            "peers": ["torch._grouped_mm"]}
    assert s["masked"] == {"rows": 3, "of": 3, "geomean_speed_vs_cublas": pytest.approx(1.0), "small_rows": 2,
                           "small_pct_floor": pytest.approx(60.0)}   # expected M <= 128: 40% and 90%
    empty = bench_bf16.bf16_summary([])
    assert empty["grouped"]["geomean_speed_vs_cublas"] is None and empty["grouped"]["peers"] == []
    assert empty["masked"]["of"] == 0 and empty["masked"]["small_pct_floor"] is None


def test_summary_through_bench_and_printed(capsys):
    rows = _rows()
    summary = bench.summarise(rows)
    assert summary["bf16"] == bench_bf16.bf16_summary(rows)
    assert summary["ours"]["rows"] == 0                       # the ANCHORS geomeans ignore bf16 rows
    json.dumps(summary)
    bench.print_table(rows)
    bench.print_summary(summary)
    text = capsys.readouterr().out
    assert "geomean: " not in text                            # no ANCHORS rows ran
    assert "bf16, ours vs cuBLAS" in text
    assert "nt 1.00x (2/2)" in text and "tt n/a (0/0)" in text and "nt fp32 out 4.00x (1/1)" in text
    assert "M<=128 1.41x (2/3)" in text and "grouped vs torch._grouped_mm 1.50x (1/2)" in text
    assert "masked vs torch.matmul per expert 1.00x (3/3); masked, expected M <= 128: ours 60% of the floor (2 rows)" \
        in text
    bench.print_summary(bench.summarise([_dense("tt", 64, None, None, ours_status="n/a")]))
    assert "tt n/a (0/1)" in capsys.readouterr().out


# ---- the CLI without a GPU ---------------------------------------------------------------------------
def test_bf16_without_gpu_checks_our_cpu_path(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "deep_gemm", "bench", "--suite", "bf16", "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no Hopper GPU found" in res.stdout and "WRONG" not in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == [label for label, _, _ in bench_bf16.reference_checks(bench)]
    assert all(r["ok"] for r in rows)
