"""Generated translation unit of the K-padding kernel (deep_gemm/kernels/pad.cuh). Pointers, rows and K are run-time
arguments, so one compiled kernel serves every shape; only the CTA geometry below is fixed at compile time."""
from __future__ import annotations

KERNEL_NAME = "deep_gemm_pad_k16"
NAME = "pad_k16"                # label for logs and cache folders
THREADS = 256
# 4 16-byte chunks a thread, 16 KB a CTA: amortises the index arithmetic, yet a 2112 x 1000 weight spans 100+ CTAs.
CHUNKS_PER_THREAD = 4
CHUNKS_PER_CTA = THREADS * CHUNKS_PER_THREAD


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 16: the K a GEMM with K % 16 != 0 runs with."""
    return (k + 15) // 16 * 16


def pad_source() -> str:
    return (f"// deep_gemm K-padding kernel\n#define PAD_THREADS {THREADS}\n"
            f"#define PAD_CHUNKS_PER_THREAD {CHUNKS_PER_THREAD}\n#include \"pad.cuh\"\n")


def pad_job(arch: str) -> tuple:
    """The kernel as a deep_gemm.jit.precompile job."""
    return NAME, pad_source(), KERNEL_NAME, arch
