"""Peers the benchmark compares against (not part of the library's API).

Each peer offers `prepare(a, sa, b, sb) -> fn`: one dense block-scaled GEMM,
out = (a * sa) @ (b * sb)^T in bf16, with every layout conversion done in prepare so that
`fn()` is exactly the call to time. A peer that the installed software cannot run raises
NotImplementedError from prepare, with the reason.

- cuBLASLt block-scaled FP8 (1x128 activations, 128x128 weights) through torch, here.
- A Triton block-scaled kernel, in triton_blockscaled.py (imported only when triton exists).
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

BLOCK = 128


# ---------------------------------------------------------------------------------------------
# cuBLASLt through torch.
#
# torch (>= 2.9, built with CUDA >= 12.9, sm_90 only) reaches cuBLASLt's DeepSeek-style
# scaling in two ways, and recognises the recipe from the scale tensors' shapes AND strides
# (aten/src/ATen/native/cuda/ScaledBlas.cpp: is_blockwise_1x128_scaling,
# is_blockwise_128x128_scaling, _scaled_block1x128_block128x128; pytorch PRs #158037,
# #164141, #166752):
#   * torch.nn.functional.scaled_mm(a, b.t(), scale_a, ScalingType.BlockWise1x128,
#       scale_b, ScalingType.BlockWise128x128, output_dtype=bf16)   (the "v2" API)
#       scale_a: [M, K/128] with strides (1, M)           (column-major, no padding)
#       scale_b: [round_up(K/128, 4), N/128] with strides (1, round_up(K/128, 4)),
#                i.e. sb padded to a multiple of 4 K-blocks, then transposed.
#   * torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=bf16)    (the "v1" API)
#       scale_a: as above; scale_b: sb.t(), i.e. [K/128, N/128] with strides (1, K/128).
#       Older builds do not pad K/128 to 4 and were reported to give silently wrong
#       results when K/128 % 4 != 0 (PR #166752), hence the probe below.
# ANCHORS.md reports NaN from cuBLASLt when K % 128 != 0; the harness checks every result.
# Which form works is decided once per process by running each on a few small problems
# and checking the results against a float64 reference.
# ---------------------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _scale_a_colmajor(sa: torch.Tensor) -> torch.Tensor:
    # [M, KB] with strides exactly (1, M): cuBLASLt's "outer-dim-major" 1x128 scales.
    return sa.t().contiguous().t()


def _scale_b_padded(sb: torch.Tensor) -> torch.Tensor:
    # [NB, KB] row-major -> [NB, round_up(KB, 4)] zero-padded, viewed transposed.
    nb, kb = sb.shape
    padded = torch.zeros((nb, _round_up(kb, 4)), dtype=sb.dtype, device=sb.device)
    padded[:, :kb] = sb
    return padded.t()


def _form_functional_v2(a, sa, b, sb):
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        raise NotImplementedError("torch.nn.functional.scaled_mm is missing (torch < 2.10)")
    scaling = F.ScalingType
    scale_a, scale_b, b_t = _scale_a_colmajor(sa), _scale_b_padded(sb), b.t()
    return lambda: F.scaled_mm(a, b_t, scale_a=scale_a, scale_recipe_a=scaling.BlockWise1x128,
                               scale_b=scale_b, scale_recipe_b=scaling.BlockWise128x128,
                               output_dtype=torch.bfloat16)


def _form_scaled_mm_v1(a, sa, b, sb):
    if not hasattr(torch, "_scaled_mm"):
        raise NotImplementedError("torch._scaled_mm is missing")
    scale_a, scale_b, b_t = _scale_a_colmajor(sa), sb.t(), b.t()
    return lambda: torch._scaled_mm(a, b_t, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def _form_scaled_mm_v1_padded(a, sa, b, sb):
    if not hasattr(torch, "_scaled_mm"):
        raise NotImplementedError("torch._scaled_mm is missing")
    kb = sb.shape[1]
    scale_a, scale_b, b_t = _scale_a_colmajor(sa), _scale_b_padded(sb)[:kb], b.t()
    return lambda: torch._scaled_mm(a, b_t, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


CUBLAS_FORMS = {
    "torch.nn.functional.scaled_mm(BlockWise1x128, BlockWise128x128)": _form_functional_v2,
    "torch._scaled_mm(scale_b=sb.t())": _form_scaled_mm_v1,
    "torch._scaled_mm(scale_b=sb padded to K/128 % 4 == 0, .t())": _form_scaled_mm_v1_padded,
}

_chosen_form: dict = {}      # device -> (name or None, probe log lines)


def _probe(device: torch.device):
    """Run every call form on small problems; pick the one right on the most of them."""
    from ..reference import calc_diff, dequantize_lhs, dequantize_rhs
    from ..api import per_block_cast_to_fp8, per_token_cast_to_fp8

    gen = torch.Generator(device=device).manual_seed(1234)
    problems = []
    # K/128 = 4 and 5 (catches missing K-block padding); K = 576 (K % 128 != 0); M = 130 (M % 4 != 0).
    for m, k in ((128, 512), (128, 640), (128, 576), (130, 512)):
        a, sa = per_token_cast_to_fp8(torch.randn(m, k, device=device, generator=gen))
        b, sb = per_block_cast_to_fp8(torch.randn(256, k, device=device, generator=gen))
        ref = dequantize_lhs(a, sa, torch.float64) @ dequantize_rhs(b, sb, torch.float64).T
        problems.append((f"{m}x256x{k}", a, sa, b, sb, ref))
    log, best, best_score = [], None, 0
    for name, make in CUBLAS_FORMS.items():
        results = []
        for label, a, sa, b, sb, ref in problems:
            try:
                d = calc_diff(_padded_rows(make, a, sa, b, sb)(), ref)
                results.append((label, f"{d:.1e}" if d < 1e-4 else f"WRONG ({d:.1e})", d < 1e-4))
            except Exception as exc:        # unsupported build, layout rejected, ...
                results.append((label, _one_line(exc), False))
        score = sum(ok for _, _, ok in results)
        log.append(f"{name}: " + "; ".join(f"{label} {text}" for label, text, _ in results))
        if score > best_score:
            best, best_score = name, score
    return best, log


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


def _padded_rows(make, a, sa, b, sb):
    """cuBLASLt rejects 1x128 scales whose M is not a multiple of 4 (their columns must be
    16-byte aligned; CUBLAS_STATUS_NOT_SUPPORTED otherwise): run such an A with zero rows
    appended, in a copy made here, and hand back a view of the first M output rows."""
    m = a.shape[0]
    if m % 4 == 0:
        return make(a, sa, b, sb)
    pad = -m % 4
    a_p = torch.cat([a.view(torch.uint8), a.new_zeros((pad, a.shape[1]), dtype=torch.uint8)]).view(a.dtype)
    sa_p = torch.cat([sa, sa.new_ones((pad, sa.shape[1]))])
    fn = make(a_p, sa_p, b, sb)
    return lambda: fn()[:m]


def cublas_form(device: torch.device):
    """(name of the working call form or None, probe log) for this device; probed once."""
    key = str(device)
    if key not in _chosen_form:
        _chosen_form[key] = _probe(device)
    return _chosen_form[key]


def prepare_cublas(a, sa, b, sb) -> Callable[[], torch.Tensor]:
    """cuBLASLt 1x128 x 128x128 block-scaled FP8 GEMM; raises NotImplementedError when unavailable."""
    name, log = cublas_form(a.device)
    if name is None:
        raise NotImplementedError("no torch call form gives correct block-scaled results: " + " | ".join(log))
    return _padded_rows(CUBLAS_FORMS[name], a, sa, b, sb)


# ---------------------------------------------------------------------------------------------
# Triton (optional dependency).
# ---------------------------------------------------------------------------------------------
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def prepare_triton(a, sa, b, sb, out: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
    """Best-of-configs Triton block-scaled kernel; raises NotImplementedError without triton."""
    if not triton_available():
        raise NotImplementedError("triton is not installed")
    from .triton_blockscaled import prepare
    return prepare(a, sa, b, sb, out)
