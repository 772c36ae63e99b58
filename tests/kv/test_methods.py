"""The eviction methods added on top of SnapKV/StreamingLLM: scores against planted tokens and
against transformers' eager attention, budgets, and adaptive (ragged) heads."""

import math

import pytest
import torch

from memfit.kv.attention import observe
from memfit.kv.cache import CompressedCache
from memfit.kv.evict import H2O, TOVA, Knorm, KVzip, Observation, PyramidKV, select_adaptive, select_global, select_topk
from memfit.kv.evict.kvzip import reconstruction_scores, repeat_inputs
from memfit.kv.policy import PolicyError, parse_policy


def _planted(n=200, d=16, h=2, hq=4, w=4, seed=0):
    """Keys with a few tokens per head along a direction that the queries of its GQA group look for."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, h, n, d, generator=g) * 0.1
    queries = torch.randn(1, hq, w, d, generator=g) * 0.1
    planted = {0: [17, 90, 150], 1: [42, 120, 160]}
    for head, toks in planted.items():
        direction = torch.randn(d, generator=g)
        keys[0, head, toks] = direction / direction.norm() * 6
        queries[0, 2 * head : 2 * head + 2] += direction / direction.norm() * 6
    return keys, queries, planted


def test_tova_finds_planted_tokens():
    keys, queries, planted = _planted()
    idx = select_topk(TOVA(keep=0.02).score(keys, keys, Observation(queries=queries)), 3)
    for head, toks in planted.items():
        assert set(idx[0, head].tolist()) == set(toks)


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    keys, queries, planted = _planted()
    attn = torch.rand(1, 2, 200) * 0.01
    for head, toks in planted.items():
        attn[0, head, toks] = 1.0
    idx = select_topk(H2O(keep=0.1, recent=8).score(keys, keys, Observation(attention_sum=attn)), 11)
    for head, toks in planted.items():
        assert set(toks) | set(range(192, 200)) == set(idx[0, head].tolist())
    with pytest.raises(ValueError, match="attention sum"):
        H2O().score(keys, keys, Observation())


def test_knorm_keeps_small_norm_keys():
    keys = torch.randn(1, 2, 50, 8) + 3.0
    keys[0, 0, [5, 25]] = 0.01
    keys[0, 1, [7, 30]] = 0.01
    idx = select_topk(Knorm(keep=0.04).score(keys, keys, Observation()), 2)
    assert idx[0, 0].tolist() == [5, 25] and idx[0, 1].tolist() == [7, 30]


def test_reduce_attention_finds_planted_keys():
    keys, queries, planted = _planted(w=6)
    with observe(reduce="max") as seen:
        class M:  # stands for the attention module: only its layer index is read
            layer_idx = 0
        mask = torch.ones(1, 1, 6, 200, dtype=torch.bool)
        seen.add(M(), queries, keys, mask, 16 ** -0.5)
    scores = KVzip(keep=0.02).score(keys, keys, Observation(reconstruction=seen.attention[0]))
    for head, toks in planted.items():
        assert set(select_topk(scores, 3)[0, head].tolist()) == set(toks)


def _eager_attentions(lm, ids):
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return lm.model(ids, output_attentions=True).attentions  # per layer [B, Hq, N, N]
    finally:
        lm.model.set_attn_implementation("memfit")


def _per_kv_head(a, h):
    return a.reshape(a.shape[0], h, -1, *a.shape[2:])


def test_h2o_attention_sum_equals_eager_attention(tiny_lm):
    ids = torch.randint(0, 250, (1, 70), generator=torch.Generator().manual_seed(4))
    cache = CompressedCache("none", tiny_lm.num_layers, defer=True)
    with observe(reduce="sum") as seen, torch.no_grad():
        tiny_lm._forward(ids, cache, chunk_size=32)  # three chunks: sums must add up across them
    for layer, a in enumerate(_eager_attentions(tiny_lm, ids)):
        ref = _per_kv_head(a, 2).sum(dim=(2, 3))
        torch.testing.assert_close(seen.attention[layer].double(), ref, rtol=1e-5, atol=1e-6)


def test_kvzip_scores_equal_eager_attention_of_the_repeat_pass(tiny_lm):
    """Each repeat chunk, read on top of the context, scores a context key by the most attention any
    of its positions and query heads gives it; the cache is back to the context afterwards."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 250, (1, 60), generator=g)
    prompt = torch.randint(0, 250, (5,), generator=g).tolist()
    inputs = repeat_inputs(prompt, ids[0].tolist(), chunk=32, overlap=4)
    assert inputs[1][:9] == prompt + ids[0, 28:32].tolist()
    cache = CompressedCache("none", tiny_lm.num_layers, defer=True)
    with torch.no_grad():
        tiny_lm._forward(ids, cache, chunk_size=64)
    scores = reconstruction_scores(tiny_lm.model, cache, inputs)
    assert cache.get_seq_length() == 60 and cache.layers[0].keys.shape[-2] == 60
    ref = None
    for inp in inputs:
        full = torch.cat([ids, torch.tensor([inp])], dim=1)
        atts = _eager_attentions(tiny_lm, full)
        per = torch.stack([_per_kv_head(a[:, :, 60:, :60], 2).amax(dim=(2, 3)) for a in atts])
        ref = per if ref is None else torch.maximum(ref, per)
    for layer in range(tiny_lm.num_layers):
        torch.testing.assert_close(scores[layer].double(), ref[layer], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("split", [True, False])
def test_fused_attention_and_max_from_lse_equal_the_reference(masked, split):
    """KVzip's pass on CPU: the fused kernel gives SDPA's output and each query's log-sum-exp (in one
    call, or two merged: the context unmasked, the repeat tokens causal), from which the max
    attention over the context keys is a matmul; both equal the plain path."""
    from memfit.kv.attention import attention_with_lse, max_attention, reduce_attention

    g = torch.Generator().manual_seed(7)
    b, hq, h, nq, n, d = 2, 6, 2, 37, 50, 16
    nk = n + nq
    q, k, v = (torch.randn(b, x, y, d, generator=g) for x, y in ((hq, nq), (h, nk), (h, nk)))
    causal = (torch.arange(nk) <= torch.arange(n, nk).unsqueeze(-1))[None, None].expand(b, 1, nq, nk)
    mask = causal if masked else None  # None: causal, the queries being the last nq positions
    out, lse = attention_with_lse(q, k, v, mask, 0.3, split=split)  # split: context, then causal
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    want = reduce_attention(q, k, mask, 0.3, "max")[..., :n]
    torch.testing.assert_close(max_attention(q, k[:, :, :n], lse, 0.3), want, rtol=1e-5, atol=1e-7)


def test_max_attention_in_bfloat16_is_within_its_rounding_of_float32():
    """On CPU, bfloat16 queries and keys take the bfloat16 matmul with -log p read as int16 for the
    max: probabilities within a few percent of the float32 path, the same keys ranked on top, and a
    key that takes all of a query's attention (-log p rounded to about 0, maybe below) scores 1."""
    from memfit.kv.attention import max_attention

    g = torch.Generator().manual_seed(5)
    b, hq, h, nq, nk, d = 1, 6, 2, 300, 700, 64
    q, k = torch.randn(b, hq, nq, d, generator=g) * 2, torch.randn(b, h, nk, d, generator=g) * 2
    k[:, 0, 3] = q[:, 0, 7] * 4  # query 7 of head 0 sees key 3 only
    q, k = q.bfloat16(), k.bfloat16()
    logits = (q.float().reshape(b, h, -1, d) @ k.float().transpose(-1, -2)) * d ** -0.5
    lse = logits.logsumexp(-1).reshape(b, hq, nq) + torch.rand(b, hq, nq, generator=g)  # keys beyond these
    want = max_attention(q.float(), k.float(), lse, d ** -0.5)
    got = max_attention(q, k, lse, d ** -0.5)
    assert got.dtype == torch.float32 and got.shape == (b, h, nk)
    rel = (got - want).abs() / want
    assert rel.max() < 0.04 and rel[want > math.exp(-4)].max() < 0.02
    assert (got[0, 0, 3] - want[0, 0, 3]).abs() < 0.01 and want[0, 0, 3] > 0.3
    top = lambda x: set(x[0, 1].topk(300).indices.tolist())  # noqa: E731
    assert len(top(got) & top(want)) >= 295


def test_kvzip_scores_are_the_same_without_the_fused_kernel(tiny_lm, monkeypatch):
    """Where the fused kernel is unavailable (GPU, older torch) the pass runs SDPA and reduces the
    probabilities itself: the same scores."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 250, (1, 80), generator=g)
    inputs = repeat_inputs([1, 2, 3], ids[0].tolist(), chunk=40, overlap=4)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr("memfit.kv.attention.attention_with_lse", lambda *a: None)
        cache = CompressedCache("none", tiny_lm.num_layers, defer=True)
        with torch.no_grad():
            tiny_lm._forward(ids, cache, chunk_size=64)
        runs.append(reconstruction_scores(tiny_lm.model, cache, inputs))
    for layer in range(tiny_lm.num_layers):
        torch.testing.assert_close(runs[0][layer], runs[1][layer], rtol=1e-5, atol=1e-7)


def test_pyramid_budgets_shrink_with_depth_and_average_to_keep():
    p = PyramidKV(keep=0.3, slope=0.5)
    keeps = [p.layer_keep(i, 30) for i in range(30)]
    assert keeps[0] == pytest.approx(0.45) and keeps[-1] == pytest.approx(0.15)
    assert all(a > b for a, b in zip(keeps, keeps[1:]))
    assert sum(keeps) / 30 == pytest.approx(0.3)


def test_adaptive_heads_move_budget_to_peaked_heads():
    n, k = 100, 20
    scores = torch.full((1, 3, n), 0.01)
    scores[0, 0, :40] = 1.0  # head 0: forty tokens that matter
    scores[0, 2] = torch.linspace(0, 0.02, n)  # head 2: flat
    idx = select_adaptive(scores, k)
    lens = [len(i) for i in idx]
    assert sum(lens) == 3 * k and lens[0] == 40 and min(lens) >= 4  # floor: 20% of the uniform budget
    assert all(bool((i.diff() > 0).all()) for i in idx)
    with pytest.raises(ValueError, match="batch size 1"):
        select_adaptive(scores.expand(2, -1, -1), k)


def test_global_heads_move_budget_across_layers():
    n, k = 100, 10
    peaked = torch.full((1, 2, n), 0.001)
    peaked[0, 0, :20] = 1.0  # layer 0: twenty tokens that matter in head 0, sixteen in head 1
    peaked[0, 1, 50:66] = 1.0
    flat = torch.linspace(0, 0.01, n).expand(1, 2, n).clone()  # layer 1: nothing stands out
    per_layer = select_global([peaked, flat], [k, k])
    lens = [[len(i) for i in layer] for layer in per_layer]
    assert sum(map(sum, lens)) == 2 * 2 * k  # the total budget is kept, and moved to layer 0
    assert lens[0] == [20, 16] and lens[1] == [2, 2]  # layer 1 keeps its floor: 20% of its share
    assert per_layer[0][0].tolist() == list(range(20)) and per_layer[0][1].tolist() == list(range(50, 66))
    assert all(i.tolist() == [98, 99] for i in per_layer[1])  # its best tokens
    # one layer alone keeps its own budget, all of it on the tokens that matter
    alone = select_global([peaked], [k])[0]
    assert sum(len(i) for i in alone) == 2 * k and min(len(i) for i in alone) >= 2
    assert all(bool((peaked[0, h, i] == 1.0).all()) for h, i in enumerate(alone))


def test_global_heads_in_whole_groups_stay_within_the_budget():
    """With a quantizer's group as the unit every roundable head keeps whole groups (no 16-bit
    remainder), the total at most the budget and less than a group under it; a head keeps its best."""
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(1, 4, 300, generator=g) ** (1 + 3 * torch.rand(1, 4, 1, generator=g)) for _ in range(3)]
    ks = [70, 90, 130]
    plain, whole = select_global(scores, ks), select_global(scores, ks, unit=32)
    lens = [len(i) for layer in whole for i in layer]
    assert all(n % 32 == 0 for n in lens) and lens != [len(i) for layer in plain for i in layer]
    assert 4 * sum(ks) - 32 < sum(lens) <= 4 * sum(ks)
    for s, layer in zip(scores, whole):
        for h, i in enumerate(layer):
            assert bool((i.diff() > 0).all()) and set(i.tolist()) == set(s[0, h].topk(len(i)).indices.tolist())
    # a head under one group, where the roundings did not free enough to complete it, or keeping its
    # whole layer, is left as chosen
    tiny = torch.zeros(1, 2, 40)
    tiny[0, 0, :36] = 1.0
    assert [len(i) for i in select_global([tiny], [20], unit=32)[0]] == [32, 4]  # 36 rounded down; 4 < 32
    tiny[0, 0] = 1.0
    assert [len(i) for i in select_global([tiny], [25], unit=32)[0]] == [40, 10]  # all 40 of its layer
    # the tokens a rounding frees complete a head under one group (its 16-bit tokens cost the most)
    two = torch.rand(1, 2, 200, generator=g) * 0.1
    two[0, 0, :108] = 1.0  # head 0 takes all but head 1's floor of 12 (a fifth of 60)
    picks = select_global([two], [60], unit=16)[0]
    assert [len(i) for i in picks] == [96, 16]  # 108 -> 96 frees 12; 4 of them make head 1's 12 a group
    assert set(picks[1].tolist()) == set(two[0, 1].topk(16).indices.tolist())


def test_policy_strings_for_new_methods():
    p = parse_policy("kvzip(keep=0.3)+kivi(bits=2)")
    assert p.spec.startswith("kvzip(keep=0.3,heads=global,chunk=2048)+kivi(bits=2")
    assert p.observes() == {"reconstruction"}
    assert parse_policy("h2o(keep=0.2,heads=adaptive)").evictions[0].heads == "adaptive"
    with pytest.raises(PolicyError, match="heads must be one of uniform, adaptive"):
        parse_policy("snapkv(heads=sideways)")
    with pytest.raises(PolicyError, match="must be the last eviction"):
        parse_policy("kvzip(keep=0.5)+streaming(keep=0.5)")
    with pytest.raises(PolicyError, match="plain word"):
        parse_policy("knorm(heads=1-2)")
