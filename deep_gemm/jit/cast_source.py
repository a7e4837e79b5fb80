"""Generated translation units for the FP8 cast kernels (deep_gemm/kernels/cast.cuh). All but K, the input dtype,
the access width and the kind (per-token or per-block) is a run-time argument: one kernel serves any M, N, groups.
The transposed per-token casts (kernels/cast_transposed.cuh) are described by TransposedCastConfig: H, the dtype, the
access width and whether the launch takes groups; T and the group sizes are run-time arguments."""
from __future__ import annotations

import struct
from dataclasses import dataclass

PER_TOKEN = "per_token"
PER_BLOCK = "per_block"
KERNEL_NAMES = {PER_TOKEN: "deep_gemm_per_token_cast", PER_BLOCK: "deep_gemm_per_block_cast"}
DTYPES = ("bf16", "fp16", "fp32")      # cast.cuh's CAST_BF16 / CAST_FP16 / CAST_FP32, in order
PER_TOKEN_THREADS = 256    # 32 (row, k-block) units of 8 lanes; 32 registers: full occupancy
# Per-block holds its 128x128 block in registers, 128 / (threads / 8) chunks of 16 per thread. 16-bit inputs: 256
# threads of 4 chunks give 2 CTAs/SM; fp32 chunks take twice the registers, so 1024 threads of 1 chunk keep 2 CTAs/SM.
PER_BLOCK_THREADS = {"bf16": 256, "fp16": 256, "fp32": 1024}
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def f32_bits(value: float) -> str:
    """Hex bits of the float32 nearest `value` (as torch converts a Python scalar); no C++ literal rounding risk."""
    return f"0x{struct.unpack('<I', struct.pack('<f', value))[0]:08X}u"


def _f32(value: float) -> float:
    return struct.unpack('<f', struct.pack('<f', value))[0]


@dataclass(frozen=True)
class CastConfig:
    """Compile-time description of one cast kernel variant."""
    kind: str          # PER_TOKEN or PER_BLOCK
    k: int             # columns of the input
    dtype: str         # one of DTYPES
    vec: bool          # 16-byte accesses (K % 16 == 0 and 16-byte aligned rows)

    def __post_init__(self):
        if self.kind not in KERNEL_NAMES:
            raise ValueError(f"kind must be one of {sorted(KERNEL_NAMES)}, got {self.kind!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.vec and self.k % 16:
            raise ValueError(f"vec needs k % 16 == 0, got k={self.k}")

    @property
    def kernel_name(self) -> str:
        return KERNEL_NAMES[self.kind]

    @property
    def num_threads(self) -> int:
        return PER_TOKEN_THREADS if self.kind == PER_TOKEN else PER_BLOCK_THREADS[self.dtype]

    @property
    def name(self) -> str:
        """Label for logs and cache folders."""
        return f"cast_{self.kind}_{self.dtype}_k{self.k}_{'v16' if self.vec else 'scalar'}"


def cast_source(config: CastConfig) -> str:
    # torch on CUDA computes `amax / 448.0` as amax * (1.0f / 448.0f) (scalar divisor -> fp32 reciprocal): match it.
    inv_fp8_max = _f32(_f32(1.0) / _f32(FP8_MAX))
    constants = {"CAST_K": config.k, "CAST_IN_DTYPE": DTYPES.index(config.dtype), "CAST_VEC": int(config.vec),
                 "CAST_PER_BLOCK": int(config.kind == PER_BLOCK), "CAST_THREADS": config.num_threads,
                 "CAST_AMAX_FLOOR_BITS": f32_bits(AMAX_FLOOR), "CAST_INV_FP8_MAX_BITS": f32_bits(inv_fp8_max)}
    lines = [f"// deep_gemm cast kernel {config.name}"]
    lines += [f"#define {key} {value}" for key, value in constants.items()]
    lines.append('#include "cast.cuh"')
    return "\n".join(lines) + "\n"


# ---- transposed per-token casts (kernels/cast_transposed.cuh) ------------------------------------
TRANSPOSED_KERNEL_NAME = "deep_gemm_per_token_cast_transposed"
TRANSPOSED_THREADS = 256          # 8 warps over one 128-token x 128-byte tile
# Resident CTAs per SM the register budget is set for (16 KB of shared memory each; more CTAs, more loads in
# flight): 16-bit inputs fit 40 registers without spills at 6 (8 would spill), their element-wise loads need 5; fp32
# needs only 32 registers for 8.
def transposed_min_blocks(dtype: str, vec: bool) -> int:
    if dtype == "fp32":
        return 8
    return 6 if vec else 5
# Groups one K-grouped launch takes: the group tables ride in the kernel parameter (2 KB at 256 groups,
# within the 4 KB every driver accepts); more groups take several launches.
TRANSPOSED_MAX_GROUPS = 256


@dataclass(frozen=True)
class TransposedCastConfig:
    """Compile-time description of one transposed cast kernel (x [T, H] -> e4m3 x^T [H, T], per 1x128 along T)."""
    h: int             # columns of x (rows of the output)
    dtype: str         # one of DTYPES
    vec: bool          # 16-byte loads: every row of x 16-byte aligned and h * element size % 16 == 0
    grouped: bool      # False: one group (dense); True: up to TRANSPOSED_MAX_GROUPS groups a launch

    def __post_init__(self):
        if isinstance(self.h, bool) or not isinstance(self.h, int) or self.h < 1:
            raise ValueError(f"h must be a positive int, got {self.h!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.vec and self.h * self.element_size % 16:
            raise ValueError(f"vec needs h * element size % 16 == 0, got h={self.h} ({self.dtype})")

    @property
    def element_size(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def kernel_name(self) -> str:
        return TRANSPOSED_KERNEL_NAME

    @property
    def num_threads(self) -> int:
        return TRANSPOSED_THREADS

    @property
    def max_groups(self) -> int:
        return TRANSPOSED_MAX_GROUPS if self.grouped else 1

    @property
    def tile_cols(self) -> int:
        """Columns of x one CTA takes: 128 bytes of a row."""
        return 128 // self.element_size

    @property
    def name(self) -> str:
        """Label for logs and cache folders."""
        kind = "k_grouped_transposed" if self.grouped else "transposed"
        return f"cast_{kind}_{self.dtype}_h{self.h}_{'v16' if self.vec else 'scalar'}"


def transposed_cast_source(config: TransposedCastConfig) -> str:
    inv_fp8_max = _f32(_f32(1.0) / _f32(FP8_MAX))
    constants = {"CAST_K": config.h, "CAST_IN_DTYPE": DTYPES.index(config.dtype), "CAST_VEC": int(config.vec),
                 "CAST_MAX_GROUPS": config.max_groups, "CAST_THREADS": config.num_threads,
                 "CAST_MIN_BLOCKS": transposed_min_blocks(config.dtype, config.vec),
                 "CAST_AMAX_FLOOR_BITS": f32_bits(AMAX_FLOOR), "CAST_INV_FP8_MAX_BITS": f32_bits(inv_fp8_max)}
    lines = [f"// deep_gemm cast kernel {config.name}"]
    lines += [f"#define {key} {value}" for key, value in constants.items()]
    lines.append('#include "cast_transposed.cuh"')
    return "\n".join(lines) + "\n"
