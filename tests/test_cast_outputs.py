"""The outputs of the allocating casts (per_token_cast_to_fp8, per_block_cast_to_fp8 and the transposed
casts) and the cheap path of their validation (ops/cast.py: FreshOutputs, _fresh_key).

CPU, on the fake driver of tests/test_cheap_path.py (the casts' GPU path on CPU tensors): both outputs
are views of one allocation, laid out exactly as documented (shapes, strides, dtypes), 16-byte
aligned, disjoint; separate_outputs=True (the custom ops' real kernels) gives each its own storage;
an x whose layout was validated before is not validated again, and any change of dtype, shape,
strides (transposed casts), device, group sizes or type goes the long way with the full check's
error. GPU: the same layouts and the reference's bits, through the public functions and the custom
ops.
"""
from __future__ import annotations

import pytest
import torch

import deep_gemm
import test_cheap_path as cp
from deep_gemm import reference
from deep_gemm.ops import cast as cast_ops

fake, cheap = cp.fake, cp.cheap   # the fixtures
FP8 = torch.float8_e4m3fn


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tma_aligned(m: int) -> int:
    return (m + 3) // 4 * 4


def contiguous_strides(shape) -> tuple:
    return torch.empty(shape, device="meta").stride()


# name -> (cast of x, x's shape, k_sizes or None, the documented (q shape, q strides, scales shape, scales strides))
def _per_token(shape):
    *lead, m, k = shape
    kb = ceil_div(k, 128)
    strides = (1, tma_aligned(m)) if not lead else (kb * tma_aligned(m), 1, tma_aligned(m))
    return tuple(shape), contiguous_strides(shape), (*lead, m, kb), strides


def _per_block(shape):
    *lead, n, k = shape
    scales = (*lead, ceil_div(n, 128), ceil_div(k, 128))
    return tuple(shape), contiguous_strides(shape), scales, contiguous_strides(scales)


def _transposed(shape):
    t, h = shape
    return (h, t), contiguous_strides((h, t)), (h, ceil_div(t, 128)), (1, tma_aligned(h))


def _k_grouped(shape, sizes):
    t, h = shape
    blocks = sum(ceil_div(k, 128) for k in sizes)
    return (t * h,), (1,), (blocks, h), contiguous_strides((blocks, h))


CASES = {
    "per_token": (deep_gemm.per_token_cast_to_fp8, (128, 384), None, _per_token),
    "per_token_odd": (deep_gemm.per_token_cast_to_fp8, (37, 200), None, _per_token),
    "per_token_one_row": (deep_gemm.per_token_cast_to_fp8, (1, 128), None, _per_token),
    "per_token_3d": (deep_gemm.per_token_cast_to_fp8, (3, 33, 260), None, _per_token),
    "per_block": (deep_gemm.per_block_cast_to_fp8, (256, 384), None, _per_block),
    "per_block_odd_3d": (deep_gemm.per_block_cast_to_fp8, (2, 130, 100), None, _per_block),
    "transposed": (deep_gemm.per_token_cast_to_fp8_transposed, (256, 384), None, _transposed),
    "transposed_odd": (deep_gemm.per_token_cast_to_fp8_transposed, (96, 37), None, _transposed),
    "k_grouped": (deep_gemm.k_grouped_per_token_cast_to_fp8_transposed, (256, 384), [128, 0, 64, 64], _k_grouped),
    "k_grouped_one_group": (deep_gemm.k_grouped_per_token_cast_to_fp8_transposed, (48, 100), [48], _k_grouped),
}


def _call(name, x, **kwargs):
    """The public cast; with keywords (separate_outputs), ops/cast.py's function of the same name."""
    fn, _, sizes, _ = CASES[name]
    if kwargs:
        fn = getattr(cast_ops, fn.__name__)
    return fn(x, **kwargs) if sizes is None else fn(x, sizes, **kwargs)


def _documented(name, x):
    _, _, sizes, layout = CASES[name]
    return layout(tuple(x.shape)) if sizes is None else layout(tuple(x.shape), sizes)


def _assert_layout(name, x, q, s):
    q_shape, q_strides, s_shape, s_strides = _documented(name, x)
    assert (q.dtype, tuple(q.shape), q.stride()) == (FP8, q_shape, q_strides), name
    assert (s.dtype, tuple(s.shape), s.stride()) == (torch.float32, s_shape, s_strides), name


def _span(t) -> range:
    """The bytes t's elements occupy, from its first element's address."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return range(t.data_ptr(), t.data_ptr() + extent * t.element_size())


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_are_two_documented_views_of_one_allocation(cheap, name):
    _, shape, _, _ = CASES[name]
    for _ in range(2):   # the first call validates, the second finds the layout
        x = torch.randn(shape).to(torch.bfloat16)
        q, s = _call(name, x)
        _assert_layout(name, x, q, s)
        assert q.untyped_storage().data_ptr() == s.untyped_storage().data_ptr(), "one allocation"
        assert q.storage_offset() == 0 and q.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0
        assert (s.data_ptr() - q.data_ptr()) % cast_ops.SCALES_ALIGNMENT == 0
        q_bytes, s_bytes = _span(q), _span(s)
        assert q_bytes.stop <= s_bytes.start, "the scales start past q: the two never overlap"
        # The scales' padded block (every TMA-aligned column whole) fits inside the allocation.
        padded = max(size * stride for size, stride in zip(s.shape, s.stride()))
        assert s.data_ptr() + 4 * padded <= s.untyped_storage().data_ptr() + s.untyped_storage().nbytes()


@pytest.mark.parametrize("name", list(CASES))
def test_separate_outputs_share_no_storage(cheap, name):
    """separate_outputs=True (what the custom ops' real kernels ask for): the same layouts, one
    allocation each, so torch's aliasing check of custom-op outputs passes (it fails for the
    one-allocation pair)."""
    _, shape, _, _ = CASES[name]
    x = torch.randn(shape).to(torch.bfloat16)
    q, s = _call(name, x, separate_outputs=True)
    _assert_layout(name, x, q, s)
    assert q.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
    assert not torch._C._any_output_is_alias_to_input_or_output((x,), {}, (q, s))
    assert torch._C._any_output_is_alias_to_input_or_output((x,), {}, _call(name, x))


@pytest.mark.skipif(not hasattr(torch.ops, "deep_gemm") or not hasattr(torch.ops.deep_gemm, "per_token_cast_to_fp8"),
                    reason="the custom ops are not registered on this torch")
@pytest.mark.parametrize("op", ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_token_cast_to_fp8_transposed"])
def test_the_custom_ops_real_kernels_pass_torchs_aliasing_check(cheap, op):
    x = torch.randn(64, 256).to(torch.bfloat16)
    q, s = getattr(torch.ops.deep_gemm, op)(x)   # raises if the outputs shared storage
    assert q.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
    q, s = torch.ops.deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [16, 48])
    assert q.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()


def _validations(counts) -> int:
    return counts.take()["validations"]


@pytest.mark.parametrize("name", list(CASES))
def test_a_seen_layout_is_not_validated_again(cheap, name):
    _, shape, _, _ = CASES[name]
    _call(name, torch.randn(shape).to(torch.bfloat16))
    assert _validations(cheap) == 1
    for dtype in (torch.bfloat16, torch.float16, torch.float16):   # (fp16: validated once, then seen)
        x = torch.randn(shape).to(dtype)
        q, s = _call(name, x)
        _assert_layout(name, x, q, s)
    assert _validations(cheap) == 1


def test_a_shape_change_is_validated(cheap):
    deep_gemm.per_token_cast_to_fp8(torch.randn(64, 256).to(torch.bfloat16))
    deep_gemm.per_token_cast_to_fp8(torch.randn(64, 384).to(torch.bfloat16))
    deep_gemm.per_token_cast_to_fp8(torch.randn(64, 256).to(torch.bfloat16))
    assert _validations(cheap) == 2
    with pytest.raises(ValueError, match="must be 2-D or 3-D"):
        deep_gemm.per_token_cast_to_fp8(torch.randn(64, 256).to(torch.bfloat16)[0])
    with pytest.raises(TypeError, match="must be bfloat16, float16 or float32"):
        deep_gemm.per_token_cast_to_fp8(torch.randn(64, 256).to(torch.float64))
    assert _validations(cheap) == 2


def test_transposed_strides_are_part_of_the_layout(cheap):
    """Columns must be adjacent: an x of a seen shape and dtype whose columns are not gets the full
    check's error; one with another row stride (a column slice) is validated, then seen."""
    x = torch.randn(64, 128).to(torch.bfloat16)
    deep_gemm.per_token_cast_to_fp8_transposed(x)
    assert _validations(cheap) == 1
    strided = torch.randn(128, 64).to(torch.bfloat16).t()
    with pytest.raises(ValueError) as info:
        reference.check_transposed_cast_input(strided, "x")
    with pytest.raises(ValueError) as got:
        deep_gemm.per_token_cast_to_fp8_transposed(strided)
    assert str(got.value) == str(info.value)
    cheap.take()
    wide = torch.randn(64, 256).to(torch.bfloat16)[:, :128]
    for _ in range(2):
        q, s = deep_gemm.per_token_cast_to_fp8_transposed(wide)
        _assert_layout("transposed", wide, q, s)
    assert _validations(cheap) == 1


def test_k_sizes_are_part_of_the_layout(cheap):
    x = torch.randn(128, 256).to(torch.bfloat16)
    cast = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed
    cast(x, [64, 0, 64])
    cast(x, (64, 0, 64))            # a tuple of the same ints: the same layout
    assert _validations(cheap) == 1
    q, s = cast(x, [0, 64, 64])     # the same total, other groups: validated, other scales
    assert _validations(cheap) == 1 and tuple(s.shape) == (2, 256)
    for bad, exc, match in (([64, False, 64], TypeError, r"^k_sizes\[1\] must be an int, got bool"),
                            ([64, 0, 48], ValueError, "must sum to the 128 rows"),
                            ([64, 8, 56], ValueError, r"^k_sizes\[1\] must be a non-negative multiple of 16")):
        with pytest.raises(exc, match=match):
            cast(x, bad)
    np = pytest.importorskip("numpy")
    for _ in range(2):              # equal to a seen list's ints, hashed alike: checked every call
        with pytest.raises(TypeError, match=r"^k_sizes\[0\] must be an int, got int64"):
            cast(x, [np.int64(64), 0, 64])
    assert _validations(cheap) == 5


def test_group_sizes_of_one_block_count_share_a_layout_not_their_sizes(cheap):
    """Routings with the same number of K blocks share the outputs' layout (worked out once), while
    each launch reads its own group sizes."""
    x = torch.randn(256, 128).to(torch.bfloat16)
    cast = deep_gemm.k_grouped_per_token_cast_to_fp8_transposed
    q1, s1 = cast(x, [256, 0])
    q2, s2 = cast(x, [128, 128])                  # two K blocks either way
    assert (tuple(s1.shape), tuple(q1.shape)) == (tuple(s2.shape), tuple(q2.shape)) == ((2, 128), (256 * 128,))
    # Past the three addresses and x's row stride (32 bytes): the groups' token and block starts.
    first, second = (params[32:] for _, _, params in cheap.fired[-2:])
    assert first != second
    cast(x, [128, 128])
    assert cheap.fired[-1][2][32:] == second


def test_subclasses_and_other_devices_are_never_found(cheap):
    """Only plain tensors use the cache of layouts, keyed on the device too."""
    class Sub(torch.Tensor):
        pass
    x = torch.randn(64, 256).to(torch.bfloat16)
    deep_gemm.per_token_cast_to_fp8(x)
    for _ in range(2):
        q, s = deep_gemm.per_token_cast_to_fp8(x.as_subclass(Sub))
        _assert_layout("per_token", x, q, s)
    assert _validations(cheap) == 3
    meta = torch.empty(64, 256, dtype=torch.bfloat16, device="meta")
    assert cast_ops._fresh_key("per_token", meta) != cast_ops._fresh_key("per_token", x)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        deep_gemm.per_token_cast_to_fp8("x")


def test_cpu_tensors_never_look_the_layouts_up(monkeypatch):
    """Off the GPU path (a CPU tensor, as is) the reference runs and the cache is not read."""
    class Untouchable(dict):
        def get(self, *args):
            raise AssertionError("the cache of layouts was read for a CPU tensor")
    monkeypatch.setattr(cast_ops, "_fresh_layouts", Untouchable())
    x = torch.randn(64, 256)
    q, s = deep_gemm.per_token_cast_to_fp8(x)
    want_q, want_s = reference.per_token_cast_to_fp8(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [64])


def test_the_cache_of_layouts_is_bounded(cheap, monkeypatch):
    monkeypatch.setattr(cast_ops, "MAX_FRESH_LAYOUTS", 3)
    for k in range(128, 128 * 8, 128):
        deep_gemm.per_block_cast_to_fp8(torch.randn(16, k).to(torch.bfloat16))
        assert len(cast_ops._fresh_layouts) <= 3
    assert _validations(cheap) == 7


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_outputs_of_one_allocation_are_the_references(name):
    _, shape, sizes, _ = CASES[name]
    ref = {"per_token": reference.per_token_cast_to_fp8, "per_block": reference.per_block_cast_to_fp8,
           "transposed": reference.per_token_cast_to_fp8_transposed,
           "k_grouped": lambda x: reference.k_grouped_per_token_cast_to_fp8_transposed(x, sizes)}
    reference_cast = next(fn for prefix, fn in ref.items() if name.startswith(prefix))
    for _ in range(3):   # the long path, then seen layouts at new addresses
        x = torch.randn(shape, device="cuda").to(torch.bfloat16)
        q, s = _call(name, x)
        _assert_layout(name, x, q, s)
        assert q.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
        want_q, want_s = reference_cast(x)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), name
        assert torch.equal(s, want_s), name


@pytest.mark.gpu
def test_gpu_custom_ops_eagerly():
    """The registered ops run their real kernels through torch's aliasing check of the outputs."""
    x = torch.randn(256, 512, device="cuda").to(torch.bfloat16)
    for op in ("per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_token_cast_to_fp8_transposed"):
        q, s = getattr(torch.ops.deep_gemm, op)(x)
        assert q.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
    q, s = torch.ops.deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, [128, 128])
    want_q, want_s = reference.k_grouped_per_token_cast_to_fp8_transposed(x, [128, 128])
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
