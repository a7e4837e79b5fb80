"""Generated translation units: a KernelConfig's constants + the kernel headers.

The only code generated here is the wgmma wrapper, whose operand list length
depends on BLOCK_N (one fp32 register per 2 columns); everything else is in
deep_gemm/kernels/*.cuh.
"""
from __future__ import annotations

from ..plan import KernelConfig, store_chunk_cols

GEMM_KERNEL_NAME = "deep_gemm_fp8_gemm"


def wgmma_fp8_source(block_n: int) -> str:
    """`wgmma_m64k32(d, desc_a, desc_b, accumulate)`: D(64 x block_n) (+)= A(64x32) B(32 x block_n)."""
    regs = block_n // 2
    outs = ", ".join(f"%{i}" for i in range(regs))
    constraints = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return f"""
DG_DEVICE void wgmma_m64k32(float (&d)[{regs}], uint64_t desc_a, uint64_t desc_b, bool accumulate) {{
    asm volatile(
        "{{\\n"
        ".reg .pred p;\\n"
        "setp.ne.b32 p, %{regs + 2}, 0;\\n"
        "wgmma.mma_async.sync.aligned.m64n{block_n}k32.f32.e4m3.e4m3 "
        "{{{outs}}}, %{regs}, %{regs + 1}, p, 1, 1;\\n"
        "}}\\n"
        : {constraints}
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}}
"""


def gemm_source(config: KernelConfig) -> str:
    lines = [f"// deep_gemm kernel {config.name}", '#include "ptx.cuh"']
    constants = dict(config.constants())
    constants["STORE_CHUNK_COLS"] = store_chunk_cols(config.block_n)
    lines += [f"#define {key} {value}" for key, value in constants.items()]
    lines.append(wgmma_fp8_source(config.block_n))
    if config.pipeline_halves:   # an overload for the two N halves of a block (its own array size)
        lines.append(wgmma_fp8_source(config.block_n // 2))
    lines.append('#include "gemm.cuh"')
    return "\n".join(lines) + "\n"
