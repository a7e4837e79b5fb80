"""deep_gemm: FP8 GEMMs with DeepSeek-V3 fine-grained scaling for NVIDIA Hopper GPUs.

Kernels are compiled at run time (NVRTC) and cached on disk; on CPU tensors or without a Hopper GPU
every function runs its plain-torch reference instead.
"""
from . import reference, utils
from .api import (
    check_m_indices,
    gemm_fp8_fp8_bf16_nt,
    get_m_alignment_for_contiguous_layout,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)
from .utils import ceil_div, get_col_major_tma_aligned_tensor, get_num_sms, get_tma_aligned_size, set_num_sms

# DeepGEMM v2 names.
fp8_gemm_nt = gemm_fp8_fp8_bf16_nt
m_grouped_fp8_gemm_nt_contiguous = m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
m_grouped_fp8_gemm_nt_masked = m_grouped_gemm_fp8_fp8_bf16_nt_masked

__version__ = "0.1.0"

__all__ = [
    "gemm_fp8_fp8_bf16_nt",
    "fp8_gemm_nt",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "check_m_indices",
    "ceil_div",
    "get_col_major_tma_aligned_tensor",
    "get_m_alignment_for_contiguous_layout",
    "get_num_sms",
    "get_tma_aligned_size",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
    "set_num_sms",
]
