import pytest
import torch

from memfit.hfcompat import with_cache
from memfit.kv.attention import _state
from memfit.kv.policy import PolicyError, parse_policy


def _decode(lm, ctx, steps, seed=0):
    """Sample ``steps`` tokens on a fork of ``ctx``; yield the fork's cache after each step."""
    cache = ctx.cache.fork(1)
    g = torch.Generator().manual_seed(seed)
    tok = torch.tensor([[65]])
    with torch.no_grad():
        for _ in range(steps):
            logits = lm.model(tok, **with_cache(lm.model, cache)).logits[:, -1]
            tok = torch.multinomial(logits.float().softmax(-1), 1, generator=g)
            yield cache, logits


def test_decode_budget_bounds_what_generation_adds(tiny_lm):
    ids = torch.randint(0, 250, (1, 50), generator=torch.Generator().manual_seed(0))
    ctx = tiny_lm.prefill_ids(ids, "kivi(bits=8,group=16,residual=16)+decode(max_tokens=48,every=16,recent=8)")
    peak = 0
    for step, (cache, _) in enumerate(_decode(tiny_lm, ctx, 150)):
        for layer in cache.layers:
            assert layer.own_tokens() <= 48 + 1
            peak = max(peak, layer.own_tokens())
        assert cache.get_seq_length() == 50 + step + 1  # positions keep counting
    assert peak == 49 and ctx.cache.num_tokens == 50  # the shared context is untouched


def test_decode_budget_keeps_recent_and_most_attended_tokens(tiny_lm):
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(1))
    ctx = tiny_lm.prefill_ids(ids, "decode(max_tokens=40,every=10,recent=6)")
    before = None
    for step, (cache, _) in enumerate(_decode(tiny_lm, ctx, 42)):
        layer = cache.layers[0]
        if step == 40:  # 41 own tokens: the next step evicts first
            before = layer.keys.clone()
            pending = _state().scores[0][cache][..., -41:]  # this step's attention, added before the next step
            acc = torch.cat([layer._acc, torch.zeros(1, 2, 1)], dim=-1) + pending
    assert layer.own_tokens() == 31 and layer._acc.shape[-1] == 30
    kept = layer.keys[:, :, :30]
    assert torch.equal(kept[:, :, -6:], before[:, :, -6:])  # the newest are always kept
    # the rest are kept by attention received: every kept older token outranks every dropped one
    for h in range(before.shape[1]):
        match = (before[0, h, :, None] == kept[0, h, None, :24]).all(-1).any(-1)
        got, dropped = acc[0, h, :35][match[:35]], acc[0, h, :35][~match[:35]]
        assert dropped.numel() == 11
        assert got.numel() == 24 and got.min() >= dropped.max() - 1e-12


def test_two_budgeted_caches_decoding_in_turn_each_keep_their_own_scores(tiny_lm):
    """The scores a step leaves for the next are the cache's that asked for them: two forks decoding
    in turn (one thread, the same layers) evict exactly as each does alone."""
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    ctx = tiny_lm.prefill_ids(ids, "kivi(bits=8,group=16,residual=16)+decode(max_tokens=40,every=10,recent=6)")
    feeds = [torch.randint(0, 250, (1, 60), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]

    def step(cache, tok):
        return tiny_lm.model(tok, **with_cache(tiny_lm.model, cache)).logits[:, -1]

    with torch.no_grad():
        solo = [ctx.cache.fork(1) for _ in feeds]
        alone = [[step(c, f[:, i : i + 1]) for i in range(60)] for c, f in zip(solo, feeds)]
        forks = [ctx.cache.fork(1) for _ in feeds]
        for i in range(60):  # the two forks' steps in turn
            for c, f, ref in zip(forks, feeds, alone):
                torch.testing.assert_close(step(c, f[:, i : i + 1]), ref[i])
    for c, ref in zip(forks, solo):  # the same scores accumulated, not only the same choices
        assert c.layers[0].own_tokens() <= 41
        for a, b in zip(c.layers, ref.layers):
            torch.testing.assert_close(a._acc, b._acc)


def test_without_eviction_the_budget_changes_nothing(tiny_lm):
    ids = torch.randint(0, 250, (1, 60), generator=torch.Generator().manual_seed(2))
    a = tiny_lm.prefill_ids(ids, "kivi(bits=4,group=16,residual=16)")
    b = tiny_lm.prefill_ids(ids, "kivi(bits=4,group=16,residual=16)+decode(max_tokens=500)")
    qa = tiny_lm.ask(a, ["first question", "second"], max_new_tokens=20)
    qb = tiny_lm.ask(b, ["first question", "second"], max_new_tokens=20)
    assert qa == qb


def test_decode_term_parses_and_validates():
    p = parse_policy("snapkv(keep=0.5)+kivi(bits=4)+decode(max_tokens=512)")
    assert p.decode.max_tokens == 512 and p.spec.endswith("+decode(max_tokens=512,every=64,recent=32)")
    with pytest.raises(PolicyError, match="must exceed every"):
        parse_policy("decode(max_tokens=64,every=64)")
    with pytest.raises(PolicyError, match="only one decode"):
        parse_policy("decode(max_tokens=512)+decode(max_tokens=256)")
