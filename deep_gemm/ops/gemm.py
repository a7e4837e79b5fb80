"""Dense FP8 GEMM: validate -> normalise layouts -> plan -> launch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from .. import utils as _utils
from ..plan import plan_cached
from ..runtime.launch import LaunchCache, current_raw_stream
from ..validation import check_dense
from .device import runs_on_hopper
from . import library as _library

_is_compiling = _library.is_compiling


def _needs_k_pad(pair) -> bool:
    """TMA needs 16-byte row strides: a contiguous fp8 operand whose K is not a multiple of 16
    gets zero columns appended (zeros add nothing to the sums and the scale blocks are
    unchanged). Anything else is left to validation."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return False
    x = pair[0]
    return (isinstance(x, torch.Tensor) and x.dtype == torch.float8_e4m3fn and x.dim() >= 2
            and x.shape[-1] % 16 != 0 and x.is_contiguous())


def pad_k_to_16(pair):
    """The operand padded along K if _needs_k_pad, in torch (the reference of ops/pad.py)."""
    if not _needs_k_pad(pair):
        return pair
    x = pair[0]
    padded = F.pad(x.view(torch.uint8), (0, (-x.shape[-1]) % 16)).view(torch.float8_e4m3fn)
    return padded, pair[1]


def _last_dim(pair):
    """K of an operand (its tensor's last dimension), or None for anything validation rejects."""
    if isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], torch.Tensor) and pair[0].dim():
        return pair[0].shape[-1]
    return None


_pad_ops = None


def pad_operands_k_to_16(lhs, rhs):
    """(lhs, rhs) with each operand padded along K as pad_k_to_16 does; on a Hopper GPU both by
    one launch of ops/pad.py's kernel. Operands whose K differ are left alone: padding would hide
    the mismatch that validation must report."""
    global _pad_ops
    pads = [_needs_k_pad(lhs), _needs_k_pad(rhs)]
    if not any(pads):
        return lhs, rhs
    k_lhs, k_rhs = _last_dim(lhs), _last_dim(rhs)
    if k_lhs is not None and k_rhs is not None and k_lhs != k_rhs:
        return lhs, rhs
    xs = [pair[0] for pair, pad in zip((lhs, rhs), pads) if pad]
    device = xs[0].device
    if not (xs[0].is_cuda and all(x.device == device for x in xs) and runs_on_hopper(device)):
        return pad_k_to_16(lhs), pad_k_to_16(rhs)
    if _pad_ops is None:   # imported on first use: it pulls in the JIT
        from . import pad
        _pad_ops = pad
    padded = iter(_pad_ops.pad_k16(*xs))
    return tuple((next(padded), pair[1]) if pad else pair for pair, pad in zip((lhs, rhs), pads))


# ---- launch cache ---------------------------------------------------------------------------
# A call whose tensors have the same data pointers, shapes, strides, dtypes and devices as an
# earlier call that passed validation, was planned and launched as it came (no tensor copied,
# padded or staged), launches exactly the same kernel with exactly the same parameters. The
# cache's key holds the pointers, the current stream (a prepared launch fires on the stream it
# was prepared for, whose split-K workspace it uses) and the set_num_sms() value; each launch
# under a key carries a guard on the rest (runtime/launch.py: torch's C++ TensorGuards). So on
# a hit the key and the guard are the validation, and the call is a lookup, one guard check and
# one launch. Only plain tensors take part; any other input (and any miss) goes the long way,
# which validates everything and names the culprit. Methods are called unbound (one lookup fewer).
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_BF16 = torch.bfloat16
_dense_launches = LaunchCache()
_ptr = torch.Tensor.data_ptr
_device = torch.Tensor.get_device


_kernels = None


def _runtime_kernels():
    """deep_gemm.runtime.kernels, imported on the first launch (it pulls in the JIT) and then
    kept here: a function-level import statement costs about a microsecond per call."""
    global _kernels
    if _kernels is None:
        from ..runtime import kernels
        _kernels = kernels
    return _kernels


def _sms_for_key(key, device: torch.device) -> int:
    """The SM count a launch is planned with: the set_num_sms() value captured in the key (so an
    entry always matches its key even if set_num_sms runs meanwhile), else the device's count."""
    override = key[-1] if key is not None else _utils._num_sms_override
    return override if override is not None else _utils.device_sm_count(device.index)


def _dense_key(lhs, rhs, out):
    """(cache key, the call's five tensors) of a dense call, or None for a call that must take
    the long way."""
    try:
        if type(lhs) is not tuple or type(rhs) is not tuple or len(lhs) != 2 or len(rhs) != 2:
            return None
        a, sa = lhs
        b, sb = rhs
        if not (type(a) in _PLAIN and type(sa) in _PLAIN and type(b) in _PLAIN and type(sb) in _PLAIN
                and type(out) in _PLAIN):
            return None
        return ((_ptr(a), _ptr(sa), _ptr(b), _ptr(sb), _ptr(out), current_raw_stream(_device(a)),
                 _utils._num_sms_override), (a, sa, b, sb, out))
    except Exception:  # exotic tensors whose pointers cannot be read: the long way
        return None


def _new_dense_out(lhs, rhs):
    """out for out=None, allocated up front so that the call can use the launch cache (torch's
    caching allocator tends to hand back the same block call after call). Only the plain CUDA
    case whose rows need no padding (N % 8 == 0), where validation would allocate exactly this;
    None otherwise, and validation allocates as before."""
    if type(lhs) is tuple and type(rhs) is tuple and len(lhs) == 2 and len(rhs) == 2:
        a, b = lhs[0], rhs[0]
        if type(a) in _PLAIN and type(b) in _PLAIN and a.is_cuda:
            a_shape, b_shape = a.shape, b.shape
            if len(a_shape) == 2 and len(b_shape) == 2 and b_shape[0] % 8 == 0:
                return torch.empty((a_shape[0], b_shape[0]), dtype=_BF16, device=a.device)
    return None


def gemm_fp8_fp8_bf16_nt(lhs, rhs, out=None):
    """out[M, N] (bf16) = A[M, K] @ B[N, K]^T with DeepSeek-V3 block scales.

    lhs = (A: float8_e4m3fn [M, K], sa: float32 [M, ceil(K/128)], row-major or
    column-major TMA-aligned), rhs = (B: float8_e4m3fn [N, K], sb: float32
    [ceil(N/128), ceil(K/128)]).  Returns `out` (allocated when None).
    """
    if _is_compiling():  # torch.compile / export: trace one custom op (ops/library.py)
        return _library.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
    if out is None:
        out = _new_dense_out(lhs, rhs)
    key = tensors = None
    hit = _dense_key(lhs, rhs, out)
    if hit is not None:
        key, tensors = hit
        launch = _dense_launches.find(key, tensors)
        if launch is not None:
            launch.fire()
            return out

    args = check_dense(*pad_operands_k_to_16(lhs, rhs), out)
    result = out if out is not None else args.out
    if args.m == 0:
        return result
    if not runs_on_hopper(args.a.device):
        reference.gemm_fp8_fp8_bf16_nt((args.a, args.sa), (args.b, args.sb), args.out)
        return result

    a, b, target = args.a, args.b, args.out
    # TMA stores need 16-byte output rows; odd N goes through a padded buffer.
    staged = target.stride(0) % 8 != 0 or target.data_ptr() % 16 != 0
    if staged:
        target = torch.empty((args.m, (args.n + 7) // 8 * 8), dtype=torch.bfloat16, device=target.device)

    num_sms = _sms_for_key(key, a.device)
    config = plan_cached(args.m, args.n, args.k, num_sms)
    launch = _runtime_kernels().prepare_gemm(config, a, args.m, args.sa, args.m, b, args.n,
                                             args.sb, target, args.m, args.m, None, num_sms)
    launch.fire()
    # Cached after a launch that worked, and only when it was made from the caller's own tensors
    # (nothing padded, rebuilt or staged): then the key describes it fully.
    if (key is not None and not staged and a is lhs[0] and args.sa is lhs[1] and b is rhs[0]
            and args.sb is rhs[1] and args.out is out):
        _dense_launches.put(key, tensors, launch)
    if staged:
        args.out.copy_(target[:, :args.n])
    return result
