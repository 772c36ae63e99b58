import math

import pytest
import torch
from conftest import tiny_llama

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.million import Million, PQTensor, kmeans
from memfit.kv.quant import KIVI, load_quantized


def _rope_like(n=512, d=32, seed=0):
    """Keys as RoPE leaves them: channel pairs (i, i + d/2) on rings of a few radii, turning with the
    position at their own frequency (the joint structure a per-channel grid cannot see)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n).float()[:, None]
    freq = 10000 ** (-torch.arange(d // 2).float() / (d // 2))
    radius = 1 + 3 * torch.rand(1, 2, 1, d // 2, generator=g) * (torch.rand(1, 2, n, 1, generator=g) > 0.5)
    x = torch.cat([radius * torch.cos(pos * freq), radius * torch.sin(pos * freq)], -1)
    return x + 0.05 * torch.randn(1, 2, n, d, generator=g)


def test_product_codes_beat_a_per_channel_grid_at_the_same_bits():
    x = _rope_like()
    err = lambda y: ((y - x).norm() / x.norm()).item()  # noqa: E731
    kivi = err(KIVI(bits=2, group=64).quantize_keys(x).dequantize())
    pq = Million(bits=2, sub=4, iters=10).quantize_keys(x)
    assert pq.codes.shape == (1, 2, 512, 8) and pq.codebook.shape == (1, 8, 256, 4)  # one byte a sub-vector
    assert err(pq.dequantize()) < 0.6 * kivi
    # RoPE's pairs in one sub-vector fit better than the natural order, which splits them
    split = PQTensor.encode(x, None, bits=2, sub=4, pairs=False, rotate=False, outliers=0, iters=10, fit_tokens=4096)
    assert err(pq.dequantize()) < err(split.dequantize())
    # every byte is counted: codes and the float16 codebook
    assert pq.nbytes == pq.codes.numel() + 2 * pq.codebook.numel()


def test_kmeans_is_exact_on_few_points_and_never_worse_with_more_rounds():
    x = torch.randn(1, 3, 40, 2)
    cb = kmeans(x, 64, iters=5, fit_tokens=1000)
    assert cb.shape == (1, 3, 64, 2)
    # 40 points, 64 centroids: every point is one
    assert (x.unsqueeze(3) == cb.unsqueeze(2)).all(-1).any(-1).all()
    y = torch.randn(1, 2, 2000, 4, generator=torch.Generator().manual_seed(3))
    mse = lambda c: torch.cdist(y, c).amin(-1).pow(2).mean().item()  # noqa: E731
    assert mse(kmeans(y, 16, iters=8, fit_tokens=4096)) <= mse(kmeans(y, 16, iters=1, fit_tokens=4096)) + 1e-6


@pytest.mark.parametrize("cfg", [Million(bits=2, sub=4), Million(bits=2, sub=2), Million(bits=4, sub=2, outliers=2),
                                 Million(bits=2, sub=4, rotate=True)])
def test_cat_prefix_outliers_and_store_round_trip(cfg):
    x = _rope_like(n=192, seed=1)
    x[:, :, 5, 3] = 40.0  # an outlier
    a = cfg.quantize_values(x[:, :, :128])
    both = a.extend(x[:, :, 128:])  # the window spilling: encoded on the layer's codebook
    assert both.num_tokens == 192 and both.codebook is a.codebook
    torch.testing.assert_close(both.dequantize()[:, :, :128], a.dequantize())
    onto = PQTensor.encode(x[:, :, 128:], a.codebook, bits=cfg.bits, sub=cfg.sub, pairs=False, rotate=cfg.rotate,
                           outliers=cfg.outliers, iters=0, fit_tokens=1)
    assert torch.equal(both.dequantize()[:, :, 128:], onto.dequantize())
    # another run appended (stacking): what its codes stood for, on this codebook
    b = cfg.quantize_values(x[:, :, 128:])
    stacked = a.cat(b)
    assert stacked.num_tokens == 192 and stacked.codebook is a.codebook
    err = lambda y: ((y - x[:, :, 128:]).norm() / x[:, :, 128:].norm()).item()  # noqa: E731
    assert err(stacked.dequantize()[:, :, 128:]) < 1.5 * err(onto.dequantize()) + 0.05
    if cfg.outliers:  # each token's largest channels come back exactly (float16)
        assert both.dequantize()[0, 0, 5, 3].item() == 40.0
        assert both.nbytes == both.codes.numel() + 2 * both.codebook.numel() + 3 * both.out_idx.numel()
    assert torch.equal(both.prefix(64).dequantize(), both.dequantize()[:, :, :64])
    t = {"v_" + n: v for n, v in both.tensors().items()}
    back = load_quantized(t, "v_", both.meta())
    assert isinstance(back, PQTensor) and torch.equal(back.dequantize(), both.dequantize())


def test_million_cache_decodes_counts_its_bytes_and_saves_and_restores():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 140), generator=torch.Generator().manual_seed(1))
    cfg = Million(bits=2, sub=4, group=16, residual=16)
    cache = CompressedCache("million(bits=2,sub=4,group=16,residual=16)", 2)
    with torch.no_grad():
        model(ids[:, :120], **with_cache(model, cache))
        for t in range(120, 140):  # the window spills onto the layer's codebook while decoding
            model(ids[:, t : t + 1], **with_cache(model, cache))
    layer = cache.layers[0]
    assert isinstance(layer.qk, PQTensor) and layer.qk.num_tokens + layer.keys.shape[-2] == 140
    h, n, d = layer.qk.shape[1], layer.qk.num_tokens, layer.qk.shape[-1]
    assert layer.qk.nbytes + layer.qv.nbytes == n * h * cfg.token_bytes(d) + cfg.fixed_bytes(h, d)
    back = CompressedCache.from_state(*cache.to_state())
    for la, lb in zip(cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)
    assert back.nbytes == cache.nbytes
    # the attention reads the dequantized codes: close to the 16-bit keys at 2 bits an element
    full = CompressedCache("none", 2)
    with torch.no_grad():
        model(ids, **with_cache(model, full))
    k16 = full.layers[0].materialize()[0][:, :, :n].float()
    rel = ((layer.materialize()[0][:, :, :n].float() - k16).norm() / k16.norm()).item()
    assert rel < 0.5 and math.isfinite(rel)


def test_million_bad_inputs_are_named():  # bad specs: tests/kv/test_policy.py
    with pytest.raises(ValueError, match="head_dim 30 must be a multiple of sub=4"):
        Million(bits=2, sub=4).quantize_values(torch.randn(1, 1, 64, 30))
    with pytest.raises(ValueError, match="below head_dim 16"):
        Million(bits=4, sub=2, outliers=16).quantize_keys(torch.randn(1, 1, 64, 16))
    with pytest.raises(ValueError, match="cannot concatenate product-quantized tensors"):
        Million(bits=2, sub=4).quantize_keys(torch.randn(1, 1, 64, 16)).cat(
            Million(bits=2, sub=2).quantize_keys(torch.randn(1, 1, 64, 16)))


def test_faiss_search_finds_the_torch_paths_nearest_centroids(monkeypatch):
    """The faiss encoder (CPU, 256 centroids) and the blocked torch search pick centroids at the same
    distance from every point; only exact ties may differ."""
    from memfit.kv import million

    assert million._faiss() is not None  # a dependency: this test compares the two paths
    g = torch.Generator().manual_seed(0)
    x, cb = torch.randn(2, 5, 3000, 4, generator=g), torch.randn(2, 5, 256, 4, generator=g)
    fast = million._assign(x, cb)
    monkeypatch.setattr(million, "_faiss", lambda: None)
    ref = million._assign(x, cb)
    dist = lambda a: (x - cb.gather(2, a.unsqueeze(-1).expand(-1, -1, -1, 4))).pow(2).sum(-1)  # noqa: E731
    assert fast.shape == ref.shape == (2, 5, 3000) and (fast == ref).float().mean() > 0.999
    torch.testing.assert_close(dist(fast), dist(ref), atol=1e-5, rtol=0)
