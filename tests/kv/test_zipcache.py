import math

import pytest
import torch
from conftest import tiny_llama

from memfit.api import LM
from memfit.hfcompat import with_cache
from memfit.kv.attention import observe
from memfit.kv.cache import CompressedCache
from memfit.kv.evict import Observation
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.quant import load_quantized, quantize_values
from memfit.kv.zipcache import ZipCache, ZipTensor, normalized_attention

TEXT = "The vault code is 4821. The lighthouse is red. " * 12


def _outlier_channels(n=256, d=32, seed=0):
    """Keys with a few channels 10x the others (what makes per-token key codes fail)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, d, generator=g)
    x[..., :3] *= 10
    return x


def test_channel_divisors_rescue_token_wise_keys_and_salient_tokens_get_the_high_width():
    x = _outlier_channels()
    err = lambda y, ref=x: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    plain = err(quantize_values(x, 2, 32).dequantize())  # token-wise, no channel divisors
    cst = ZipCache(bits=2, salient=0.0, group=32).quantize_keys(x)
    assert cst.high.num_tokens == 0 and err(cst.dequantize()) < 0.7 * plain
    scores = torch.rand(1, 2, 256, generator=torch.Generator().manual_seed(1))
    z = ZipCache(bits=2, high_bits=4, salient=0.1, group=32).quantize_keys(x, scores=scores)
    s = math.ceil(0.1 * 256)
    assert torch.equal(z.index.long(), scores.topk(s, dim=-1).indices.sort(dim=-1).values)
    per_token = ((z.dequantize() - x).norm(dim=-1) / x.norm(dim=-1))[0]  # [H, N]
    salient = torch.zeros_like(per_token, dtype=torch.bool).scatter_(1, z.index[0].long(), True)
    assert per_token[salient].mean() < 0.5 * per_token[~salient].mean()
    assert err(z.dequantize()) < err(cst.dequantize())
    # without scores, the tokens that 2 bits serve worst are the salient ones
    q = ZipCache(bits=2, salient=0.1, group=32).quantize_keys(x)
    assert err(q.dequantize()) < err(cst.dequantize())
    # every byte is counted: both widths' codes and grids, positions, channel divisors
    assert z.nbytes == z.low.nbytes + z.high.nbytes + 2 * z.index.numel() + 2 * z.chan.numel()


def test_zip_tensor_extends_on_its_divisors_and_round_trips():
    x = _outlier_channels(n=160)
    cfg = ZipCache(bits=2, salient=0.2, group=32)
    a = cfg.quantize_keys(x[:, :, :128])
    both = a.extend(x[:, :, 128:])
    assert both.num_tokens == 160 and both.chan is a.chan and both.high.num_tokens == 26 + 7
    assert torch.equal(both.dequantize()[:, :, :128], a.dequantize())
    torch.testing.assert_close(both.dequantize()[:, :, 128:], a.like(x[:, :, 128:]).dequantize())
    t = {"k_" + n: v for n, v in both.tensors().items()}
    back = load_quantized(t, "k_", both.meta())
    assert isinstance(back, ZipTensor) and torch.equal(back.dequantize(), both.dequantize())
    other = cfg.quantize_keys(x[:, :, 128:])
    with pytest.raises(ValueError, match="different channel divisors"):
        a.cat(other)
    with pytest.raises(ValueError, match="prefix cannot be cut"):
        both.prefix(64)
    # codes taken after the Hadamard rotation read back in the model's basis
    rot = ZipCache(bits=2, salient=0.2, group=32, rotate=True).quantize_keys(x)
    assert rot.rotated and ((rot.dequantize() - x).norm() / x.norm()).item() < 0.5


def test_normalized_attention_equals_full_attention_column_means():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    logits = q.reshape(1, 2, 2, 40, 16) @ k.unsqueeze(2).transpose(-1, -2) / 4.0
    logits = logits.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    ref = logits.softmax(-1).sum(dim=(2, 3)) / (2 * torch.arange(40, 0, -1))  # key j: 2 heads x (40 - j) queries
    torch.testing.assert_close(normalized_attention(q, torch.arange(40), k, 0), ref)
    # probe rows at chosen positions, keys starting later (a context after a prefix)
    pos = torch.tensor([5, 17, 39])
    sub = normalized_attention(q[:, :, pos], pos + 100, k, 100)
    assert sub.shape == (1, 2, 40) and (sub[..., 18:] > 0).any() and (sub[..., 40:] == 0).all()


def test_the_probe_records_the_queries_at_its_positions():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 96), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache("none", 2)
    with torch.no_grad(), observe(window=96, probe=0.25) as rec:
        for s in (0, 64):
            model(ids[:, s : s + 64], **with_cache(model, cache))
    pos, q = rec.probes[0]
    assert pos.tolist() == sorted(set(pos.tolist())) and len(pos) == 16 + 8 and pos.max() < 96
    assert torch.equal(q, rec.queries[0][:, :, pos])
    obs = rec.observations(2)
    assert obs[1].probe is rec.probes[1] and obs[1].queries is rec.queries[1]


def test_prefill_scores_keys_and_values_alike_and_the_cache_decodes_and_restores(tokenizer):
    lm = LM(tiny_llama(torch.float64), tokenizer, name="tiny")
    ctx = lm.prefill(TEXT, "zipcache(bits=2,salient=0.2,group=16,residual=16,probe=0.1,recent=16)")
    layer = ctx.cache.layers[0]
    assert isinstance(layer.qk, ZipTensor) and torch.equal(layer.qk.index, layer.qv.index)  # one saliency
    # the stored salient tokens are the ones the probe's normalized attention ranks highest
    base = CompressedCache("none", lm.num_layers, defer=True, rope=lm.rope, dtype=lm.kv_dtype)
    pol = parse_policy(ctx.policy)
    with observe(pol.queries_needed(), probe=pol.probe()) as rec:
        lm._forward(ctx.token_ids, base, 4096)
    keys = base.layers[0].keys
    sal = pol.quant.saliency(keys, rec.observations(lm.num_layers)[0], 0)
    n = layer.qk.num_tokens
    assert torch.equal(layer.qk.index.long(), sal[..., :n].topk(math.ceil(0.2 * n)).indices.sort().values)
    answers = lm.ask(ctx, ["Code?", "Colour?"], max_new_tokens=24)  # the forks' windows spill while decoding
    assert len(answers) == 2
    # a function of its whole context: never cut for prefix reuse
    with pytest.raises(ValueError, match="function of its whole context"):
        ctx.cache.truncate_(64)
    assert ctx.to_entry()[1] == []
    back = CompressedCache.from_state(*ctx.cache.to_state())
    assert back.nbytes == ctx.cache.nbytes
    for la, lb in zip(ctx.cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)


def test_a_context_shorter_than_the_first_spill_decodes_on(tiny_lm):
    # fewer than 64 scored context tokens stay in the window; the first spill, while decoding, takes a key group
    # of 64 (context and new tokens): the new ones have no saliency, so the query-free rule picks
    ctx = tiny_lm.prefill("Short text here.", "zipcache(bits=2,group=64,residual=128)")
    layer = ctx.cache.layers[0]
    assert layer.qk is None and layer._scores is not None and layer._scores.shape[-1] < 64
    ids = torch.randint(0, 250, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in range(200):
            tiny_lm.model(ids[:, t : t + 1], **with_cache(tiny_lm.model, ctx.cache))
    assert isinstance(layer.qk, ZipTensor) and layer._scores is None
    assert layer.qk.num_tokens + layer.keys.shape[-2] == ctx.cache.get_seq_length()


def test_without_a_probe_the_cache_still_compresses():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 120), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache("zipcache(bits=2,group=16,residual=16)", 2)
    with torch.no_grad():
        model(ids[:, :100], **with_cache(model, cache))
        for t in range(100, 120):
            model(ids[:, t : t + 1], **with_cache(model, cache))
    layer = cache.layers[0]
    assert isinstance(layer.qk, ZipTensor) and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    # the saliency slot of an observation follows an eviction's kept tokens
    obs = Observation(saliency=torch.arange(10.0).view(1, 1, 10))
    assert obs.kept(torch.tensor([[[2, 7]]])).saliency.tolist() == [[[2.0, 7.0]]]


@pytest.mark.parametrize("spec,message", [
    ("zipcache(high_bits=3)", "zipcache: high_bits: bits must be one of"),
    ("zipcache(bits=4,high_bits=2)", "high_bits \\(2\\) must be at least bits \\(4\\)"),
    ("zipcache(salient=1.5)", "salient must be a fraction"),
    ("zipcache(probe=-0.1)", "probe must be in"),
    ("zipcache(group=24)", "zipcache: group must be a power of two"),
])
def test_bad_configs_are_named(spec, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(spec)


def test_scores_of_the_wrong_shape_are_named():
    with pytest.raises(ValueError, match="scores must be"):
        ZipCache().quantize_keys(torch.randn(1, 2, 64, 32), scores=torch.rand(1, 2, 60))
