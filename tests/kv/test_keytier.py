"""The key-only tier (``keys=`` on a ragged eviction): tokens ranked between ``keep`` and ``keys`` keep
their keys and share one mean value per head."""

import pytest
import torch
from conftest import tiny_llama

from memfit.api import LM
from memfit.kernels.packing import unpack_planes
from memfit.kv.cache import CompressedCache
from memfit.kv.evict import key_only
from memfit.kv.plan import KVShape, policy_nbytes
from memfit.kv.policy import PolicyError, parse_policy

TEXT = "The vault code is 4821. The lighthouse is red. The river is long. " * 14


@pytest.mark.parametrize("spec,match", [
    ("kvzip(keep=0.3,keys=0.2)", "keys"),  # fewer keys than tokens kept
    ("kvzip(keep=0.3,keys=0.6,heads=uniform)", "ragged"),
    ("kvzip(keep=0.3,keys=0.6)+kivi(bits=2)", "klt"),
    ("kvzip(keep=0.3,keys=0.6)+klt(bits=1.5,tier_bits=9)", "tier_bits"),
])
def test_bad_key_only_tiers_are_refused_by_name(spec, match):
    with pytest.raises((PolicyError, ValueError), match=match):
        parse_policy(spec)


def test_the_spec_spells_keys_only_when_set():
    assert "keys" not in parse_policy("kvzip(keep=0.3)").spec
    assert "keys=0.6" in parse_policy("kvzip(keep=0.3,keys=0.6)").spec


def test_key_only_tokens_are_the_wider_selection_less_the_kept_ones():
    wide = [torch.tensor([0, 2, 5, 7]), torch.tensor([1, 3])]
    kept = [torch.tensor([2, 7]), torch.tensor([1, 3])]
    got = key_only(wide, kept)
    assert got[0].tolist() == [0, 5] and got[1].tolist() == []


@pytest.mark.parametrize("heads", ["global", "adaptive"])
def test_16bit_tier_holds_exact_keys_and_the_mean_value(tokenizer, heads):
    lm = LM(tiny_llama(torch.float64), tokenizer, name="tiny")
    plain = lm.prefill(TEXT, f"kvzip(keep=0.6,heads={heads},chunk=512)")
    small = lm.prefill(TEXT, f"kvzip(keep=0.3,heads={heads},chunk=512)")
    tier = lm.prefill(TEXT, f"kvzip(keep=0.3,keys=0.6,heads={heads},chunk=512)")
    assert small.nbytes < tier.nbytes < plain.nbytes
    shape = KVShape(lm.num_layers, lm.num_kv_heads, lm.head_dim, 8)  # float64
    assert tier.nbytes <= policy_nbytes(tier.cache.policy, tier.num_tokens, shape)
    for lp, ls, lt in zip(plain.cache.layers, small.cache.layers, tier.cache.layers):
        t = lt.ragged.tier
        assert t is not None and t.qk is None and sum(t.counts) > 0
        kp, vp, mp = lp.ragged.dense(torch.float64)
        kt, vt, mt = lt.ragged.dense(torch.float64)
        for h in range(lm.num_kv_heads):
            n = lt.ragged._host[0][h]
            # the kept tokens are those of keep=0.3, the tier's keys come from the wider selection
            ks = ls.ragged.dense(torch.float64)[0][0, h, : ls.ragged._host[0][h]]
            assert torch.equal(kt[0, h, :n], ks)
            wide = {tuple(r.tolist()) for r in kp[0, h][mp[0, h]]}
            tk = kt[0, h, n : n + t.counts[h]]
            assert all(tuple(r.tolist()) in wide for r in tk)
            # every key-only token reads the head's one value: the mean of those tokens' values
            vals = vt[0, h, n : n + t.counts[h]]
            assert torch.equal(vals, vals[:1].expand_as(vals))
            exact = {tuple(k.tolist()): v for k, v in zip(kp[0, h][mp[0, h]], vp[0, h][mp[0, h]])}
            mean = torch.stack([exact[tuple(k.tolist())] for k in tk]).mean(0)
            torch.testing.assert_close(vals[0], mean)
            assert mt[0, h].sum() == n + t.counts[h]
    assert "key-only tier" in tier.cache.layers[0].not_packed()
    answers = lm.ask(tier, ["Code?"], max_new_tokens=8)
    assert len(answers) == 1


def test_klt_tier_is_coded_below_its_16bit_size_restores_and_stays_within_the_bound(tokenizer):
    lm = LM(tiny_llama(torch.float64), tokenizer, name="tiny")
    base = "kvzip(keep=0.25,chunk=512)+klt(bits=1.5,group=16,residual=16)"
    plain = lm.prefill(TEXT, base)
    tier = lm.prefill(TEXT, "kvzip(keep=0.25,keys=0.6,chunk=512)+klt(bits=1.5,group=16,residual=16,tier_bits=1)")
    exact = lm.prefill(TEXT, "none")
    coded = [la.ragged.tier for la in tier.cache.layers]
    assert any(t.qk is not None for t in coded)
    n_tier = sum(sum(t.counts) for t in coded)
    d = lm.head_dim
    # the tier's keys cost well under their 16-bit size (8 bytes an element here: float64)
    assert tier.nbytes - plain.nbytes < 0.5 * n_tier * d * 8
    shape = KVShape(lm.num_layers, lm.num_kv_heads, lm.head_dim, 8)
    assert tier.nbytes <= policy_nbytes(tier.cache.policy, tier.num_tokens, shape)
    # the coded keys, RoPE put back at the positions the tier recorded, are near the exact ones there;
    # the mean of the tier's keys alone (what a 0-bit code keeps) is much further
    for la, le in zip(tier.cache.layers, exact.cache.layers):
        t = la.ragged.tier
        got = t.keys(torch.float64, lm.rope)
        start, n = t.span.tolist()
        bits = unpack_planes(t.kept.unsqueeze(0), n).bool()
        for h, (g, row, q) in enumerate(zip(got, bits, t.coded)):
            ref = le.keys[0, h, row.nonzero().squeeze(1)[:q] + start]
            err = ((g[:q] - ref).norm() / ref.norm()).item()
            err0 = ((ref.mean(0) - ref).norm() / ref.norm()).item()
            assert q == 0 or err < 0.5 * err0
    back = CompressedCache.from_state(*tier.cache.to_state())
    assert back.nbytes == tier.cache.nbytes
    for la, lb in zip(tier.cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)
    assert len(lm.ask(tier, ["Code?", "Colour?"], max_new_tokens=8)) == 2


def test_caches_with_a_tier_are_not_stacked_or_made_static(tokenizer):
    lm = LM(tiny_llama(torch.float64), tokenizer, name="tiny")
    ctx = lm.prefill(TEXT, "kvzip(keep=0.3,keys=0.6,chunk=512)")
    with pytest.raises(ValueError, match="key-only"):
        CompressedCache.stack([ctx.cache, ctx.cache])
    with pytest.raises(ValueError, match="to_static"):  # klt or 16-bit: neither is read by the kernel
        ctx.cache.to_static(max_new_tokens=4)
