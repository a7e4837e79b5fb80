"""CPU time to issue one GEMM call (host overhead), next to torch._scaled_mm.

    PYTHONPATH=. python3 scripts/host_overhead.py            # on a Hopper GPU: the real thing
    PYTHONPATH=. python3 scripts/host_overhead.py --mock     # anywhere: driver calls faked

Method (the issue's): for each shape, one warm-up call (compiles and loads the kernel, fills
the caches), a synchronise, then CALLS calls back to back without synchronising, each timed
with perf_counter; the figure is the median of those per-call times, and the summary line
is the median over shapes. "miss" columns time the same calls with the launch cache emptied
before each one (validation, planning and packing run again; tensor maps still come from their
cache), "cold" (dense only) also empties the tensor-map and plan caches: the cost of a call
whose pointers were never seen, e.g. a new M in eager serving.

Without a Hopper GPU (or with --mock) the CUDA driver is replaced by no-op fakes and CPU
tensors stand in for GPU ones: every line of deep_gemm's Python runs, but cuLaunchKernel,
cuTensorMapEncodeTiled and the stream query cost nothing, so the numbers are a lower bound
for the Python part only. torch._scaled_mm is measured only on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import sys
import time
import types

import torch

CALLS = 100
DENSE = [(m, n, k) for m in (64, 128, 4096) for n, k in (
    (7168, 576), (2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))]
CONTIGUOUS = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048),
              (32, 256, 4096, 7168), (32, 256, 7168, 2048)]
MASKED = [(1, 1024, 4096, 7168), (1, 1024, 7168, 2048), (2, 512, 4096, 7168), (2, 512, 7168, 2048),
          (4, 256, 4096, 7168), (4, 256, 7168, 2048), (16, 64, 4096, 7168), (16, 64, 7168, 2048),
          (32, 32, 4096, 7168), (32, 32, 7168, 2048)]


# ---------------------------------------------------------------------------------------------
# Mock mode: fake driver, CPU tensors treated as if they sat on a Hopper GPU.
# ---------------------------------------------------------------------------------------------
class _AnyEnum:
    def __getattr__(self, name):
        return name


class _FakeDriver:
    """Just enough of cuda.bindings.driver for module loading, tensor maps and launches."""

    class CUresult:
        CUDA_SUCCESS = 0

    CUtensorMapDataType = CUtensorMapInterleave = CUtensorMapSwizzle = _AnyEnum()
    CUtensorMapL2promotion = CUtensorMapFloatOOBfill = _AnyEnum()
    CUfunction_attribute = CUlaunchAttributeID = CUstreamCaptureMode = _AnyEnum()
    cuuint64_t = cuuint32_t = CUstream = int
    _descriptor = (ctypes.c_uint8 * 128)()

    class _TensorMap:
        def getPtr(self):
            return ctypes.addressof(_FakeDriver._descriptor)

    class CUlaunchConfig(types.SimpleNamespace):
        pass

    class CUlaunchAttribute:
        def __init__(self):
            dim = types.SimpleNamespace(x=1, y=1, z=1)
            self.value = types.SimpleNamespace(clusterDim=dim)

    def cuTensorMapEncodeTiled(self, *args):
        return 0, self._TensorMap()

    def cuModuleLoadData(self, cubin):
        return 0, object()

    def cuModuleGetFunction(self, module, name):
        return 0, object()

    def cuFuncSetAttribute(self, *args):
        return (0,)

    def cuOccupancyMaxActiveClusters(self, *args):
        return 0, 16

    def cuLaunchKernel(self, *args):
        return (0,)

    def cuLaunchKernelEx(self, *args):
        return (0,)

    def cuStreamCreate(self, flags):
        return 0, 1

    def cuStreamBeginCapture(self, *args):
        return (0,)

    def cuStreamEndCapture(self, stream):
        return 0, object()

    def cuGraphInstantiate(self, graph, flags):
        return 0, object()

    def cuGraphLaunch(self, *args):
        return (0,)

    def cuGraphDestroy(self, *args):
        return (0,)

    cuStreamDestroy = cuGraphExecDestroy = cuGraphDestroy

    def cuGetErrorName(self, err):
        return 0, b"CUDA_ERROR_FAKE"

    def cuGetErrorString(self, err):
        return 0, b"fake driver"


def install_mocks() -> None:
    """Route deep_gemm's Hopper path onto the fake driver (works on any machine)."""
    import deep_gemm.ops.gemm as gemm_ops
    import deep_gemm.ops.grouped as grouped_ops
    from deep_gemm import utils
    from deep_gemm.runtime import driver, kernels

    driver._driver = _FakeDriver()
    gemm_ops.runs_on_hopper = grouped_ops.runs_on_hopper = lambda device: True
    kernels.compile_kernel = lambda *args, **kwargs: types.SimpleNamespace(cubin=b"")
    kernels.device_arch = lambda device: "sm_90a"
    if hasattr(utils, "device_sm_count"):
        utils.device_sm_count = lambda index: 132
    try:
        from deep_gemm.runtime import launch
        launch._raw_stream_fn = lambda index: 0
        launch._stream_capturing = lambda: False
    except ImportError:  # an older tree without runtime/launch.py
        pass
    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.is_current_stream_capturing = lambda: False
    stream = types.SimpleNamespace(cuda_stream=0)
    torch.cuda.current_stream = lambda device=None: stream


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------
FP8 = torch.float8_e4m3fn


def _fp8(shape, device):
    return torch.zeros(shape, dtype=torch.uint8, device=device).view(FP8)


def _col_major_scales(rows, kb, device, groups=None):
    from deep_gemm.utils import get_col_major_tma_aligned_tensor
    shape = (rows, kb) if groups is None else (groups, rows, kb)
    return get_col_major_tma_aligned_tensor(torch.ones(shape, device=device))


def dense_inputs(m, n, k, device):
    kb, nb = (k + 127) // 128, (n + 127) // 128
    lhs = (_fp8((m, k), device), _col_major_scales(m, kb, device))
    rhs = (_fp8((n, k), device), torch.ones((nb, kb), device=device))
    return lhs, rhs, torch.empty((m, n), dtype=torch.bfloat16, device=device)


def contiguous_inputs(groups, m_per_group, n, k, device):
    m = groups * m_per_group           # already a multiple of the 128-row alignment
    kb, nb = (k + 127) // 128, (n + 127) // 128
    lhs = (_fp8((m, k), device), _col_major_scales(m, kb, device))
    rhs = (_fp8((groups, n, k), device), torch.ones((groups, nb, kb), device=device))
    m_indices = torch.arange(groups, dtype=torch.int32, device=device).repeat_interleave(m_per_group)
    return lhs, rhs, torch.empty((m, n), dtype=torch.bfloat16, device=device), m_indices


def masked_inputs(groups, expected_m, n, k, device):
    max_m = 4096 if expected_m >= 256 else 256
    kb, nb = (k + 127) // 128, (n + 127) // 128
    lhs = (_fp8((groups, max_m, k), device), _col_major_scales(max_m, kb, device, groups))
    rhs = (_fp8((groups, n, k), device), torch.ones((groups, nb, kb), device=device))
    masked_m = torch.full((groups,), expected_m, dtype=torch.int32, device=device)
    return lhs, rhs, torch.empty((groups, max_m, n), dtype=torch.bfloat16, device=device), masked_m, expected_m


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
def _sync(real: bool) -> None:
    if real:
        torch.cuda.synchronize()


def per_call_us(fn, real: bool, calls: int = CALLS, before=None) -> float:
    """Median CPU µs of one call over `calls` back-to-back calls (no synchronisation between).
    `before`, if given, runs untimed ahead of every call."""
    fn()                                    # warm-up: compile, load, fill caches
    _sync(real)
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    _sync(real)
    return statistics.median(times) * 1e6


def _clear_launch_caches() -> None:
    import deep_gemm.ops.gemm as gemm_ops
    import deep_gemm.ops.grouped as grouped_ops
    for cache in (getattr(gemm_ops, "_dense_launches", None), getattr(grouped_ops, "_contiguous_launches", None),
                  getattr(grouped_ops, "_masked_launches", None)):
        if cache is not None:
            cache.clear()


def _clear_all_caches() -> None:
    from deep_gemm import plan
    from deep_gemm.runtime import tma
    _clear_launch_caches()
    tma.tensor_map.cache_clear()
    if hasattr(plan, "clear_plan_cache"):
        plan.clear_plan_cache()


def _scaled_mm_fn(lhs, rhs):
    try:
        from deep_gemm.baselines import prepare_cublas
        return prepare_cublas(lhs[0], lhs[1], rhs[0], rhs[1])
    except Exception as exc:  # torch without block-scaled cuBLASLt, or no baselines module
        print(f"  (torch._scaled_mm unavailable: {str(exc).splitlines()[0][:100]})")
        return None


def _fmt(x) -> str:
    return f"{x:8.1f}" if x is not None else "     n/a"


def run(real: bool, calls: int) -> dict:
    import deep_gemm
    device = "cuda" if real else "cpu"
    summary = {}

    print(f"{'dense M x N x K':>22} {'ours µs':>8} {'miss µs':>8} {'cold µs':>8} {'out=None':>8} "
          f"{'scaled_mm':>9}")
    rows = []
    scaled_ok = real
    for m, n, k in DENSE:
        lhs, rhs, out = dense_inputs(m, n, k, device)
        ours = per_call_us(lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out), real, calls)
        miss = per_call_us(lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out), real, calls,
                           before=_clear_launch_caches)
        cold = per_call_us(lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out), real, calls,
                           before=_clear_all_caches)
        alloc = per_call_us(lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs), real, calls)
        ref = None
        if scaled_ok:
            fn = _scaled_mm_fn(lhs, rhs)
            if fn is None:
                scaled_ok = False
            else:
                ref = per_call_us(fn, real, calls)
        rows.append((ours, miss, cold, alloc, ref))
        print(f"{f'{m} x {n} x {k}':>22} {_fmt(ours)} {_fmt(miss)} {_fmt(cold)} {_fmt(alloc)} {_fmt(ref):>9}",
              flush=True)
        del lhs, rhs, out
    summary["dense"] = [statistics.median(col) if all(v is not None for v in col) else None
                        for col in zip(*rows)]

    print(f"\n{'contiguous G x M/G, N x K':>28} {'ours µs':>8} {'miss µs':>8}")
    rows = []
    for groups, mpg, n, k in CONTIGUOUS:
        lhs, rhs, out, m_indices = contiguous_inputs(groups, mpg, n, k, device)
        fn = lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)  # noqa: E731
        rows.append((per_call_us(fn, real, calls), per_call_us(fn, real, calls, before=_clear_launch_caches)))
        print(f"{f'{groups} x {mpg}, {n} x {k}':>28} {_fmt(rows[-1][0])} {_fmt(rows[-1][1])}", flush=True)
        del lhs, rhs, out, m_indices
    summary["contiguous"] = [statistics.median(col) for col in zip(*rows)]

    print(f"\n{'masked G x expected M, N x K':>30} {'ours µs':>8} {'miss µs':>8}")
    rows = []
    for groups, expected, n, k in MASKED:
        lhs, rhs, out, masked_m, expected_m = masked_inputs(groups, expected, n, k, device)
        fn = lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)  # noqa: E731
        rows.append((per_call_us(fn, real, calls), per_call_us(fn, real, calls, before=_clear_launch_caches)))
        print(f"{f'{groups} x {expected}, {n} x {k}':>30} {_fmt(rows[-1][0])} {_fmt(rows[-1][1])}", flush=True)
        del lhs, rhs, out, masked_m
    summary["masked"] = [statistics.median(col) for col in zip(*rows)]
    return summary


def _ctypes_launcher(prepared):
    """The launch of `prepared` made through ctypes straight into libcuda instead of
    cuda-bindings: a comparison for the cost of the binding layer (None if unavailable)."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        handle = int(prepared.function)
        args = (prepared.grid, 1, 1, prepared.num_threads, 1, 1, prepared.smem_bytes)

        def launch():
            err = fn(handle, *args, prepared.stream, prepared.address, None)
            if err:
                raise RuntimeError(f"cuLaunchKernel through ctypes returned {err}")
        launch()
        return launch
    except Exception as exc:
        print(f"  (ctypes comparison unavailable: {exc})")
        return None


def stages(real: bool, m: int = 128, n: int = 7168, k: int = 2048) -> None:
    """Where the time of one dense call goes (µs per call, best of several loops)."""
    from deep_gemm import plan, validation
    import deep_gemm
    import deep_gemm.ops.gemm as gemm_ops
    device = "cuda" if real else "cpu"
    lhs, rhs, out = dense_inputs(m, n, k, device)
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    _sync(real)

    def loop_us(fn, n_iter=100, reps=30):
        # Short loops with a synchronise between them (untimed): on a GPU, thousands of launches
        # in a row would fill the launch queue and time the GPU instead of the CPU.
        per_loop = []
        for _ in range(reps):
            _sync(real)
            t0 = time.perf_counter()
            for _ in range(n_iter):
                fn()
            per_loop.append((time.perf_counter() - t0) / n_iter * 1e6)
        _sync(real)
        return statistics.median(per_loop)

    num_sms = deep_gemm.get_num_sms()
    parts = {
        "whole call (launch cache hit)": lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out),
        "check_dense (validation)": lambda: validation.check_dense(lhs, rhs, out),
        "plan_dense (uncached)": lambda: plan.plan_dense(m, n, k, num_sms),
        "get_num_sms()": deep_gemm.get_num_sms,
    }
    if hasattr(plan, "plan_cached"):
        parts["plan_cached"] = lambda: plan.plan_cached(m, n, k, num_sms)
    if hasattr(gemm_ops, "_dense_key"):
        from deep_gemm.runtime.launch import current_raw_stream
        key, tensors = gemm_ops._dense_key(lhs, rhs, out)
        launch = gemm_ops._dense_launches.find(key, tensors)
        guard = gemm_ops._dense_launches.get(key)[0][0]
        parts["launch key (pointers, stream)"] = lambda: gemm_ops._dense_key(lhs, rhs, out)
        parts["layout guard (the rest of the hit's validation)"] = lambda: guard(*tensors)
        parts["key + lookup + guard"] = lambda: gemm_ops._dense_launches.find(*gemm_ops._dense_key(lhs, rhs, out))
        parts["current_raw_stream"] = lambda: current_raw_stream(0)
        if launch is not None:
            parts["PreparedLaunch.fire (a graph once fired twice)"] = launch.fire
            if hasattr(launch, "_graph"):
                parts["  its kernel launch (cuLaunchKernelEx)"] = lambda: launch._launch(
                    launch._config, launch.function, launch.address, 0)
        parts["whole call (launch cache miss)"] = lambda: (_clear_launch_caches(),
                                                          deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out))
    if real:
        parts["torch.cuda.current_stream().cuda_stream"] = lambda: torch.cuda.current_stream().cuda_stream
        if hasattr(gemm_ops, "_dense_key") and launch is not None:
            ctypes_launch = _ctypes_launcher(launch)
            if ctypes_launch is not None:
                parts["same launch through ctypes + libcuda (comparison)"] = ctypes_launch
    print(f"\nstages of one dense call, {m} x {n} x {k}:")
    for name, fn in parts.items():
        print(f"  {name:48s} {loop_us(fn):7.2f} µs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mock", action="store_true", help="fake the driver even if a GPU is present")
    parser.add_argument("--calls", type=int, default=CALLS, help=f"back-to-back calls per shape (default {CALLS})")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    args = parser.parse_args(argv)

    real = not args.mock and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if real:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        install_mocks()
        print("MOCK mode (no Hopper GPU or --mock): fake driver, CPU tensors; Python cost only, "
              "cuLaunchKernel and the stream query cost nothing here")
    summary = run(real, args.calls)
    print("\nmedian over shapes (µs per call):")
    d = summary["dense"]
    print(f"  dense:      ours {_fmt(d[0])}   miss {_fmt(d[1])}   cold {_fmt(d[2])}   out=None {_fmt(d[3])}   "
          f"torch._scaled_mm {_fmt(d[4])}")
    print(f"  contiguous: ours {_fmt(summary['contiguous'][0])}   miss {_fmt(summary['contiguous'][1])}")
    print(f"  masked:     ours {_fmt(summary['masked'][0])}   miss {_fmt(summary['masked'][1])}")
    if not args.no_stages:
        stages(real)
    return 0


if __name__ == "__main__":
    sys.exit(main())
