"""The README's example runs where it is pasted (here: on the CPU, through the reference path)."""
from __future__ import annotations

import re
from pathlib import Path

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
