import torch
from transformers import DynamicCache

from memfit.api import Context
from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.evict import Observation, SnapKV, StreamingLLM, select_topk


def _full_keys(lm, ids):
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad():
        lm.model(ids, **with_cache(lm.model, cache))
    return cache


def test_streaming_keeps_exactly_sinks_and_window(tiny_lm):
    ids = torch.randint(0, 250, (1, 100), generator=torch.Generator().manual_seed(0))
    ctx = tiny_lm.prefill_ids(ids, "streaming(sinks=4,window=20)")
    full = _full_keys(tiny_lm, ids)
    keep = list(range(4)) + list(range(80, 100))
    for layer, ref in zip(ctx.cache.layers, full.layers):
        assert torch.equal(layer.keys, ref.keys[:, :, keep])
        assert torch.equal(layer.values, ref.values[:, :, keep])
    assert ctx.num_tokens == 100 and ctx.cache.layers[0].stored_tokens() == 24


def test_streaming_keep_fraction():
    assert StreamingLLM(keep=0.25, sinks=4).budget(1000) == 250
    assert StreamingLLM(sinks=4, window=1020).budget(500) == 500


def test_snapkv_score_finds_planted_tokens():
    torch.manual_seed(0)
    b, h, hq, n, d, w = 1, 2, 4, 200, 16, 8
    keys = torch.randn(b, h, n, d) * 0.1
    planted = {0: [17, 90, 150], 1: [42, 120, 160]}
    queries = torch.randn(b, hq, w, d) * 0.1
    for head, toks in planted.items():
        direction = torch.randn(d)
        direction = direction / direction.norm() * 6
        keys[0, head, toks] = direction
        queries[0, 2 * head : 2 * head + 2] += direction  # both query heads of the GQA group look for it
    scores = SnapKV(keep=0.1, window=w, kernel=1).score(keys, keys, Observation(queries=queries))
    idx = select_topk(scores, 3 + w)
    for head, toks in planted.items():
        kept = set(idx[0, head].tolist())
        assert set(toks) <= kept, (head, kept)
        assert set(range(n - w, n)) <= kept  # the observation window is always kept


def test_snapkv_prefill_keeps_a_per_head_subset(tiny_lm):
    ids = torch.randint(0, 250, (1, 120), generator=torch.Generator().manual_seed(1))
    ctx = tiny_lm.prefill_ids(ids, "snapkv(keep=0.25,window=8)")
    full = _full_keys(tiny_lm, ids)
    for layer, ref in zip(ctx.cache.layers, full.layers):
        assert layer.keys.shape[-2] == 30
        for head in range(layer.keys.shape[1]):
            # every stored key is one of the original keys, in order, window included
            match = (layer.keys[0, head, :, None, :] == ref.keys[0, head, None, :, :]).all(-1).float().argmax(-1)
            assert torch.equal(layer.keys[0, head], ref.keys[0, head, match])
            assert (match.diff() > 0).all() and set(range(112, 120)) <= set(match.tolist())


def test_evicted_cache_equals_masked_full_attention(tiny_lm):
    """After eviction, new tokens must see exactly the kept tokens at their original positions."""
    torch.manual_seed(2)
    ids = torch.randint(0, 250, (1, 90))
    q = torch.randint(0, 250, (1, 6))
    ctx = tiny_lm.prefill_ids(ids, "streaming(sinks=3,window=30)")
    with torch.no_grad():
        out = tiny_lm.model(q, **with_cache(tiny_lm.model, ctx.cache.fork(1))).logits
        full = _full_keys(tiny_lm, ids)
        mask = torch.zeros(1, 96, dtype=torch.long)
        mask[0, :3] = 1
        mask[0, 60:] = 1
        ref = tiny_lm.model(q, **with_cache(tiny_lm.model, full), attention_mask=mask,
                            position_ids=torch.arange(90, 96)[None]).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_eviction_then_quantization(tiny_lm):
    ids = torch.randint(0, 250, (1, 400), generator=torch.Generator().manual_seed(3))
    ctx = tiny_lm.prefill_ids(ids, "snapkv(keep=0.5,window=8)+kivi(bits=2,group=32,residual=64)")
    layer = ctx.cache.layers[0]
    assert layer.qk.num_tokens + layer.keys.shape[-2] == 200
    assert layer.qk.num_tokens % 32 == 0 and layer.keys.shape[-2] <= 64
    assert isinstance(ctx, Context) and ctx.compression > 1
    assert isinstance(ctx.cache, CompressedCache)
