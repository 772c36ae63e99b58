import pytest
import torch
from conftest import tiny_llama

from memfit.api import LM
from memfit.kv.cache import CompressedCache
from memfit.kv.mixed import MixedTensor, allocate, salient_count
from memfit.kv.plan import KVShape, policy_nbytes
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.quant import load_quantized
from memfit.kv.rotate import Hadamard, RotatedTensor

TEXT = "The vault code is 4821. The lighthouse is red. The river is long. " * 14


def _err(y, x):
    return ((y - x).norm() / x.norm()).item()


def test_salient_tokens_take_the_high_width_and_the_others_stay_as_the_low_width_stores_them():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 256, 32, generator=g)
    scores = torch.rand(1, 2, 256, generator=g)
    scores[0, 0] *= 0.5  # head 1's scores are higher: it takes more of the layer's budget
    scores[..., :4] = 10.0  # sinks are exact already: never salient, whatever their scores
    quant = Hadamard(bits=2, group=32, residual=32, salient=0.25)
    low_only = Hadamard(bits=2, group=32, residual=32)
    for kind in ("keys", "values"):
        q = getattr(quant, f"quantize_{kind}")(x, scores=scores)
        assert isinstance(q, MixedTensor) and q.high.q.bits == 4 and q.low.q.bits == 2 and q.heads == 2
        assert salient_count(quant, 256) == 64 and q.high.num_tokens == 128  # two heads' shares, pooled
        assert q.shape == (1, 2, 256, 32) and q.num_tokens == 256
        pos = q.index.long()[0, 0]
        per_head = [int((pos // 256 == h).sum()) for h in range(2)]
        assert sum(per_head) == 128 and per_head[1] > per_head[0] and all(c % 32 == 0 for c in per_head)
        for h, c in enumerate(per_head):  # each head's share: its best scores, the sinks left out
            best = scores[0, h].clone()
            best[:4] = float("-inf")
            assert torch.equal(pos[pos // 256 == h] - 256 * h, best.topk(c).indices.sort().values)
        y = q.dequantize()
        flat_y, flat_x = y.reshape(-1, 32), x.reshape(-1, 32)
        plain = getattr(low_only, f"quantize_{kind}")(x).dequantize().reshape(-1, 32)
        assert _err(flat_y[pos], flat_x[pos]) < 0.3 * _err(plain[pos], flat_x[pos])  # 4 bits against 2
        assert torch.equal(y[:, :, :4], x[:, :, :4].half().float())  # the sinks, exact
        assert _err(y, x) < _err(plain.reshape(x.shape), x)
        # stored and restored by kind
        t = {"p" + n: v for n, v in q.tensors().items()}
        back = load_quantized(t, "p", q.meta())
        assert torch.equal(back.dequantize(), y)
        # the window's later spills follow each head's scored tokens, at the low width
        more = torch.randn(1, 2, 32, 32, generator=g)
        longer = q.cat(getattr(quant, f"quantize_{kind}")(more, first=False))
        assert longer.num_tokens == 288 and torch.equal(longer.dequantize()[:, :, :256], y)
        assert _err(longer.dequantize()[:, :, 256:], more) < 0.5
    # without scores every token keeps the low width (and the same bytes as the plain quantizer's codes)
    q = quant.quantize_keys(x)
    assert q.high is None and torch.equal(q.dequantize(), low_only.quantize_keys(x).dequantize())
    # rows of a batch choose per head
    q = quant.quantize_values(x.expand(2, -1, -1, -1), scores=scores.expand(2, -1, -1))
    assert q.heads == 0 and q.index.shape == (2, 2, 64) and torch.equal(q.dequantize()[1], q.dequantize()[0])


def test_a_ragged_run_chooses_per_head_and_keeps_each_heads_sinks():
    g = torch.Generator().manual_seed(1)
    lens = [128, 64, 192]
    x = torch.randn(1, 1, sum(lens), 16, generator=g)
    scores = torch.rand(1, 1, sum(lens), generator=g)
    quant = Hadamard(bits=2, group=32, residual=32, sinks=2, salient=0.5)
    starts = [0, 128, 192]
    q = quant.quantize_keys(x, starts=starts, scores=scores)
    picked = q.index.long()[0, 0].tolist()
    for s, n in zip(starts, lens):
        mine = [p for p in picked if s <= p < s + n]
        assert len(mine) == salient_count(quant, n)  # 64, 32, 96
        assert all(p >= s + 2 for p in mine)
    y = q.dequantize()
    for s in starts:
        assert torch.equal(y[0, 0, s : s + 2], x[0, 0, s : s + 2].half().float())


def test_prefill_with_kvzip_scores_decodes_restores_and_stays_within_the_planners_bound(tokenizer):
    lm = LM(tiny_llama(torch.float64), tokenizer, name="tiny")
    spec = "hadamard(bits=2,group=16,residual=16,meta_bits=8,salient=0.2)"
    pol = parse_policy(spec)
    assert pol.observes() == {"reconstruction"} and not pol.prefix_reusable
    ctx = lm.prefill(TEXT, spec)
    layer = ctx.cache.layers[0]
    assert isinstance(layer.qk, MixedTensor) and layer.qk.high is not None
    assert torch.equal(layer.qk.index, layer.qv.index)  # one choice for keys and values
    # the salient tokens are those KVzip's reconstruction scores rank highest (the sinks left out)
    base = CompressedCache("none", lm.num_layers, defer=True, rope=lm.rope, dtype=lm.kv_dtype)
    lm._forward(ctx.token_ids, base, 4096)
    n = layer.qk.num_tokens
    scores = lm.reconstruction_scores(ctx.token_ids, base, pol.kvzip_chunk)[0][0, :, :n]
    counts = allocate(pol.quant, scores.flatten(), [0, n], True)
    assert sum(counts) == 2 * salient_count(pol.quant, n) > 0
    scores[:, :4] = float("-inf")
    best = [scores[h].topk(c).indices.sort().values + h * n for h, c in enumerate(counts)]
    assert torch.equal(layer.qk.index.long()[0, 0], torch.cat(best))
    assert ctx.nbytes == policy_nbytes(pol, ctx.num_tokens, KVShape(lm.num_layers, lm.num_kv_heads, lm.head_dim, 8))  # float64
    assert layer.not_packed() == "tokens at two widths (salient)"
    answers = lm.ask(ctx, ["Code?", "Colour?"], max_new_tokens=24)  # forks spill while decoding
    assert len(answers) == 2
    with pytest.raises(ValueError, match="whole"):
        ctx.cache.truncate_(64)
    back = CompressedCache.from_state(*ctx.cache.to_state())
    assert back.nbytes == ctx.cache.nbytes
    for la, lb in zip(ctx.cache.layers, back.layers):
        for a, b in zip(la.materialize(), lb.materialize()):
            assert torch.equal(a, b)
    # the same scores, evicting first: the salient tokens are among those kept
    both = lm.prefill(TEXT, "kvzip(keep=0.5)+" + spec)
    assert both.nbytes < ctx.nbytes and any(isinstance(la.ragged.qk, MixedTensor) for la in both.cache.layers)


def test_the_window_spills_at_the_low_width_after_the_scored_context(tokenizer):
    lm = LM(tiny_llama(torch.float64), tokenizer, name="tiny")
    ctx = lm.prefill(TEXT, "hadamard(bits=2,group=16,residual=16,salient=0.25)")
    layer = ctx.cache.layers[0]
    before = layer.qk.high.num_tokens
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    from memfit.hfcompat import with_cache

    with torch.no_grad():
        for t in range(40):
            lm.model(ids[:, t : t + 1], **with_cache(lm.model, ctx.cache))
    assert layer.qk.high.num_tokens == before and isinstance(layer.qk.low, RotatedTensor)
    assert layer.qk.num_tokens + layer.keys.shape[-2] == ctx.cache.get_seq_length()


@pytest.mark.parametrize("spec,message", [
    ("hadamard(salient=1.5)", "salient must be a fraction"),
    ("hadamard(salient=0.1,high_bits=3)", "hadamard: high_bits must be one of"),
    ("hadamard(bits=4,salient=0.1,high_bits=2)", "high_bits \\(2\\) must be at least"),
])
def test_bad_configs_are_named(spec, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(spec)


def test_scores_of_the_wrong_shape_are_named():
    with pytest.raises(ValueError, match="salient scores must be"):
        Hadamard(group=32, salient=0.2).quantize_keys(torch.randn(1, 2, 64, 32), scores=torch.rand(1, 2, 60))


def test_each_module_imports_first_in_a_fresh_process():
    # rotate imports mixed, which builds on rotate: no import order may meet a half-built module
    import subprocess
    import sys

    for mod in ("memfit.kv.zipcache", "memfit.kv.mixed", "memfit.kv.rotate"):
        run = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
