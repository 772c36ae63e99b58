import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.kernels.packing import pack, unpack
from memfit.kv.quant import KIVI, QTensor, dequantize, quantize_keys, quantize_values


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


def _planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 2, 128, 32] Gaussian data with one far outlier in 8 of each head's 4096 elements."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 128, 32, generator=g)
    where = torch.zeros(x.numel(), dtype=torch.bool)
    for h in range(2):
        where[h * 4096 + torch.randperm(4096, generator=g)[:8]] = True
    x.view(-1)[where] = 50.0 * torch.sign(torch.randn(int(where.sum()), generator=g))
    return x, where.nonzero().squeeze(1)


@pytest.mark.parametrize("quantize", [quantize_keys, quantize_values])
def test_outliers_are_the_planted_ones_kept_exactly(quantize):
    x, planted = _planted()
    q = quantize(x, 4, 16, outliers=8 / 4096)  # exactly 8 per head
    assert torch.equal(q.out_idx.long(), planted) and q.out_idx.dtype == torch.int32
    assert torch.equal(q.out_val.float(), x.view(-1)[planted])
    rec = dequantize(q)
    assert torch.equal(rec.view(-1)[planted], x.view(-1)[planted])
    plain = dequantize(quantize(x, 4, 16))
    rest = torch.ones(x.numel(), dtype=torch.bool)
    rest[planted] = False
    # without the outliers stretching their groups, the other elements of those groups get a 4-bit
    # grid of their own range (the worst error is in those groups)
    err, err_plain = (rec - x).view(-1)[rest].abs().max(), (plain - x).view(-1)[rest].abs().max()
    assert err < err_plain / 4
    assert q.nbytes == quantize(x, 4, 16).nbytes + 16 * (4 + 2)  # int32 index + float16 value each


def test_outliers_survive_prefix_and_cat():
    x, _ = _planted(1)
    q = quantize_keys(x, 4, 16, outliers=0.01)
    whole = dequantize(q)
    joined = q.prefix(48).cat(quantize_keys(x[:, :, 48:], 4, 16, outliers=0.01))
    assert torch.equal(dequantize(q.prefix(48)), whole[:, :, :48])
    assert torch.equal(dequantize(joined)[:, :, :48], whole[:, :, :48])
    assert torch.equal(dequantize(joined)[:, :, 48:], dequantize(quantize_keys(x[:, :, 48:], 4, 16, outliers=0.01)))
    assert QTensor.from_tensors({f"k_{n}": t for n, t in joined.tensors().items()}, "k_", 4, "token", 16) == joined
    with pytest.raises(ValueError, match="outliers"):
        quantize_values(x, 4, 16, outliers=-0.1)
