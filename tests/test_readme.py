"""The README's example runs where it is pasted (here: on the CPU, through the reference path);
its set-up commands are what CI runs, and install.sh picks the torch build and CUDA extra it says."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_is_right():
    code = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    out, (a, sa), (b, sb) = scope["out"], scope["lhs"], scope["rhs"]
    from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs
    want = dequantize_lhs(a, sa, torch.float64) @ dequantize_rhs(b, sb, torch.float64).T
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert calc_diff(out.cpu(), want.cpu()) < 1e-5


def test_license_is_shipped():
    root = README.parent
    assert "MIT License" in (root / "LICENSE").read_text()
    assert 'license = "MIT"' in (root / "pyproject.toml").read_text()
    assert (root / "deep_gemm" / "py.typed").exists()


# ---- the set-up commands: README's, CI's and install.sh's choices ---------------------------------
ROOT = README.parent


def _commands(section: str) -> list:
    """The bash blocks of a README section."""
    text = README.read_text()
    body = text[text.index(section):]
    body = body[:body.index("\n## ", 1)]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", body, re.S)]


def test_ci_runs_the_readme_test_command_literally():
    main_job, tests = _commands("## Set-up on a fresh machine")
    assert tests == "bash install.sh test && python -m pytest -q"
    assert main_job.startswith("bash install.sh plot && ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any(line.strip().startswith(tests + " ") or line.strip() == tests for line in ci)


def _install(tmp_path, *args, smi=None, torch_installed=False):
    """install.sh --dry-run with a fake nvidia-smi (None: one that fails, as without a driver);
    returns (exit status, output)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_smi = bin_dir / "nvidia-smi"
    fake_smi.write_text("#!/bin/sh\n" + (f"echo '{smi}'\n" if smi else "exit 9\n"))
    fake_smi.chmod(0o755)
    python = bin_dir / "python-under-test"    # -S: no site-packages, so no torch
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {'' if torch_installed else '-S'} \"$@\"\n")
    python.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(python), "HOME": str(tmp_path)}
    res = subprocess.run(["bash", str(ROOT / "install.sh"), *args, "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=60)
    return res.returncode, res.stdout + res.stderr


SMI_12 = "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8     |"
SMI_13 = "| NVIDIA-SMI 580.65.06    Driver Version: 580.65.06    CUDA Version: 13.0     |"


def test_install_without_gpu_takes_the_cpu_torch(tmp_path):
    rc, out = _install(tmp_path, "test")
    assert rc == 0, out
    assert "--no-deps torch\\>=2.4 --index-url https://download.pytorch.org/whl/cpu" in out
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in out
    assert out.rstrip().endswith("-m pip install -e .\\[cu13\\,test\\]"), out


@pytest.mark.parametrize("smi, extra, torch_cmd", [
    (SMI_12, "cu12", "torch\\>=2.4 --index-url https://download.pytorch.org/whl/cu128"),
    (SMI_13, "cu13", "-m pip install torch\\>=2.4 \n"),
])
def test_install_on_a_gpu_follows_the_driver(tmp_path, smi, extra, torch_cmd):
    rc, out = _install(tmp_path, "test", "plot", smi=smi)
    assert rc == 0, out
    assert torch_cmd in out + "\n" and "whl/cpu" not in out
    assert f"-m pip install -e .\\[{extra}\\,test\\,plot\\]" in out


def test_install_keeps_an_installed_torch_and_takes_an_explicit_major(tmp_path):
    rc, out = _install(tmp_path, "cu12", "test", torch_installed=True)
    assert rc == 0, out
    assert "keeping the installed torch" in out and "install torch" not in out
    assert "-e .\\[cu12\\,test\\]" in out


def test_install_refuses_an_old_driver_and_unknown_options(tmp_path):
    rc, out = _install(tmp_path, smi="| Driver Version: 470.82.01    CUDA Version: 11.4 |")
    assert rc == 1 and "CUDA 12 or 13 driver" in out
    rc, out = _install(tmp_path, "--bogus")
    assert rc == 2 and "unknown option --bogus" in out


# ---- the main job without a GPU: `python -m deep_gemm bench` honours or refuses each option -------
def _bench(tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "deep_gemm", "bench", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout + res.stderr


def test_bench_without_gpu_honours_suite_and_shape(tmp_path):
    rc, out = _bench(tmp_path, "--suite", "masked")
    assert rc == 0 and "no Hopper GPU found" in out, out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]      # bench.json by default
    assert [r["label"].split()[0] for r in rows] == ["masked"] and rows[0]["ok"]
    rc, out = _bench(tmp_path, "--shape", "16x64x128", "--json", str(tmp_path / "s.json"))
    assert rc == 0, out
    assert [r["label"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]] == ["dense 16x64x128"]


@pytest.mark.parametrize("args, named", [(("--suite", "masked", "--plot", "x.png"), "--plot"),
                                         (("--suite", "chain"), "--suite chain"),
                                         (("--iters", "5", "--flush", "read"), "--iters, --flush")])
def test_bench_without_gpu_refuses_timing_options(tmp_path, args, named):
    rc, out = _bench(tmp_path, *args)
    assert rc == 2 and f"{named}: time the kernels, which needs a Hopper GPU" in out, out
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "x.png").exists()
