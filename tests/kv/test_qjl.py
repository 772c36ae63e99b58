import math

import pytest
import torch

from memfit.kv.cache import CompressedCache
from memfit.kv.qjl import QJL, QJLTensor, sketch_matrix
from memfit.kv.quant import QTensor, load_quantized


def test_qjl_inner_products_are_unbiased_and_tighten_with_the_sketch():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 512, 32, generator=g) * torch.linspace(0.2, 3, 32)  # uneven channels
    q = torch.randn(32, generator=g)
    true = k[0, 0] @ q
    spread = {}
    for m in (64, 1024):
        est = torch.stack([QJL(sketch=m, seed=s, outliers=0).quantize_keys(k).dequantize()[0, 0] @ q for s in range(16)])
        err = est - true
        # bias: the mean over 16 independent sketches is within 4 standard errors of the truth
        assert err.mean(0).abs().mean() < 4 * err.std(0).mean() / math.sqrt(16)
        spread[m] = err.std().item()
        # the estimator's spread: about sqrt(pi/2) ||q|| ||k|| / sqrt(m)
        expect = math.sqrt(math.pi / 2) * q.norm() * k[0, 0].norm(dim=-1).mean() / math.sqrt(m)
        assert 0.5 * expect < spread[m] < 1.5 * expect
    assert spread[1024] < spread[64] / 3  # sqrt(16) = 4 times tighter, within noise


def test_qjl_keeps_outlier_channels_exactly():
    """Keys with a few huge channels (as real models' are): the sketch's error scales with the norm,
    so taking those channels out shrinks it."""
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 256, 32, generator=g)
    k[..., 5] += 40
    q = torch.randn(32, generator=g)
    err = {c: ((QJL(sketch=64, outliers=c).quantize_keys(k).dequantize() - k) @ q).pow(2).mean().sqrt() for c in (0, 2)}
    assert err[2] < err[0] / 5
    t = QJL(sketch=64, outliers=2).quantize_keys(k)
    assert (t.out_idx[..., 0] == 5).all() and torch.equal(t.dequantize()[..., 5], t.out_val[..., 0].float())


def test_qjl_storage_is_signs_and_a_norm():
    k = torch.randn(2, 3, 40, 16)
    t = QJL(sketch=24, outliers=2).quantize_keys(k)
    assert t.signs.shape == (2, 3, 40, 3) and t.signs.dtype == torch.uint8 and t.norm.dtype == torch.float16
    assert t.nbytes == 2 * 3 * 40 * (3 + 2 + 2 * 3)  # signs, norm, 2 outliers (uint8 index, float16 value)
    s = sketch_matrix(24, 16, 0, k.device)
    assert torch.equal(sketch_matrix(24, 16, 0, k.device), s)  # regenerated from the seed, never stored
    signs = (t.dequantize()[0, 0] @ torch.linalg.pinv(s)).sign()  # k_hat lies in the span of S's rows
    assert t.dequantize().shape == k.shape and signs.shape == (40, 24)
    both = t.cat(QJL(sketch=24, outliers=2).quantize_keys(k[:, :, :8]))
    assert both.num_tokens == 48 and torch.equal(both.prefix(40).signs, t.signs)
    back = load_quantized({"k_" + n: v for n, v in both.tensors().items()}, "k_", both.meta())
    assert isinstance(back, QJLTensor) and torch.equal(back.dequantize(), both.dequantize())
    with pytest.raises(ValueError, match="different sketches"):
        t.cat(QJL(sketch=32).quantize_keys(k))


def test_qjl_cache_decodes_evicted_and_restores(tiny_lm):
    ctx = tiny_lm.prefill("The lighthouse keeper counted ships. " * 12,
                          "knorm(keep=0.5,heads=global)+qjl(sketch=64,bits=4,group=16,residual=16)")
    layer = ctx.cache.layers[0]
    assert isinstance(layer.ragged.qk, QJLTensor) and isinstance(layer.ragged.qv, QTensor)
    assert isinstance(tiny_lm.ask(ctx, "What did he count?", max_new_tokens=20), str)  # decodes past the window
    back = CompressedCache.from_state(*ctx.cache.to_state())
    for la, lb in zip(ctx.cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)


def test_qjl_bad_inputs_are_named():  # bad specs: tests/kv/test_policy.py
    with pytest.raises(ValueError, match="below head_dim 16"):
        QJL(outliers=16).quantize_keys(torch.randn(1, 1, 8, 16))
