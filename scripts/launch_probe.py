"""What one cuLaunchKernel costs on this machine, by parameter size and calling layer.

    PYTHONPATH=. python3 scripts/launch_probe.py      (Hopper GPU)

Compiles three empty kernels with NVRTC (no parameter, one 8-byte pointer, a 552-byte block
like the GEMM's four tensor maps + scalars), then times back-to-back launches (no synchronise
inside a loop of 100; median of 30 loops) through cuda-bindings and through ctypes into
libcuda, with the parameters passed as a pointer array or as one buffer (`extra`), on the
default and on a created stream. A torch op and torch.empty are timed alongside as the
CPU's yardstick. Read: how much of a GEMM call's host time is the driver itself.
"""
from __future__ import annotations

import ctypes
import statistics
import time

import torch

from deep_gemm.jit.compiler import get_compiler
from deep_gemm.runtime.driver import check, driver

SOURCE = r"""
struct Big { unsigned long long words[69]; };   // 552 bytes, the GEMM's parameter block size
extern "C" __global__ void k_none() {}
extern "C" __global__ void k_ptr(float* p) { if (p == (float*)1) *p = 0.f; }
extern "C" __global__ void k_big(const __grid_constant__ Big p) { if (p.words[68] == 1) *(int*)0 = 0; }
"""


def loop_us(fn, n_iter=100, reps=30):
    per_loop = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_iter):
            fn()
        per_loop.append((time.perf_counter() - t0) / n_iter * 1e6)
    torch.cuda.synchronize()
    return statistics.median(per_loop)


def main():
    torch.cuda.init()
    torch.empty(1, device="cuda")
    cu = driver()
    cubin, _ = get_compiler().compile(SOURCE, "launch_probe.cu", "/tmp", "sm_90a")
    module = check(cu.cuModuleLoadData(cubin))
    funcs = {name: check(cu.cuModuleGetFunction(module, name.encode())) for name in ("k_none", "k_ptr", "k_big")}

    big = (ctypes.c_char * 552)()
    ptr = ctypes.c_void_p(0)
    params = {
        "k_none": None,
        "k_ptr": (ctypes.c_void_p * 1)(ctypes.addressof(ptr)),
        "k_big": (ctypes.c_void_p * 1)(ctypes.addressof(big)),
    }
    lib = ctypes.CDLL("libcuda.so.1")
    c_launch = lib.cuLaunchKernel
    c_launch.restype = ctypes.c_int
    c_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3

    side = torch.cuda.Stream()
    streams = {"default": 0, "side": side.cuda_stream}
    rows = []
    for name, func in funcs.items():
        p = params[name]
        addr = ctypes.addressof(p) if p is not None else 0
        handle = int(func)
        for sname, s in streams.items():
            rows.append((f"{name} cuda-bindings {sname}",
                         loop_us(lambda: cu.cuLaunchKernel(func, 132, 1, 1, 384, 1, 1, 0, s, addr, 0))))
            rows.append((f"{name} ctypes        {sname}",
                         loop_us(lambda: c_launch(handle, 132, 1, 1, 384, 1, 1, 0, s, addr, None))))
    # The same launch through other cuda-bindings forms: a CUstream object made once instead of
    # an int, and cuLaunchKernelEx with a launch config built once (only the stream set per call).
    func, p = funcs["k_big"], params["k_big"]
    addr = ctypes.addressof(p)
    side_obj = cu.CUstream(side.cuda_stream)
    rows.append(("k_big cuda-bindings CUstream object", loop_us(
        lambda: cu.cuLaunchKernel(func, 132, 1, 1, 384, 1, 1, 0, side_obj, addr, 0))))
    config = cu.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = 132, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = 384, 1, 1
    config.sharedMemBytes = 0
    config.numAttrs = 0
    config.hStream = side.cuda_stream

    def launch_ex():
        config.hStream = side_obj
        return cu.cuLaunchKernelEx(config, func, addr, 0)
    rows.append(("k_big cuLaunchKernelEx (config reused)", loop_us(launch_ex)))
    rows.append(("k_big cuLaunchKernelEx, stream not reset", loop_us(
        lambda: cu.cuLaunchKernelEx(config, func, addr, 0))))
    # cuLaunchKernelEx straight into libcuda through ctypes, on cuda-bindings' own config struct
    # (getPtr) and with the four arguments made once as ctypes objects.
    ex = lib.cuLaunchKernelEx
    ex.restype = ctypes.c_int
    ex.argtypes = [ctypes.c_void_p] * 4
    config.hStream = side_obj
    ex_args = (ctypes.c_void_p(config.getPtr()), ctypes.c_void_p(int(func)), ctypes.c_void_p(addr), None)
    rows.append(("k_big ctypes cuLaunchKernelEx (prebuilt args)", loop_us(lambda: ex(*ex_args))))
    # The same launch captured once into a CUDA graph, then replayed with cuGraphLaunch: would
    # a graph per cached launch issue faster than the kernel launch itself?
    config.hStream = side_obj
    check(cu.cuStreamBeginCapture(side_obj, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
    check(cu.cuLaunchKernelEx(config, func, addr, 0))
    graph = check(cu.cuStreamEndCapture(side_obj))
    graph_exec = check(cu.cuGraphInstantiate(graph, 0))
    rows.append(("k_big cuGraphLaunch (1-kernel graph)", loop_us(lambda: cu.cuGraphLaunch(graph_exec, side_obj))))
    def build_graph():
        stream = check(cu.cuStreamCreate(1))
        check(cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED))
        config.hStream = stream
        check(cu.cuLaunchKernelEx(config, func, addr, 0))
        built = check(cu.cuStreamEndCapture(stream))
        made = check(cu.cuGraphInstantiate(built, 0))
        check(cu.cuGraphDestroy(built))
        check(cu.cuStreamDestroy(stream))
        config.hStream = side_obj
        return made
    rows.append(("build a 1-kernel graph exec (capture)", loop_us(build_graph, n_iter=10, reps=5)))
    rows.append(("torch._C._cuda_isCurrentStreamCapturing()", loop_us(torch._C._cuda_isCurrentStreamCapturing)))
    rows.append(("cuStreamIsCapturing(side) cuda-bindings", loop_us(lambda: cu.cuStreamIsCapturing(side_obj))))
    is_cap = lib.cuStreamIsCapturing
    is_cap.restype = ctypes.c_int
    is_cap.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    status = ctypes.c_int(0)
    cap_args = (ctypes.c_void_p(side.cuda_stream), ctypes.byref(status))
    rows.append(("ctypes cuStreamIsCapturing (prebuilt args)", loop_us(lambda: is_cap(*cap_args))))
    errs = {int(cu.cuGraphLaunch(graph_exec, side_obj)[0]) for _ in range(10)}
    torch.cuda.synchronize()
    print("cuGraphLaunch return codes:", errs)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    execs = [build_graph() for _ in range(500)]
    for e in execs:   # first launch uploads the graph
        cu.cuGraphLaunch(e, side_obj)
    torch.cuda.synchronize()
    per_exec = (free_before - torch.cuda.mem_get_info()[0]) / len(execs)
    print(f"device memory per instantiated 1-kernel graph: {per_exec:.0f} bytes (500 graphs)")
    for e in execs:
        cu.cuGraphExecDestroy(e)
    g_launch = lib.cuGraphLaunch
    g_launch.restype = ctypes.c_int
    g_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    g_args = (ctypes.c_void_p(int(graph_exec)), ctypes.c_void_p(side.cuda_stream))
    rows.append(("k_big ctypes cuGraphLaunch (prebuilt args)", loop_us(lambda: g_launch(*g_args))))
    # One buffer through `extra` (CU_LAUNCH_PARAM_BUFFER_POINTER=1, _SIZE=2, _END=0).
    size = ctypes.c_size_t(552)
    extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(big), 2, ctypes.addressof(size), 0)
    handle = int(funcs["k_big"])
    rows.append(("k_big ctypes extra-buffer default",
                 loop_us(lambda: c_launch(handle, 132, 1, 1, 384, 1, 1, 0, 0, None, ctypes.addressof(extra)))))
    x = torch.zeros(16, device="cuda")
    rows.append(("torch x.add_(1) (16 floats)", loop_us(lambda: x.add_(1))))
    rows.append(("torch.empty((128, 7168), bf16)",
                 loop_us(lambda: torch.empty((128, 7168), dtype=torch.bfloat16, device="cuda"))))
    raw = getattr(torch._C, "_cuda_getCurrentRawStream")
    rows.append(("torch._C._cuda_getCurrentRawStream(0)", loop_us(lambda: raw(0))))
    a = torch.empty((128, 7168), device="cuda")
    rows.append(("tensor.data_ptr()", loop_us(lambda: a.data_ptr())))
    rows.append(("tensor.shape", loop_us(lambda: a.shape)))
    rows.append(("tensor.stride()", loop_us(lambda: a.stride())))
    rows.append(("tensor.device", loop_us(lambda: a.device)))
    rows.append(("tensor.dtype", loop_us(lambda: a.dtype)))
    rows.append(("tensor.is_cuda", loop_us(lambda: a.is_cuda)))
    rows.append(("python no-op lambda", loop_us(lambda: None)))
    print("launch probe (µs per call):")
    for name, us in rows:
        print(f"  {name:42s} {us:7.2f}")


if __name__ == "__main__":
    main()
