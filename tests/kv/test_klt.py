import math

import pytest
import torch
from conftest import tiny_llama

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.klt import KLT, KLTFit, KLTHeads, KLTKeys, allocate
from memfit.kv.plan import KVShape, policy_nbytes
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.quant import load_quantized
from memfit.kv.rotate import Hadamard


def test_allocation_spends_the_mean_width_where_the_variance_is():
    var = torch.tensor([[100.0, 10.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.0]])
    w = allocate(var, 2.0, 6)
    assert int(w.sum()) == 16 and int(w.max()) <= 6
    assert torch.all(w[0, :-1] >= w[0, 1:])  # never more bits to a smaller variance
    assert w[0, -4:].sum() == 0 < w[0, 0]  # constant components: no bits
    assert allocate(torch.ones(2, 64), 1.5, 4).sum(-1).tolist() == [96, 96]  # round(mean * D) a row
    assert allocate(torch.ones(1, 8), 6.0, 6).tolist() == [[6] * 8]  # capped at max_bits


def _low_rank_keys(n=256, d=32, rank=4, seed=0):
    """Keys as a head's pre-RoPE keys are: a few directions (not channels) carry their variance."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:rank] * torch.tensor([8.0, 4.0, 2.0, 1.0])[:, None]
    return torch.randn(1, 2, n, rank, generator=g) @ mix + 0.05 * torch.randn(1, 2, n, d, generator=g) + 1.0


def test_transform_coding_beats_rotated_2_bit_keys_at_the_same_mean_width():
    k = _low_rank_keys()
    q = torch.randn(1, 2, 8, 32, generator=torch.Generator().manual_seed(3))

    def logit_err(x):
        return float(((q @ (x - k).transpose(-1, -2)).norm() / (q @ k.transpose(-1, -2)).norm()))

    klt = logit_err(KLT(bits=2, group=32, sinks=0).quantize_keys(k).dequantize())
    had = logit_err(Hadamard(bits=2, group=32, sinks=0).quantize_keys(k).dequantize())
    assert klt < 0.5 * had


def test_keys_round_trip_with_exact_sinks_and_wide_components():
    k = _low_rank_keys() * 3
    run = KLT(bits=6, max_bits=6, group=32, sinks=2).quantize_keys(k)
    x = run.dequantize()
    assert torch.equal(x[:, :, :2], k[:, :, :2].half().float())  # sinks exactly (float16)
    assert float((x - k).norm() / k.norm()) < 0.02  # 6 bits everywhere: little error
    back = load_quantized({f"k_{n}": t for n, t in run.tensors().items()}, "k_", run.meta())
    assert torch.equal(back.dequantize(), x) and back.nbytes == run.nbytes


def test_later_runs_extend_on_the_fit_and_a_forks_run_carries_no_basis():
    k = _low_rank_keys(n=128)
    first = KLT(bits=2, group=32).quantize_keys(k[:, :, :64])
    joined = first.extend(k[:, :, 64:])
    assert joined.num_tokens == 128 and joined.fit is first.fit
    torch.testing.assert_close(joined.dequantize()[:, :, :64], first.dequantize(), atol=1e-5, rtol=0)
    torch.testing.assert_close(joined.prefix(64).dequantize(), first.dequantize(), atol=1e-5, rtol=0)
    forked = first.like(k[:, :, 64:])
    assert not forked.owner and "basis_codes" not in forked.tensors() and forked.sink is None
    assert forked.nbytes < first.nbytes - first.fit.basis_codes.numel()
    with pytest.raises(ValueError, match="fork"):
        load_quantized({f"k_{n}": t for n, t in forked.tensors().items()}, "k_", forked.meta())


def test_a_fit_stored_before_offsets_still_reads():
    """Fits stored before 0-bit components became an offset kept their whole basis and group means."""
    k = _low_rank_keys(n=128)
    new = KLTFit.fit(k, 1.5, 6)
    assert new.offset is not None and (new.widths == 0).any()
    assert new.tensors()["basis_codes"].shape == (int((new.widths != 0).sum()), k.shape[-1])
    _, h, _, d = k.shape  # the old layout: a whole basis (here the identity), 0-bit components' group means
    ones = torch.ones(1, h, 1, d, dtype=torch.float16)
    old = KLTFit(torch.eye(d, dtype=torch.int8).expand(1, h, d, d), ones, ones * 0, new.widths, ones)
    run = KLTKeys.encode(k, old, 32)
    assert "w0_mean" in run.tensors() and "offset" not in run.tensors()
    back = load_quantized({f"k_{n}": t for n, t in run.tensors().items()}, "k_", run.meta())
    torch.testing.assert_close(back.dequantize(), run.dequantize())
    # a stored basis that does not match its widths is named
    t = {f"k_{n}": v for n, v in KLTKeys.encode(k, new, 32).tensors().items()}
    t["k_basis_codes"] = t["k_basis_codes"][1:]
    with pytest.raises(ValueError, match="stored basis"):
        load_quantized(t, "k_", KLTKeys.encode(k, new, 32).meta())


def test_token_bytes_bound_what_a_run_stores():
    cfg, d, n, h = KLT(bits=1.5, group=32, sinks=4), 32, 1024, 2
    k, v = _low_rank_keys(n=n, d=d), torch.randn(1, h, n, d)
    keys = cfg.quantize_keys(k)
    stored = keys.nbytes + cfg.quantize_values(v).nbytes
    bound = n * h * cfg.token_bytes(d) + cfg.fixed_bytes(h, d)
    # the bound counts every component's basis column (int8 codes and a float16 scale) and two grid
    # bytes a group; a 0-bit component stores neither
    zero = int((keys.fit.widths == 0).sum())
    assert zero > 0 and stored == bound - zero * (d + 2) - zero * (n // cfg.group) * 2


def test_klt_cache_puts_rope_back_decodes_forks_and_restores():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 140), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        cache = CompressedCache.for_model(model, "klt(bits=6,max_bits=6,group=16,residual=16)")
        out = [model(ids[:, :100], **with_cache(model, cache)).logits]
        for t in range(100, 120):  # the window spills while decoding: later runs extend the first
            out.append(model(ids[:, t : t + 1], **with_cache(model, cache)).logits)
    layer = cache.layers[0]
    assert isinstance(layer.qk, KLTKeys) and layer.pre_rope and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    assert layer.not_packed() is not None  # the decode kernel reads KIVI codes only
    assert 0.9 * policy_nbytes(cache.policy, 120, KVShape(2, 2, 16, 4)) <= cache.nbytes <= policy_nbytes(
        cache.policy, 120, KVShape(2, 2, 16, 4))  # the planner's bound
    got = torch.cat(out, 1)
    assert (got - ref[:, :120]).abs().max() < 0.05 * ref.abs().max()  # 6-bit keys, RoPE put back right
    back = CompressedCache.from_state(*cache.to_state())
    for la, lb in zip(cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)
    assert back.nbytes == cache.nbytes
    fork = cache.fork()  # its spills: at its own positions (120..), on the parent's pre-RoPE basis
    with torch.no_grad():
        fork_out = [model(ids[:, t : t + 1], **with_cache(model, fork)).logits for t in range(120, 140)]
    own = fork.layers[0].qk
    assert own is not None and own.fit is layer.qk.fit and not own.owner and fork.layers[0].origin == 120
    assert (torch.cat(fork_out, 1) - ref[:, 120:]).abs().max() < 0.05 * ref.abs().max()


def test_klt_at_two_bits_keeps_attention_closer_than_hadamard_in_a_cache():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[:, 160:]

        def err(spec):
            cache = CompressedCache.for_model(model, spec)
            model(ids[:, :160], **with_cache(model, cache))
            got = model(ids[:, 160:], **with_cache(model, cache)).logits
            return float((got - ref).norm() / ref.norm())

        assert math.isfinite(err("klt(bits=2,group=16,residual=16)"))
        assert err("klt(bits=4,group=16,residual=16)") < err("klt(bits=1,group=16,residual=16)")


def test_bad_klt_configs_name_the_problem():
    for spec, match in [("klt(bits=7)", "bits"), ("klt(max_bits=9)", "max_bits"), ("klt(value_bits=3)", "value_bits"),
                        ("klt(sinks=-1)", "sinks"), ("klt(group=48)", "group"), ("klt(group=4)", "group")]:
        with pytest.raises(PolicyError, match=match):
            parse_policy(spec)
    with pytest.raises(PolicyError, match="pre_rope"):
        parse_policy("klt(bits=2)+decode(max_tokens=256)")
    model = tiny_llama()
    cache = CompressedCache("klt(bits=2,group=16,residual=16)", 2)  # no model: no RoPE to take off
    with pytest.raises(ValueError, match="RoPE"), torch.no_grad():
        model(torch.randint(0, 250, (1, 64)), **with_cache(model, cache))
    fit = KLTFit.fit(torch.randn(1, 2, 32, 16), 2.0, 6)
    with pytest.raises(ValueError, match="do not match"):
        KLTKeys.encode(torch.randn(1, 3, 32, 16), fit, 16)


@pytest.mark.parametrize("evict,pre", [("none", True), ("knorm(keep=0.5)", True), ("knorm(keep=0.5,heads=adaptive)", True),
                                        ("knorm(keep=0.5,heads=adaptive)", False),
                                        # positions followed through two evictions; the last keeping everything
                                        ("knorm(keep=0.7)+knorm(keep=0.7,heads=adaptive)", True),
                                        ("knorm(keep=0.6)+knorm(keep=1.0)", True)])
def test_klt_answers_several_questions_after_eviction_and_round_trips(tiny_lm, evict, pre):
    """Pre-RoPE with or without eviction (evicted heads stored ragged with their positions, each
    head on its own basis), post-RoPE ragged (heads share a basis); forks of two rows."""
    ids = torch.randint(0, 250, (1, 400), generator=torch.Generator().manual_seed(8))
    spec = "klt(bits=2,group=16,residual=16" + ("" if pre else ",pre_rope=false") + ")"
    if evict != "none":
        spec = f"{evict}+{spec}"
    ctx = tiny_lm.prefill_ids(ids, spec)
    # the reference keeps what the klt cache keeps: a ragged head's count is rounded to whole groups
    # of the quantizer's (here 8-bit KIVI's, of the same size)
    exact = tiny_lm.prefill_ids(ids, evict if evict == "none" else f"{evict}+kivi(bits=8,group=16,residual=16)")
    layer = ctx.cache.layers[0]
    assert layer.pre_rope == pre and (layer.ragged is not None) == (evict != "none")
    qk = layer.ragged.qk if layer.ragged is not None else layer.qk
    if layer.ragged is not None:  # each head's first tokens are sinks of their own
        lens, nq = layer.ragged.lens.tolist()
        if pre:  # one run a head, each on its own basis; positions: one bit a context token a head
            assert isinstance(qk, KLTHeads) and all(r.n == q and r.sink.shape[-2] == 4 for r, q in zip(qk.runs, nq))
            assert len({id(r.fit) for r in qk.runs}) == len(nq) and layer.ragged.kept.shape == (len(nq), 400 // 8)
            k, _, mask = exact.cache.layers[0].materialize_masked()
            keep = mask[0].sum(-1).tolist() if mask is not None else [k.shape[-2]] * len(nq)  # uniform: stored ragged
            assert [len(p) for p in layer.ragged.positions()] == nq and lens == keep
        else:
            starts = [sum(nq[:h]) for h in range(len(nq)) if nq[h]]
            assert isinstance(qk, KLTKeys) and qk.sink_at == tuple(r for s in starts for r in range(s, s + 4))
    bound = policy_nbytes(ctx.policy, 400, KVShape.from_config(tiny_lm.model.config, layer.keys.element_size()))
    # the planner's bound counts the positions too (adaptive heads: it assumes the most 16-bit window)
    assert (0.6 if "adaptive" in evict else 0.8) * bound <= ctx.cache.nbytes <= bound
    (got, gv, _), (ref, rv, _) = ctx.cache.layers[0].materialize_masked(), exact.cache.layers[0].materialize_masked()
    err = float((got - ref).norm() / ref.norm())
    assert err < 0.45  # what eviction kept, in 2-bit error (a token at a wrong position: ~1.4)
    assert float((gv - rv).norm() / rv.norm()) < 0.45
    a = tiny_lm.ask(ctx, ["x", "yz"], max_new_tokens=40)  # the forks' windows spill onto the context's fit
    back = CompressedCache.from_state(*ctx.cache.to_state())
    assert back.nbytes == ctx.nbytes
    assert tiny_lm.ask(type(ctx)(back, ctx.token_ids, ctx.policy, lm=tiny_lm), ["x", "yz"], max_new_tokens=40) == a


def test_tokens_after_a_ragged_context_are_coded_on_its_heads_fits(tiny_lm):
    """The layer's own tokens after a ragged (evicted) context, and a fork's, are coded on the
    context's per-head bases, not on a basis fitted to their first group alone; restored from them."""
    ids = torch.randint(0, 250, (1, 400), generator=torch.Generator().manual_seed(9))
    ctx = tiny_lm.prefill_ids(ids, "knorm(keep=0.5,heads=adaptive)+klt(bits=2,group=16,residual=16)")
    cache = ctx.cache
    with torch.no_grad():
        tiny_lm.model(torch.randint(0, 250, (1, 64)), **with_cache(tiny_lm.model, cache))
    layer = cache.layers[0]
    assert isinstance(layer.ragged.qk, KLTHeads) and layer.qk.num_tokens >= 32
    assert layer.qk.on_heads == layer.ragged.heads and layer.qk.fit is layer.ragged.qk.fit and not layer.qk.owner
    assert "basis_codes" not in layer.qk.tensors()  # the fits are the context's, stored once
    back = CompressedCache.from_state(*cache.to_state())
    assert back.nbytes == cache.nbytes
    torch.testing.assert_close(back.layers[0].qk.dequantize(), layer.qk.dequantize())
    fork = tiny_lm.prefill_ids(ids, ctx.policy).cache.fork(2)  # two rows on the unextended context
    with torch.no_grad():
        tiny_lm.model(torch.randint(0, 250, (2, 48)), **with_cache(tiny_lm.model, fork))
    assert all(la.qk.on_heads == la.parent.ragged.heads and la.qk.rows == 2 for la in fork.layers)


def test_query_weights_ignore_rope_and_steer_the_bits_to_what_queries_read():
    from memfit.kv.klt import query_weight
    from memfit.kv.rope import RoPE

    g = torch.Generator().manual_seed(4)
    scale = torch.ones(16)
    scale[[1, 9]] = 6.0  # one RoPE pair the queries read hard
    q = torch.randn(1, 4, 32, 16, generator=g) * scale
    w = query_weight(q, 2)
    assert w.shape == (1, 2, 16) and torch.equal(w[..., :8], w[..., 8:])
    moved = RoPE.default(16, 10000.0).rotate(q, torch.arange(500, 532))
    torch.testing.assert_close(query_weight(moved, 2), w, rtol=1e-4, atol=1e-5)
    k = torch.randn(1, 2, 256, 16, generator=g) * torch.linspace(1.0, 3.0, 16)  # keys wide where queries are not

    def logit_err(weighted):
        cfg = KLT(bits=1.5, group=32, sinks=0)
        x = cfg.quantize_keys(k, weight=w if weighted else None).dequantize()
        qq = q.reshape(1, 2, 64, 16)
        return float((qq @ (x - k).transpose(-1, -2)).norm())

    assert logit_err(True) < 0.8 * logit_err(False)


@pytest.mark.parametrize("evict", ["none", "kvzip(keep=0.5,heads=adaptive)"])
def test_salient_values_are_the_best_scored_tokens_at_high_bits_and_round_trip(tiny_lm, evict):
    """``salient``: the values of the tokens KVzip's scores rank highest (keys untouched) at ``high_bits``,
    uniform or after an eviction (ragged, keys before RoPE); counted within the planner's bound."""
    from memfit.kv.mixed import MixedTensor

    ids = torch.randint(0, 250, (1, 400), generator=torch.Generator().manual_seed(10))
    base = "klt(bits=2,group=16,residual=16)" if evict == "none" else f"{evict}+klt(bits=2,group=16,residual=16)"
    spec = base.replace("residual=16", "residual=16,salient=0.25,high_bits=8")
    ctx, plain = tiny_lm.prefill_ids(ids, spec), tiny_lm.prefill_ids(ids, base)
    exact = tiny_lm.prefill_ids(ids, evict if evict == "none" else f"{evict}+kivi(bits=8,group=16,residual=16)")
    layer = ctx.cache.layers[0]
    qv = layer.ragged.qv if layer.ragged is not None else layer.qv
    assert isinstance(qv, MixedTensor) and qv.high is not None and qv.high.q.bits == 8
    n = qv.low.num_tokens + qv.high.num_tokens  # over all heads: stored head after head
    assert 0.2 * n <= qv.high.num_tokens <= 0.25 * n and not isinstance(layer.qk, MixedTensor)
    bound = policy_nbytes(ctx.policy, 400, KVShape.from_config(tiny_lm.model.config, layer.keys.element_size()))
    assert plain.cache.nbytes < ctx.cache.nbytes <= bound
    if layer.ragged is None:  # the salient tokens' values are kept closer (8 bits) than the others (2 bits)
        per_head = qv.num_tokens
        err = (layer.materialize()[1] - exact.cache.layers[0].materialize()[1])[0, :, :per_head].norm(dim=-1)
        mask = torch.zeros_like(err, dtype=torch.bool)
        at = qv.index.long().flatten()
        mask[at // per_head, at % per_head] = True
        assert err[mask].mean() < 0.2 * err[~mask].mean()
    a = tiny_lm.ask(ctx, ["x", "yz"], max_new_tokens=30)
    back = CompressedCache.from_state(*ctx.cache.to_state())
    assert back.nbytes == ctx.nbytes
    assert tiny_lm.ask(type(ctx)(back, ctx.token_ids, ctx.policy, lm=tiny_lm), ["x", "yz"], max_new_tokens=30) == a
    with pytest.raises(PolicyError, match="salient"):
        parse_policy("klt(salient=1.5)")
    with pytest.raises(PolicyError, match="high_bits"):
        parse_policy("klt(salient=0.1,high_bits=3)")
