"""Adaptive heads store a different number of tokens per KV head, without padding; attention over
that storage must equal full attention with the evicted entries of each head masked out."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.evict import Observation, select_global
from memfit.kv.policy import parse_policy

_REF_MASKS: dict[int, torch.Tensor] = {}


def _masked_reference(module, query, key, value, attention_mask, **kwargs):
    """Full attention with, per KV head, only the kept context entries (and every new token) visible."""
    keep = _REF_MASKS[module.layer_idx]  # [1, H, N] over the context
    b, hq, nq, _ = query.shape
    nk = key.shape[-2]
    visible = torch.ones(b, key.shape[1], nk, dtype=torch.bool)
    visible[..., : keep.shape[-1]] = keep
    causal = torch.arange(nk) <= torch.arange(nq).unsqueeze(-1) + (nk - nq)
    mask = causal & visible.repeat_interleave(hq // key.shape[1], dim=1).unsqueeze(2)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register("memfit_test_masked", _masked_reference)


def _kept_masks(lm, ids, policy):
    """What the policy keeps, recomputed from the full cache: layer -> [1, H, N] bool."""
    ev = parse_policy(policy).evictions[0]
    full = lm.prefill_ids(ids, "none").cache
    scores = [ev.score(layer.keys, layer.values, Observation()) for layer in full.layers]
    budgets = [ev.budget(s.shape[-1], ev.layer_keep(i, len(scores))) for i, s in enumerate(scores)]
    picks = (select_global(scores, budgets) if ev.heads == "global"
             else [ev.select(s, b) for s, b in zip(scores, budgets)])
    masks = {}
    for i, (layer, idx) in enumerate(zip(full.layers, picks)):
        k = layer.keys
        m = torch.zeros(1, k.shape[1], k.shape[-2], dtype=torch.bool)
        for h, ix in enumerate(idx):
            m[0, h, ix] = True
        masks[i] = m
    return full, masks


@pytest.mark.parametrize("policy", ["knorm(keep=0.3,heads=adaptive)", "knorm(keep=0.6,heads=adaptive)",
                                    "knorm(keep=0.3,heads=global)"])
def test_ragged_heads_equal_masked_full_attention(tiny_lm, policy):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 250, (1, 90), generator=g)
    q = torch.randint(0, 250, (1, 6), generator=g)
    ctx = tiny_lm.prefill_ids(ids, policy)
    lens = [layer.ragged.lens[0].tolist() for layer in ctx.cache.layers]
    assert any(len(set(x)) > 1 for x in lens), lens  # the heads really hold different counts
    full, masks = _kept_masks(tiny_lm, ids, policy)
    assert [m[0].sum(-1).tolist() for m in masks.values()] == lens
    with torch.no_grad():
        out = tiny_lm.model(q, **with_cache(tiny_lm.model, ctx.cache.fork(1))).logits
        _REF_MASKS.update(masks)
        tiny_lm.model.set_attn_implementation("memfit_test_masked")
        try:
            ref = tiny_lm.model(q, **with_cache(tiny_lm.model, full.fork(1))).logits
        finally:
            tiny_lm.model.set_attn_implementation("memfit")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # ragged storage holds only the kept tokens (plus one small length table per layer)
    kept = sum(sum(x) for x in lens)
    head_dim = tiny_lm.head_dim
    assert ctx.nbytes == kept * 2 * head_dim * 8 + sum(layer.ragged.lens.numel() * 4 for layer in ctx.cache.layers)


def test_ragged_with_quantization_answers_and_round_trips(tiny_lm):
    ids = torch.randint(0, 250, (1, 400), generator=torch.Generator().manual_seed(8))
    ctx = tiny_lm.prefill_ids(ids, "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=16,residual=16)")
    layer = ctx.cache.layers[0]
    lens, nq = layer.ragged.lens.tolist()
    assert all(q % 16 == 0 and n - 16 - 16 < q <= n - 16 + 15 for n, q in zip(lens, nq) if n > 16)
    assert sum(lens) == 2 * 200
    assert ctx.nbytes < 0.45 * ctx.full_nbytes
    a = tiny_lm.ask(ctx, ["x", "yz"], max_new_tokens=5)
    tensors, state = ctx.cache.to_state()
    back = CompressedCache.from_state(tensors, state)
    assert back.nbytes == ctx.nbytes
    ctx2 = type(ctx)(back, ctx.token_ids, ctx.policy, lm=tiny_lm)
    assert tiny_lm.ask(ctx2, ["x", "yz"], max_new_tokens=5) == a
    with pytest.raises(ValueError, match="prefix cannot be reused"):
        back.truncate_(100)


def test_ragged_cache_refuses_an_attention_that_ignores_its_mask(tiny_lm):
    ids = torch.randint(0, 250, (1, 60), generator=torch.Generator().manual_seed(9))
    ctx = tiny_lm.prefill_ids(ids, "knorm(keep=0.5,heads=adaptive)")
    tiny_lm.model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="attn_implementation='memfit'"), torch.no_grad():
            cache = ctx.cache.fork(1)
            for t in range(3):
                tiny_lm.model(torch.tensor([[5 + t]]), **with_cache(tiny_lm.model, cache))
    finally:
        tiny_lm.model.set_attn_implementation("memfit")


def test_kept_dense_copy_answers_the_same(tiny_lm):
    ids = torch.randint(0, 250, (1, 300), generator=torch.Generator().manual_seed(10))
    ctx = tiny_lm.prefill_ids(ids, "knorm(keep=0.5,heads=adaptive)+kivi(bits=4,group=16,residual=16)")
    before = tiny_lm.ask(ctx, ["ab", "cde"], max_new_tokens=6)
    nbytes = ctx.nbytes
    ctx.cache.keep_dense()
    assert ctx.nbytes == nbytes  # a cache beside the storage, not part of it
    assert all(layer.dense is not None for layer in ctx.cache.layers)
    assert tiny_lm.ask(ctx, ["ab", "cde"], max_new_tokens=6) == before
