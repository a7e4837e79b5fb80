#!/usr/bin/env bash
# Installs deep_gemm from this checkout (editable) into the Python environment that `python` runs
# (or $PYTHON), with a torch build that fits the machine:
#
#   bash install.sh [EXTRA ...] [--dry-run]
#
# EXTRA: optional dependencies from pyproject.toml (test, plot); cu12 or cu13 names the CUDA major
# of the NVRTC / cuda-bindings wheels instead of detecting it. --dry-run prints the commands only.
#
# Steps (each command is printed before it runs; a second run installs nothing new):
#  1. The GPU driver's CUDA major from `nvidia-smi` ("CUDA Version: 12.x" -> cu12, 13 or newer ->
#     cu13). No working nvidia-smi: a CPU-only machine, which gets the cu13 wheels all the same (the
#     tests compile every kernel with NVRTC, which needs no GPU).
#  2. torch, only when `import torch` fails (an installed torch is never replaced):
#       CPU-only  torch alone (--no-deps) from PyTorch's CPU index, a few hundred MB where PyPI's
#                 Linux wheel brings several GB of CUDA libraries; its small pure-Python
#                 dependencies come from PyPI in step 3. DG_TORCH_INDEX=URL names another CPU index.
#       CUDA 12   PyTorch's CUDA 12.8 build (CUDA's minor-version compatibility runs it on any CUDA
#                 12 driver; PyPI's newest build may need a CUDA 13 driver).
#       CUDA 13+  PyPI's default build.
#  3. python -m pip install -e ".[cuXX,EXTRA...]"
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
DRY_RUN=0
CUDA_EXTRA=""
EXTRAS=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        cu12|cu13) CUDA_EXTRA="$arg" ;;
        -*) echo "install.sh: unknown option $arg (usage: bash install.sh [EXTRA ...] [--dry-run])" >&2; exit 2 ;;
        *) EXTRAS="$EXTRAS,$arg" ;;
    esac
done

say_and_run() {
    echo "+ $(printf "%q " "$@")"
    if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# 1. The driver's CUDA major ("" without a working nvidia-smi).
GPU_CUDA=""
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU_CUDA="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1 || true)"
fi
if [ -n "$GPU_CUDA" ] && [ "$GPU_CUDA" -lt 12 ] && [ -z "$CUDA_EXTRA" ]; then
    echo "install.sh: nvidia-smi reports CUDA $GPU_CUDA; deep_gemm's kernels need a CUDA 12 or 13 driver." \
         "Update the driver, or pass cu12 or cu13 to install anyway." >&2
    exit 1
fi
if [ -z "$CUDA_EXTRA" ]; then
    if [ "${GPU_CUDA:-13}" -eq 12 ]; then CUDA_EXTRA=cu12; else CUDA_EXTRA=cu13; fi
fi
if [ -n "$GPU_CUDA" ]; then FOUND="a GPU driver for CUDA $GPU_CUDA"; else FOUND="no GPU (no working nvidia-smi)"; fi
echo "install.sh: $FOUND; installing deep_gemm[$CUDA_EXTRA$EXTRAS] for $PYTHON"

# 2. torch, unless one is installed.
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif [ -z "$GPU_CUDA" ]; then
    CPU_INDEX="${DG_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    # PIP_EXTRA_INDEX_URL replaces the extra indexes of the pip configuration for this command: one
    # of them could offer a CUDA build with a higher version number.
    say_and_run env PIP_EXTRA_INDEX_URL="$CPU_INDEX" "$PYTHON" -m pip install --no-deps "torch>=2.4" \
        --index-url "$CPU_INDEX"
    # A CUDA build requires nvidia-* / cuda-* packages: refuse before step 3 downloads them.
    if [ "$DRY_RUN" -eq 0 ] && ! "$PYTHON" -c "import importlib.metadata as m, sys
sys.exit(any(r.startswith(('nvidia-', 'cuda-')) for r in m.requires('torch') or []))"; then
        echo "install.sh: pip picked a CUDA build of torch (a find-links folder of the pip configuration?);" \
             "run '$PYTHON -m pip uninstall torch' and set DG_TORCH_INDEX to a CPU-only index." >&2
        exit 1
    fi
elif [ "$GPU_CUDA" -eq 12 ]; then
    say_and_run "$PYTHON" -m pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cu128
else
    say_and_run "$PYTHON" -m pip install "torch>=2.4"
fi

# 3. deep_gemm with its extras (and torch's remaining dependencies), from the usual indexes.
say_and_run "$PYTHON" -m pip install -e ".[$CUDA_EXTRA$EXTRAS]"
