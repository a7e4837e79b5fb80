"""Dense FP8 GEMM: validate -> normalise layouts -> plan -> launch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..plan import plan_dense
from ..utils import get_num_sms
from ..validation import check_dense
from .device import runs_on_hopper


def pad_k_to_16(pair):
    """TMA needs 16-byte row strides: a contiguous fp8 operand whose K is not a
    multiple of 16 gets zero columns appended (zeros add nothing to the sums and
    the scale blocks are unchanged).  Anything else is left to validation."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return pair
    x = pair[0]
    if (not isinstance(x, torch.Tensor) or x.dtype != torch.float8_e4m3fn or x.dim() < 2
            or x.shape[-1] % 16 == 0 or not x.is_contiguous()):
        return pair
    padded = F.pad(x.view(torch.uint8), (0, (-x.shape[-1]) % 16)).view(torch.float8_e4m3fn)
    return padded, pair[1]


def gemm_fp8_fp8_bf16_nt(lhs, rhs, out=None):
    """out[M, N] (bf16) = A[M, K] @ B[N, K]^T with DeepSeek-V3 block scales.

    lhs = (A: float8_e4m3fn [M, K], sa: float32 [M, ceil(K/128)], row-major or
    column-major TMA-aligned), rhs = (B: float8_e4m3fn [N, K], sb: float32
    [ceil(N/128), ceil(K/128)]).  Returns `out` (allocated when None).
    """
    args = check_dense(pad_k_to_16(lhs), pad_k_to_16(rhs), out)
    result = out if out is not None else args.out
    if args.m == 0:
        return result
    if not runs_on_hopper(args.a.device):
        reference.gemm_fp8_fp8_bf16_nt((args.a, args.sa), (args.b, args.sb), args.out)
        return result

    a, b, out = args.a, args.b, args.out
    # TMA stores need 16-byte output rows; odd N goes through a padded buffer.
    staged = out.stride(0) % 8 != 0 or out.data_ptr() % 16 != 0
    target = torch.empty((args.m, (args.n + 7) // 8 * 8), dtype=torch.bfloat16, device=out.device) if staged else out

    from ..runtime.kernels import launch_gemm
    config = plan_dense(args.m, args.n, args.k, get_num_sms())
    launch_gemm(config, a=a, a_rows=args.m, sa=args.sa, sa_rows=args.m, sa_cols=args.sa.shape[-1],
                b=b, b_rows=args.n, sb=args.sb, out=target, out_rows=args.m, shape_m=args.m,
                group_info=None, num_sms=get_num_sms())
    if staged:
        out.copy_(target[:, :args.n])
    return result
