import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.kv.quant import KIVI, dequantize, pack, quantize_keys, quantize_values, unpack


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_roundtrip_is_exact(bits, rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    d = groups * 8
    codes = torch.randint(0, 2**bits, (rows, 3, d), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == d * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_first_code_in_low_bits():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(codes, 2).item() == 1 | 2 << 2 | 3 << 4
    assert pack(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4).item() == 0x5A


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="multiple"):
        pack(torch.zeros(6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_key_and_value_error_within_half_a_step(bits):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 64, 32) * 3 + torch.linspace(-5, 5, 32)  # per-channel offsets, as keys have
    for q, axis_dim in ((quantize_keys(x, bits, 16), 3), (quantize_values(x, bits, 16), 4)):
        rec = dequantize(q)
        b, h, n, d = x.shape
        if q.axis == "token":
            xs = x.reshape(b, h, n // 16, 16, d)
            step = q.scale.float().unsqueeze(3).expand_as(xs).reshape(b, h, n, d)
        else:
            xs = x.reshape(b, h, n, d // 16, 16)
            step = q.scale.float().unsqueeze(4).expand_as(xs).reshape(b, h, n, d)
        err = (rec - x).abs()
        # half a quantization step, plus float16 rounding of the group minimum
        bound = step / 2 + x.abs() * 2**-10 + 1e-6
        assert (err <= bound).all(), (bits, q.axis, (err - bound).max())
        # and the step is what `bits` implies: range / (2**bits - 1)
        rng = xs.amax(dim=axis_dim) - xs.amin(dim=axis_dim)
        assert torch.allclose(q.scale.float(), rng / (2**bits - 1), rtol=2e-3, atol=1e-5)


def test_quantize_constant_group_is_exact():
    x = torch.full((1, 1, 32, 8), 1.5)
    assert torch.equal(dequantize(quantize_keys(x, 2, 32)), x)


def test_shapes_and_bytes():
    q = quantize_keys(torch.randn(1, 2, 128, 64), 4, 64)
    assert q.codes.shape == (1, 2, 128, 32) and q.scale.shape == (1, 2, 2, 64)
    assert q.nbytes == 1 * 2 * 128 * 32 + 2 * (1 * 2 * 2 * 64 * 2)
    v = quantize_values(torch.randn(1, 2, 128, 64), 2, 32)
    assert v.codes.shape == (1, 2, 128, 16) and v.scale.shape == (1, 2, 128, 2)


def test_kivi_config_validation():
    with pytest.raises(ValueError, match="bits"):
        KIVI(bits=3)
    with pytest.raises(ValueError, match="group"):
        KIVI(group=48)
    with pytest.raises(ValueError, match="head_dim"):
        KIVI(group=64).value_group(96)
