"""Command line: `python -m deep_gemm {info,bench,precompile} ...`.

`bench` and `precompile` hand their remaining arguments to deep_gemm.bench.main and
deep_gemm.jit.precompile_cli.main; `info` reports the machine and the kernel cache and works
without a GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("DG_JIT_CACHE_DIR") or os.path.join("~", ".deep_gemm"))


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _try(fn, default="n/a"):
    try:
        value = fn()
        return default if value is None else value
    except Exception as exc:              # info must never fail: report what went wrong instead
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _cuda_bindings(module: str):
    try:
        return __import__(f"cuda.bindings.{module}", fromlist=[module])
    except ImportError:
        return __import__(f"cuda.{module}", fromlist=[module])   # cuda-python < 12.6 layout


def _nvrtc_version() -> str:
    # With the wheel's full version: patch releases change the kernels' SASS.
    from .jit.compiler import NvrtcCompiler
    return NvrtcCompiler().identity.removeprefix("nvrtc ")


def _driver_cuda_version() -> str:
    err, version = _cuda_bindings("driver").cuDriverGetVersion()
    if int(err) != 0:
        raise RuntimeError(f"cuDriverGetVersion returned {err}")
    return f"{version // 1000}.{version % 1000 // 10}"


def _driver_release() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    res = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None


def _nvcc_version() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)
    if not nvcc or not os.path.exists(nvcc):
        return "not found"
    res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"release ([\d.]+)", res.stdout)
    return f"{found.group(1) if found else res.stdout.strip()[-40:]} ({nvcc})"


def _gpu_lines():
    import torch
    if not torch.cuda.is_available():
        return [("GPU", "none visible" if torch.version.cuda else "none (torch built without CUDA)")]
    from .utils import get_num_sms
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append((f"GPU {i}", f"{p.name}, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}, "
                                  f"{p.total_memory / 2**30:.0f} GiB"))
    lines.append(("SMs used by deep_gemm", str(get_num_sms())))
    return lines


def cmd_info(argv) -> int:
    argparse.ArgumentParser(prog="python -m deep_gemm info",
                            description="Report GPU, toolchain and kernel cache.").parse_args(argv)
    import torch
    from . import __version__
    lines = [("deep_gemm", __version__), ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")]
    gpus = _try(_gpu_lines)
    lines += gpus if isinstance(gpus, list) else [("GPU", gpus)]
    lines.append(("driver", f"{_try(_driver_release)} (CUDA {_try(_driver_cuda_version)})"))
    lines.append(("NVRTC", _try(_nvrtc_version)))
    lines.append(("nvcc", _try(_nvcc_version)))
    root = cache_dir()
    entries = os.path.join(root, "cache")
    if os.path.isdir(entries):
        names = [n for n in os.listdir(entries) if os.path.isdir(os.path.join(entries, n))]
        lines.append(("kernel cache", f"{root}: {len(names)} kernels, {_human(_tree_bytes(entries))}"))
    else:
        lines.append(("kernel cache", f"{root}: empty"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0


def cmd_bench(argv) -> int:
    from .bench import main
    return main(argv)


def cmd_precompile(argv) -> int:
    try:
        from .jit.precompile_cli import main
    except ImportError as exc:
        print(f"precompile is not available in this build ({exc}); the JIT compiles each kernel "
              f"on its first call instead", file=sys.stderr)
        return 1
    return main(argv)


COMMANDS = {"info": cmd_info, "bench": cmd_bench, "precompile": cmd_precompile}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep_gemm",
                                     description="FP8 GEMMs with fine-grained scaling for Hopper GPUs.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"deep_gemm {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), help="info | bench | precompile")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command (see COMMAND -h)")
    ns = parser.parse_args(argv)
    return COMMANDS[ns.command](ns.args) or 0


if __name__ == "__main__":
    sys.exit(main())
