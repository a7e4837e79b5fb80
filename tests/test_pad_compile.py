"""CPU tests of the K-padding kernel (kernels/pad.cuh, ops/pad.py): it compiles for sm_90a with
NVRTC with no spills, the precompile CLI builds it for K % 16 != 0, and CPU tensors keep torch's
F.pad (the reference path)."""
from __future__ import annotations

import json

import pytest
import torch

import deep_gemm
from deep_gemm.jit import compile_kernel, precompile_cli
from deep_gemm.jit.pad_source import CHUNKS_PER_THREAD, KERNEL_NAME, NAME, THREADS, pad_job, pad_source
from deep_gemm.ops import gemm as gemm_ops
from deep_gemm.ops import pad
from test_cast_compile import _nvrtc  # noqa: F401  (autouse: NVRTC, a cold private cache)

FP8 = torch.float8_e4m3fn


def fp8(*shape):
    return torch.randn(*shape).to(FP8)


def test_pad_kernel_compiles_clean():
    kernel = compile_kernel(pad_source(), KERNEL_NAME, arch="sm_90a", name=NAME)
    r = kernel.resources
    assert (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes) == (0, 0, 0), kernel.log
    # A memory-bound copy: full occupancy (2048 threads per SM) needs <= 32 registers.
    assert r.registers <= 65536 // 2048, f"{r.registers} registers"
    assert r.shared_bytes == 0 and not r.warnings, r


def test_source_and_job():
    source = pad_source()
    assert f"#define PAD_THREADS {THREADS}" in source
    assert f"#define PAD_CHUNKS_PER_THREAD {CHUNKS_PER_THREAD}" in source
    assert source.rstrip().endswith('#include "pad.cuh"')
    assert pad_job("sm_90a") == (NAME, source, KERNEL_NAME, "sm_90a")


def test_cli_lists_the_pad_kernel_only_for_unaligned_k(capsys):
    assert precompile_cli.main(["--shape", "64x4096x7168", "--shape", "64x4096x1000", "--dry-run", "--json"]) == 0
    assert NAME in json.loads(capsys.readouterr().out)
    assert precompile_cli.main(["--shape", "64x4096x7168", "--dry-run", "--json"]) == 0
    assert NAME not in json.loads(capsys.readouterr().out)


def _no_kernel(*xs):
    raise AssertionError("the padding kernel ran on CPU tensors")


@pytest.mark.parametrize("a_shape,b_shape", [((7, 1000), (300, 1000)), ((3, 5, 17), (3, 9, 17)), ((4, 1), (2, 4, 1))])
def test_cpu_tensors_keep_torch_padding(monkeypatch, a_shape, b_shape):
    # CPU tensors take F.pad, never the kernel: the route is chosen by runs_on_hopper(device) alone
    # (tests/test_host_path.py fakes it to say yes for CPU tensors and so drives the kernel path with
    # them). ops/gemm.py imports pad_k16 from ops/pad.py at the call, so the stand-in is seen there.
    monkeypatch.setattr(pad, "pad_k16", _no_kernel)
    assert not gemm_ops.runs_on_hopper(torch.device("cpu"))
    lhs, rhs = (fp8(*a_shape), torch.ones(1)), (fp8(*b_shape), torch.ones(1))
    (a, sa), (b, sb) = gemm_ops.pad_operands_k_to_16(lhs, rhs)
    for padded, (x, scales), s in ((a, lhs, sa), (b, rhs, sb)):
        assert s is scales and padded.shape == pad.padded_shape(x) and padded.is_contiguous()
        k = x.shape[-1]
        assert torch.equal(padded[..., :k].view(torch.uint8), x.view(torch.uint8))
        assert not padded[..., k:].view(torch.uint8).any()


def test_aligned_or_strided_operands_are_left_alone_unless_a_partner_is_padded():
    aligned = (fp8(8, 1024), torch.ones(1))
    strided = (fp8(8, 2000)[:, :1000], torch.ones(1))   # K = 1000 on 16-byte aligned rows: TMA reads it
    assert gemm_ops.pad_operands_k_to_16(aligned, aligned) == (aligned, aligned)
    assert gemm_ops.pad_operands_k_to_16(strided, strided) == (strided, strided)
    # A contiguous partner with K = 1000 is padded to 1008: the strided one must follow (same K).
    partner = (fp8(4, 1000), torch.ones(1))
    lhs, rhs = gemm_ops.pad_operands_k_to_16(strided, partner)
    assert lhs[0].shape == (8, 1008) and rhs[0].shape == (4, 1008)
    assert torch.equal(lhs[0][:, :1000].view(torch.uint8), strided[0].view(torch.uint8))
    assert not lhs[0][:, 1000:].view(torch.uint8).any() and lhs[1] is strided[1]


def test_k_mismatch_is_reported_not_padded_away():
    # Padding 1000 and 1001 (or 1000 and 1008) to 1008 columns would make them look alike.
    a, sa = deep_gemm.per_token_cast_to_fp8(torch.randn(8, 1000))
    for k in (1001, 1008):
        b, sb = deep_gemm.per_block_cast_to_fp8(torch.randn(16, k))
        with pytest.raises(ValueError, match="K = 1000 columns"):
            deep_gemm.gemm_fp8_fp8_bf16_nt((a, sa), (b, sb))
        b, sb = deep_gemm.per_block_cast_to_fp8(torch.randn(2, 16, k))
        with pytest.raises(ValueError, match="K = 1000 columns"):
            deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
                (a, sa), (b, sb), torch.empty(8, 16, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int32))


def _into_cases():
    src = fp8(7, 100)
    dst = torch.empty(7, 112, dtype=FP8)
    return [
        ([], ValueError, "one or two"),
        ([(src, dst)] * 3, ValueError, "one or two"),
        ([src], TypeError, r"pairs\[0\] must be a \(src, dst\) pair"),
        ([(src.float(), dst)], TypeError, "source must be torch.float8_e4m3fn"),
        ([(src, "dst")], TypeError, "destination must be a torch.Tensor"),
        ([(src, dst)], ValueError, "must be a CUDA tensor"),
    ]


@pytest.mark.parametrize("pairs,error,message", _into_cases())
def test_pad_into_rejects_bad_input(pairs, error, message):
    with pytest.raises(error, match=message):
        pad.pad_k16_into(pairs)
