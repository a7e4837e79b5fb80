"""Probe: do the promotion FFMAs' yield and reuse bits matter for the compute-bound kernels?

DeepGEMM reports gains from editing the SASS of its promotion FFMAs so that the warp scheduler may
switch warps between them (the yield bit) and drops their register-reuse flags (a reuse cache is
only valid if the same warp issues next). ptxas 13.0 already alternates yielding and non-yielding
FFMAs in our main loops. This probe edits every FFMA of a run of 16 or more (FFMA_MODES: "yield"
lets all of them yield and drops their reuse flags, "noyield" lets none yield, "noyield_reuse" also
marks the scale operand for reuse), loads each edited cubin in place of the normal one and times
them all twice, each checked against float64. Results: docs/perf-notes.md, section 22 (ptxas'
own interleave was the fastest).

    FFMA_MODES=yield,noyield python scripts/ffma_yield_probe.py [MxNxK ...]
"""
import os
import struct
import sys

import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.bench import Timer
from deep_gemm.jit import compile_kernel
from deep_gemm.jit.kernel_source import GEMM_KERNEL_NAME, gemm_source
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs
from deep_gemm.runtime import kernels
from deep_gemm.runtime.driver import LoadedKernel
from deep_gemm.runtime.kernels import launch_gemm

FFMA_OPCODE = 0x223                 # low 12 bits of an sm_90 FFMA R, R, R, R
NO_YIELD_BIT = 1 << 45              # of the high 64-bit word (instruction bit 109)
REUSE_BITS = 0xF << 58              # operand reuse flags (instruction bits 122-125)
REUSE_B_BIT = 0x2 << 58             # reuse flag of operand b (the scale, in the promotion FFMAs)
MODES = os.environ.get("FFMA_MODES", "yield,noyield,noyield_reuse").split(",")
SHAPES = ["4096x7168x16384", "4096x4096x7168", "4096x7168x2048", "4096x24576x1536", "4096x2112x7168",
          "4096x32768x512", "4096x7168x576", "128x7168x16384"]


def text_section(cubin: bytes, kernel: str):
    """(offset, size) of the kernel's .text section in an ELF64 cubin."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
    names_off = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        name = cubin[names_off + h[0]:cubin.index(b"\0", names_off + h[0])].decode()
        if name == f".text.{kernel}":
            return h[4], h[5]
    raise ValueError(f"no .text.{kernel}")


def edit_ffma_runs(cubin: bytes, kernel: str, mode: str, min_run: int = 16):
    """The cubin with every FFMA of a run of >= min_run edited: mode "yield" clears the no-yield
    bit and the reuse flags; "noyield" sets the no-yield bit (reuse flags kept); "noyield_reuse"
    also sets operand b's reuse flag where the next FFMA reads the same register there."""
    data = bytearray(cubin)
    off, size = text_section(cubin, kernel)
    words = [struct.unpack_from("<QQ", data, off + i) for i in range(0, size, 16)]
    is_ffma = [(lo & 0xFFF) == FFMA_OPCODE for lo, _ in words]
    changed, i = 0, 0
    while i < len(words):
        j = i
        while j < len(words) and is_ffma[j]:
            j += 1
        if j - i >= min_run:
            for t in range(i, j):
                lo, hi = words[t]
                if mode == "yield":
                    new_hi = hi & ~(NO_YIELD_BIT | REUSE_BITS)
                else:
                    new_hi = hi | NO_YIELD_BIT
                    if mode == "noyield_reuse" and t + 1 < j and (words[t + 1][0] >> 32) & 0xFF == (lo >> 32) & 0xFF:
                        new_hi |= REUSE_B_BIT
                if new_hi != hi:
                    struct.pack_into("<QQ", data, off + 16 * t, lo, new_hi)
                    changed += 1
        i = max(j, i + 1)
    return bytes(data), changed


def main():
    shapes = sys.argv[1:] or SHAPES
    timer = Timer("cuda", 30)
    print(f"{'shape':>18} {'variant':>16} {'us':>8} {'TFLOPS':>7} {'diff':>9}")
    for text in shapes:
        m, n, k = (int(v) for v in text.split("x"))
        cfg = plan.plan_dense(m, n, k, 132)
        a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        b = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        ref = dequantize_lhs(*a, dtype=torch.float64) @ dequantize_rhs(*b, dtype=torch.float64).T
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def call():
            launch_gemm(cfg, a=a[0], a_rows=m, sa=a[1], sa_rows=m, b=b[0], b_rows=n,
                        sb=b[1], out=out, out_rows=m, shape_m=m, group_info=None, num_sms=132)
        normal = kernels.gemm_kernel(cfg, 0)
        compiled = compile_kernel(gemm_source(cfg), GEMM_KERNEL_NAME, arch="sm_90a", name=cfg.name)
        variants = [("normal", normal)]
        for mode in MODES:
            edited, changed = edit_ffma_runs(compiled.cubin, GEMM_KERNEL_NAME, mode)
            variants.append((f"{mode}{changed}", LoadedKernel(edited, GEMM_KERNEL_NAME, cfg.num_threads,
                                                              cfg.smem_bytes, kernels.GEMM_PARAM_TYPES,
                                                              cfg.cluster_size)))
        for name, kernel in variants + variants:
            kernels._loaded[(cfg, 0)] = kernel
            out.fill_(float("nan"))
            call()
            diff = calc_diff(out, ref)
            us, _ = timer.kernel_us(call)
            print(f"{text:>18} {name:>16} {us:8.1f} {2 * m * n * k / us / 1e6:7.0f} {diff:9.1e}", flush=True)
        kernels._loaded[(cfg, 0)] = normal


if __name__ == "__main__":
    sys.exit(main())
