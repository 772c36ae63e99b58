import pytest
import torch
from conftest import tiny_llama

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.gear import GEAR, GearTensor
from memfit.kv.quant import KIVI, load_quantized


def _structured(n=256, d=32, seed=0):
    """Keys whose 2-bit error is far from white: a few channels carry a smooth, large signal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, d, generator=g)
    x[..., :3] += 6 * torch.sin(torch.arange(n).float() / 7)[None, None, :, None] * torch.randn(1, 2, 1, 3, generator=g)
    return x


def test_gear_removes_error_that_kivi_leaves_and_its_parts_add_up():
    x = _structured()
    for quantize in ("quantize_keys", "quantize_values"):
        plain = getattr(KIVI(bits=2, group=32, outliers=0.0), quantize)(x).dequantize()
        g = getattr(GEAR(bits=2, group=32, rank=4, outliers=0.0), quantize)(x)
        err = lambda y: (y - x).norm() / x.norm()  # noqa: E731
        assert err(g.dequantize()) < 0.9 * err(plain)
        # the low-rank part is exactly what is added to the codes' dequantization
        torch.testing.assert_close(g.dequantize(), g.q.dequantize() + g.a.float() @ g.basis.float())
        assert g.nbytes == g.q.nbytes + 2 * (g.a.numel() + g.basis.numel())
        # a larger rank never does worse on the same codes
        g8 = getattr(GEAR(bits=2, group=32, rank=8, outliers=0.0), quantize)(x)
        assert err(g8.dequantize()) <= err(g.dequantize()) + 1e-6


def test_gear_tensor_cat_prefix_and_store_round_trip():
    x = _structured(n=128)
    cfg = GEAR(bits=4, group=32, rank=2, outliers=0.02)
    a, b = cfg.quantize_keys(x[:, :, :96]), cfg.quantize_keys(x[:, :, 96:])
    both = a.cat(b)
    assert both.num_tokens == 128 and both.basis is a.basis  # one basis per head
    torch.testing.assert_close(both.dequantize()[:, :, :96], a.dequantize())
    # the later tokens' fit, moved onto the first basis, keeps their codes and projects their error
    proj = b.a.float() @ b.basis.float() @ a.basis.float().mT @ a.basis.float()
    torch.testing.assert_close(both.dequantize()[:, :, 96:], b.q.dequantize() + proj, atol=2e-3, rtol=0)
    assert torch.equal(both.prefix(64).dequantize(), both.dequantize()[:, :, :64])
    t = {"k_" + n: v for n, v in both.tensors().items()}
    back = load_quantized(t, "k_", both.meta())
    assert isinstance(back, GearTensor) and torch.equal(back.dequantize(), both.dequantize())


def test_gear_cache_decodes_and_saves_and_restores():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 120), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache("gear(bits=2,group=16,residual=16,rank=2)", 2)
    with torch.no_grad():
        model(ids[:, :100], **with_cache(model, cache))
        for t in range(100, 120):  # the window spills into the GEAR part while decoding
            model(ids[:, t : t + 1], **with_cache(model, cache))
    layer = cache.layers[0]
    assert isinstance(layer.qk, GearTensor) and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    back = CompressedCache.from_state(*cache.to_state())
    for la, lb in zip(cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)
    assert back.nbytes == cache.nbytes
    with pytest.raises(ValueError, match="to_static: layer 0 has no KIVI quantizer"):
        back.to_static(8)
    with pytest.raises(ValueError, match="quantizer other than KIVI"):
        CompressedCache.stack([cache, back])


def test_gear_bad_inputs_are_named():  # bad specs: tests/kv/test_policy.py
    with pytest.raises(ValueError, match="below head_dim 32"):
        GEAR(rank=32).quantize_keys(torch.randn(1, 1, 64, 32))
    with pytest.raises(ValueError, match="unknown quantized storage 'mystery'"):
        load_quantized({}, "k_", {"kind": "mystery"})
