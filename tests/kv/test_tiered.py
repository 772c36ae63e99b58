"""Tiered KV (device / host / disk pages, attention-aware selection): exactness, the bound, tiers, errors."""

import os

import pytest
import torch
from transformers import DynamicCache

from conftest import byte_tokenizer, tiny_llama
from memfit.api import LM
from memfit.hfcompat import with_cache
from memfit.kv.tiered import TierConfig, TieredCache, TieredLayer, TierReadError

CONTEXT = 700


@pytest.fixture(scope="module")
def model():
    return tiny_llama(torch.float64, layers=3)


@pytest.fixture(scope="module")
def prefilled(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, CONTEXT))
    ref = DynamicCache()
    model(ids, **with_cache(model, ref), use_cache=True)
    return [lay.keys.clone() for lay in ref.layers], [lay.values.clone() for lay in ref.layers]


def _decode(model, cache, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(2)
    nxt = torch.randint(0, 256, (2, steps))
    out = []
    for t in range(steps):
        pos = torch.full((2, 1), CONTEXT + t)
        out.append(model(nxt[:, t : t + 1], position_ids=pos, **with_cache(model, cache), use_cache=True).logits)
    return out


def _reference(model, prefilled, steps: int = 5) -> list[torch.Tensor]:
    ref = DynamicCache()
    for i, (k, v) in enumerate(zip(*prefilled)):
        ref.update(k.clone(), v.clone(), i)
    return _decode(model, ref, steps)


def _offload(prefilled, cfg: TierConfig) -> TieredCache:
    keys, values = prefilled
    return TieredCache.offload([k.clone() for k in keys], [v.clone() for v in values], cfg)


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_every_page_selected_is_full_attention(model, prefilled):
    cache = _offload(prefilled, TierConfig(device=1e12))  # room for every page: selection picks them all
    layer = cache.layers[0]
    assert layer.slots == layer.n_pages > 0
    out = _decode(model, cache)
    assert _close(out, _reference(model, prefilled)) < 1e-9
    assert cache.steps == 5  # each step went through selection, not a fallback
    assert cache.fetched_pages == 3 * 2 * 2 * layer.n_pages  # fetched once (layers x rows x heads), then kept
    cache.close()


def test_fetch_all_baseline_is_full_attention(model, prefilled):
    cache = _offload(prefilled, TierConfig(device=0.2, fetch="all", dense=0))
    assert _close(_decode(model, cache), _reference(model, prefilled)) < 1e-9
    assert cache.steps == 5
    cache.close()


def test_small_budget_attends_to_chosen_pages_only(model, prefilled):
    cfg = TierConfig(device=0.3, page=16, window=32, dense=0)
    cache = _offload(prefilled, cfg)
    layer = cache.layers[0]
    assert 0 < layer.slots < layer.n_pages
    full = sum(2 * k.numel() * k.element_size() for k in prefilled[0])
    assert cache.device_bytes <= cfg.device * full
    _decode(model, cache, steps=1)
    # the pool holds exactly the pages the bound ranks highest for the step's query
    assert bool((layer.slot_page >= 0).all())
    assert bool((layer.where >= 0).sum(-1).eq(layer.slots).all())
    cache.close()


def test_dense_first_layers_and_budget(prefilled):
    keys, _ = prefilled
    full = sum(2 * k.numel() * k.element_size() for k in keys)
    cache = _offload(prefilled, TierConfig(device=0.6, page=16, window=32, dense=1))
    first, rest = cache.layers[0], cache.layers[1]
    assert first.slots == first.n_pages and 0 < rest.slots < rest.n_pages  # the first layer keeps every page
    assert cache.device_bytes <= 0.6 * full
    cache.close()
    with pytest.raises(ValueError, match="does not hold the window"):
        _offload(prefilled, TierConfig(device=0.05, page=16, window=32))


def test_bound_never_underestimates():
    gen = torch.Generator().manual_seed(0)
    b, h, g, n, p, d = 2, 3, 4, 9, 8, 16
    keys = torch.randn(b, h, n * p + 5, d, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(b, h, n * p + 5, d, generator=gen, dtype=torch.float64)
    layer = TieredLayer(keys, values, TierConfig(page=p, window=0), 2, n, torch.device("cpu"), None, None)
    for _ in range(20):
        q = torch.randn(b, h * g, 1, d, generator=gen, dtype=torch.float64) * 2
        bound = layer.bound(q)  # [B, H, N]
        pages = keys[:, :, : n * p].reshape(b, h, n, p, d)
        qg = q.view(b, h, g, d)
        best = torch.einsum("bhgd,bhnpd->bhgnp", qg, pages).amax(-1).amax(2)  # best key of each page, any head
        assert bool((bound >= best - 1e-9).all())
        assert bool((bound <= best.abs().amax() * 10).all())  # and it is a bound, not infinity


def test_disk_tier_context_4x_host_budget(model, prefilled, tmp_path):
    keys, _ = prefilled
    full = sum(2 * k.numel() * k.element_size() for k in keys)
    host = _offload(prefilled, TierConfig(device=0.5, page=16, window=32, dense=0))
    disk = _offload(prefilled, TierConfig(device=0.5, page=16, window=32, dense=0, host_bytes=full // 4,
                                          disk_dir=str(tmp_path)))
    assert 0 < disk.layers[0].host_pages < disk.layers[0].n_pages
    assert disk.host_bytes <= full // 4 and disk.disk_bytes > 3 * disk.host_bytes
    assert _close(_decode(model, disk), _decode(model, host)) == 0.0  # the same pages, read from disk
    assert any(tmp_path.iterdir())
    disk.close()
    host.close()


@pytest.mark.parametrize("fault", ["missing", "short"])
def test_disk_fault_is_a_clear_error(model, prefilled, tmp_path, fault):
    cache = _offload(prefilled, TierConfig(device=1e12, page=16, window=32, host_bytes=0, disk_dir=str(tmp_path)))
    path = cache.layers[0].disk.path
    if fault == "missing":
        os.remove(path)
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(TierReadError, match=str(path.name)):
        _decode(model, cache, steps=1)
    cache.close()


def test_bad_input_is_named(prefilled):
    keys, values = prefilled
    with pytest.raises(ValueError, match="device budget"):
        TierConfig(device=0)
    with pytest.raises(ValueError, match="fetch"):
        TierConfig(fetch="some")
    with pytest.raises(ValueError, match="layer 1"):
        TieredCache.offload(keys, [values[0], values[1][:, :, :10], values[2]])


def test_ask_on_an_offloaded_context(tokenizer):
    lm = LM(tiny_llama(torch.float64), byte_tokenizer(), name="t")
    ctx = lm.prefill("The quick brown fox jumps over the lazy dog. " * 30)
    full = lm.offload(ctx, device=1e12)
    questions = ["what?", "who is it?"]  # different lengths: rows are left-padded, decode steps masked
    assert lm.ask(full, questions, max_new_tokens=8) == lm.ask(ctx, questions, max_new_tokens=8)
    assert full.cache.steps > 0  # generated tokens went through selection (the padded rows' masks too)
    small = lm.offload(ctx, device=0.3, page=16, window=32, dense=0)
    assert small.cache.full_nbytes == ctx.full_nbytes
    esize = small.cache.layers[0].keys.element_size()  # the budget is a fraction of the KV as stored
    assert small.cache.device_bytes <= 0.3 * ctx.full_nbytes * esize / 2
    assert isinstance(lm.ask(small, "what?", max_new_tokens=4), str)
    with pytest.raises(TypeError, match="TierConfig"):
        lm.offload(ctx, TierConfig(), device=0.5)
