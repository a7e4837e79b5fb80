"""deep_gemm: FP8 GEMMs with DeepSeek-V3 fine-grained scaling for NVIDIA Hopper GPUs.

Kernels are compiled at run time (NVRTC) and cached on disk; on CPU tensors or without a Hopper GPU
every function runs its plain-torch reference instead.

Two sets of names: the v1 functions (gemm_fp8_fp8_bf16_nt, ...: (lhs, rhs, out, ...), returning
out) and DeepGEMM 2.x's (fp8_gemm_nt, ...: (a, b, d, ...) with its keywords, returning None),
which translate the call and hand it to the v1 function.
"""
from . import reference, utils
from .api import (
    bf16_gemm_nn,
    bf16_gemm_nt,
    bf16_gemm_tn,
    bf16_gemm_tt,
    bf16_m_grouped_gemm_nt_masked,
    k_grouped_bf16_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
    check_m_indices,
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    fp8_m_grouped_gemm_nt_masked,
    gemm_fp8_fp8_bf16_nt,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_tensor,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
    per_token_cast_to_fp8_transposed,
    k_grouped_per_token_cast_to_fp8_transposed,
    set_mk_alignment_for_contiguous_layout,
    transform_sf_into_required_layout,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from .utils import (ceil_div, get_col_major_tma_aligned_tensor, get_num_sms, get_pdl, get_tma_aligned_size,
                    set_num_sms, set_pdl)

__version__ = "0.1.0"

__all__ = [
    # v1
    "gemm_fp8_fp8_bf16_nt",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "wgrad_gemm_fp8_fp8_fp32_nt",
    "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    "check_m_indices",
    "get_col_major_tma_aligned_tensor",
    "get_m_alignment_for_contiguous_layout",
    # DeepGEMM 2.x
    "fp8_gemm_nt",
    "fp8_gemm_nn",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "fp8_m_grouped_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous",
    "get_mk_alignment_for_contiguous_layout",
    "set_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "transform_sf_into_required_layout",
    "set_pdl",
    "get_pdl",
    "bf16_gemm_nt",
    "bf16_gemm_nn",
    "bf16_gemm_tn",
    "bf16_gemm_tt",
    "m_grouped_bf16_gemm_nt_contiguous",
    "m_grouped_bf16_gemm_nt_masked",
    "bf16_m_grouped_gemm_nt_masked",
    "k_grouped_bf16_gemm_tn_contiguous",
    # both
    "ceil_div",
    "get_num_sms",
    "get_tma_aligned_size",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
    "per_token_cast_to_fp8_transposed",
    "k_grouped_per_token_cast_to_fp8_transposed",
    "set_num_sms",
    # modules
    "reference",
    "utils",
]
