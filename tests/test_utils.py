"""Layout and bookkeeping helpers in deep_gemm.utils (CPU)."""
import pytest
import torch

import deep_gemm
from deep_gemm import api, config, reference, utils


def test_ceil_div():
    assert [utils.ceil_div(x, 128) for x in (0, 1, 127, 128, 129, 576)] == [0, 1, 1, 1, 2, 5]


@pytest.mark.parametrize("element_size, step", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_tma_aligned_size(element_size, step):
    for x in range(0, 70):
        aligned = utils.get_tma_aligned_size(x, element_size)
        assert aligned % step == 0 and x <= aligned < x + step
        assert aligned * element_size % 16 == 0


@pytest.mark.parametrize("bad", [0, 3, 32, -4])
def test_tma_aligned_size_rejects_element_size(bad):
    with pytest.raises(ValueError, match="element_size"):
        utils.get_tma_aligned_size(10, bad)


def test_m_alignment_comes_from_the_config():
    assert api.get_m_alignment_for_contiguous_layout() == config.M_ALIGNMENT_CONTIGUOUS == 128
    assert deep_gemm.get_m_alignment_for_contiguous_layout() == config.M_ALIGNMENT_CONTIGUOUS
    # The helper moved to api.py: utils.py imports nothing of the package (tests/test_structure.py).
    assert not hasattr(utils, "get_m_alignment_for_contiguous_layout")


def _expected_strides(shape):
    m, kb = shape[-2], shape[-1]
    am = utils.get_tma_aligned_size(m, 4)
    return (1, am) if len(shape) == 2 else (am * kb, 1, am)


@pytest.mark.parametrize("shape", [(33, 5), (64, 16), (1, 3), (7, 1), (4096, 56)])
def test_col_major_copy_from_row_major(shape):
    x = torch.rand(*shape) + 0.5
    y = utils.get_col_major_tma_aligned_tensor(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert utils.is_col_major_tma_aligned(y)
    if shape[0] > 1 and shape[1] > 1:
        assert y.stride() == _expected_strides(shape)
        assert y.data_ptr() != x.data_ptr()
    assert torch.equal(y, x)
    # A second pass is free: the tensor is already in the layout.
    assert utils.get_col_major_tma_aligned_tensor(y) is y


def test_col_major_no_copy_when_already_aligned():
    m, kb = 37, 6
    am = utils.get_tma_aligned_size(m, 4)
    x = torch.rand(kb, am).t()[:m]
    assert x.stride() == (1, am)
    assert utils.get_col_major_tma_aligned_tensor(x) is x


def test_col_major_copies_unaligned_column_major():
    # Column-major but with column stride M (not rounded up to 4 floats): must be re-laid out.
    m, kb = 33, 4
    x = torch.rand(kb, m).t()
    assert x.stride() == (1, m)
    y = utils.get_col_major_tma_aligned_tensor(x)
    assert y is not x and y.stride() == (1, 36) and torch.equal(x, y)


@pytest.mark.parametrize("g, m, kb", [(3, 33, 5), (2, 64, 16), (4, 1, 2), (1, 5, 1)])
def test_col_major_3d(g, m, kb):
    x = torch.rand(g, m, kb) + 0.5
    y = utils.get_col_major_tma_aligned_tensor(x)
    assert torch.equal(x, y)
    assert utils.is_col_major_tma_aligned(y)
    if m > 1 and kb > 1 and g > 1:
        assert y.stride() == _expected_strides((g, m, kb))
    assert utils.get_col_major_tma_aligned_tensor(y) is y


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 3)])
def test_col_major_empty_m(shape):
    x = torch.empty(*shape)
    y = utils.get_col_major_tma_aligned_tensor(x)
    assert y.shape == x.shape


def test_col_major_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        utils.get_col_major_tma_aligned_tensor(torch.rand(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        utils.get_col_major_tma_aligned_tensor(torch.rand(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        utils.get_col_major_tma_aligned_tensor([[1.0]])


def test_num_sms(monkeypatch):
    monkeypatch.setattr(utils, "_num_sms_override", None)
    default = utils.get_num_sms()
    if not torch.cuda.is_available():
        assert default == utils.DEFAULT_NUM_SMS == 132
    utils.set_num_sms(7)
    assert utils.get_num_sms() == 7 and utils.num_sms_override() == 7
    utils.set_num_sms(default)                # the whole device is a valid limit
    assert utils.get_num_sms() == default
    with pytest.raises(ValueError, match="num_sms"):
        utils.set_num_sms(default + 1)        # above the device's count: an error, as in DeepGEMM
    with pytest.raises(ValueError, match="num_sms"):
        utils.set_num_sms(-1)
    with pytest.raises(TypeError, match="num_sms"):
        utils.set_num_sms(8.0)
    with pytest.raises(TypeError, match="num_sms"):
        utils.set_num_sms(True)
    assert utils.get_num_sms() == default     # failed calls change nothing


def test_set_num_sms_zero_means_all_sms(monkeypatch):
    """DeepGEMM 2.x: 0 is the default, every SM of the device (get_num_sms then reports the
    device's count, and the launch cache's key goes back to the no-limit value)."""
    monkeypatch.setattr(utils, "_num_sms_override", None)
    default = utils.get_num_sms()
    deep_gemm.set_num_sms(5)
    assert deep_gemm.get_num_sms() == 5
    deep_gemm.set_num_sms(0)
    assert deep_gemm.get_num_sms() == default and utils.num_sms_override() is None


def test_pdl_flag(monkeypatch):
    monkeypatch.setattr(utils, "_pdl_enabled", False)
    assert deep_gemm.get_pdl() is False                     # off by default, as in DeepGEMM
    deep_gemm.set_pdl(True)
    assert deep_gemm.get_pdl() is True and utils.get_pdl() is True
    for bad in (1, None, "yes"):
        with pytest.raises(TypeError, match="enabled"):
            deep_gemm.set_pdl(bad)
    assert deep_gemm.get_pdl() is True                      # failed calls change nothing
    deep_gemm.set_pdl(False)
    assert deep_gemm.get_pdl() is False
    assert {"set_pdl", "get_pdl", "set_num_sms", "get_num_sms"} <= set(deep_gemm.__all__)


def test_cast_wrappers_match_reference():
    x = torch.randn(40, 300, dtype=torch.bfloat16)
    q, s = deep_gemm.per_token_cast_to_fp8(x)
    rq, rs = reference.per_token_cast_to_fp8(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    q, s = deep_gemm.per_block_cast_to_fp8(w)
    rq, rs = reference.per_block_cast_to_fp8(w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
