import pytest
import torch

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.lowrank import LowRank, project, reconstruct
from memfit.kv.policy import PolicyError, parse_policy

TEXT = "The lighthouse keeper counted ships and wrote their names in a book. " * 12


def _keys(rank=None, b=1, h=2, n=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    flat = torch.randn(b, n, rank, generator=g, dtype=torch.float64) @ torch.randn(b, rank, h * d, generator=g, dtype=torch.float64)
    return flat.reshape(b, n, h, d).transpose(1, 2).contiguous()


def test_keys_of_rank_r_are_stored_exactly():
    k = _keys(rank=8)
    basis = LowRank(rank=8).basis(k)
    assert basis.shape == (1, 32, 8)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(8, dtype=torch.float64)[None], atol=1e-10, rtol=0)
    torch.testing.assert_close(reconstruct(project(k, basis), basis, 2), k, atol=1e-9, rtol=0)


def test_basis_is_the_best_rank_r_subspace():
    k = _keys()
    flat = k.transpose(1, 2).reshape(300, 32)
    err = (reconstruct(project(k, LowRank(rank=16).basis(k)), LowRank(rank=16).basis(k), 2) - k).pow(2).sum()
    s = torch.linalg.svdvals(flat)
    torch.testing.assert_close(err, s[16:].pow(2).sum(), rtol=1e-8, atol=0)  # Eckart-Young
    rand = torch.linalg.qr(torch.randn(32, 16, dtype=torch.float64))[0][None]
    assert err < (reconstruct(project(k, rand), rand, 2) - k).pow(2).sum()


@pytest.mark.parametrize("policy", ["lowrank(rank=16)", "lowrank(rank=16)+kivi(bits=8,group=16,residual=16)"])
def test_cache_holds_the_projected_context_keys(tiny_lm, policy):
    full = tiny_lm.prefill(TEXT, "none")
    ctx = tiny_lm.prefill(TEXT, policy)
    lr = parse_policy(policy)
    for layer, ref in zip(ctx.cache.layers, full.cache.layers):
        k, v = layer.materialize()
        basis = lr.lowrank.basis(ref.keys)
        want = reconstruct(project(ref.keys, basis), basis, ref.keys.shape[1])
        if lr.quant is None:
            torch.testing.assert_close(k, want, atol=1e-9, rtol=0)
            torch.testing.assert_close(v, ref.values, atol=0, rtol=0)
        else:  # the window stays exact; the spilled part is quantized coefficients, close to the projection
            n = layer.keys.shape[-2]
            torch.testing.assert_close(k[:, :, -n:], ref.keys[:, :, -n:], atol=0, rtol=0)
            assert (k[:, :, :-n] - want[:, :, :-n]).abs().max() < 0.02 * want.abs().max()
    assert ctx.nbytes < full.nbytes
    assert tiny_lm.ask(ctx, "What did the keeper count?", max_new_tokens=4) is not None


def test_low_rank_cache_round_trips_and_forks(tiny_lm):
    ctx = tiny_lm.prefill(TEXT, "lowrank(rank=8)+kivi(bits=4,group=16,residual=16)")
    tensors, state = ctx.cache.to_state()
    assert any(n.endswith("k_basis") for n in tensors)
    back = CompressedCache.from_state(tensors, state)
    for a, b in zip(ctx.cache.layers, back.layers):
        for x, y in zip(a.materialize(), b.materialize()):
            assert torch.equal(x, y)
    fork = ctx.cache.fork(2)
    assert fork.nbytes == 0  # the basis belongs to the parent
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        tiny_lm.model(ids, **with_cache(tiny_lm.model, fork), use_cache=True)  # spills project onto the parent's basis
    assert fork.layers[0].qk is not None and fork.layers[0].qk.codes.shape[1] == 1
    assert fork.layers[0].basis is ctx.cache.layers[0].basis


def test_plain_generate_fits_a_basis_at_the_first_spill(tiny_lm):
    cache = CompressedCache("lowrank(rank=8)+kivi(bits=4,group=16,residual=16)", tiny_lm.num_layers)
    ids = torch.randint(0, 256, (1, 60))
    with torch.no_grad():
        tiny_lm.model(ids, **with_cache(tiny_lm.model, cache), use_cache=True)
    assert cache.layers[0].basis is not None
    assert cache.layers[0].qk.num_tokens == cache.policy.quant.spilled(60) and cache.layers[0].qk.codes.shape[-1] == 8 * 4 // 8


def test_lowrank_policy_errors(tiny_lm):
    with pytest.raises(PolicyError, match="before the quantizer"):
        parse_policy("kivi(bits=4)+lowrank(rank=16)")
    with pytest.raises(PolicyError, match="heads=uniform"):
        parse_policy("kvzip(keep=0.3,heads=adaptive)+lowrank(rank=16)")
    with pytest.raises(PolicyError, match="multiple of 8"):
        parse_policy("lowrank(rank=12)")
    with pytest.raises(ValueError, match="saves nothing"):
        tiny_lm.prefill(TEXT, "lowrank(rank=32)")  # 2 heads x 16 channels
    assert parse_policy("snapkv(keep=0.3)+lowrank(rank=16)+kivi(bits=2)").spec.index("lowrank") > 0


def test_cross_layer_coefficients_store_keys_that_share_their_token_factor_exactly():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(1, 300, 8, generator=g, dtype=torch.float64)  # what adjacent layers' keys share
    keys = [(shared @ torch.randn(1, 8, 32, generator=g, dtype=torch.float64)).reshape(1, 300, 2, 16).transpose(1, 2)
            for _ in range(3)]
    coef, blocks = LowRank(rank=8, layers=3).shared(keys)
    assert coef.shape == (1, 1, 300, 8) and [b.shape for b in blocks] == [(1, 32, 8)] * 3
    for k, basis in zip(keys, blocks):
        torch.testing.assert_close(reconstruct(coef, basis, 2), k, atol=1e-9, rtol=0)


def test_cross_layer_cache_counts_shared_coefficients_once_and_round_trips(tiny_lm):
    full = tiny_lm.prefill(TEXT, "none")
    ctx = tiny_lm.prefill(TEXT, "lowrank(rank=16,layers=2)")
    a, b = ctx.cache.layers
    assert b.kc is a.kc and b.coef_from == 0 and a.coef_from is None
    assert "k_coef" in a.tensors() and "k_coef" not in b.tensors()
    n = ctx.num_tokens
    shared = n * 16 * a.kc.element_size()
    assert ctx.nbytes == full.nbytes - sum(la.keys.numel() * la.keys.element_size() for la in full.cache.layers) \
        + shared + sum(la.basis.numel() * la.basis.element_size() for la in (a, b))
    # the error is the best rank-16 fit of the two layers' keys side by side: the spectrum left out
    ks = [la.materialize()[0] for la in full.cache.layers]
    flat = torch.cat([k.transpose(1, 2).reshape(n, -1) for k in ks], dim=-1)
    left = torch.linalg.svdvals(flat)[16:].square().sum()
    err = sum((la.materialize()[0] - k).square().sum() for la, k in zip((a, b), ks))
    torch.testing.assert_close(err, left, rtol=1e-6, atol=1e-9)
    back = CompressedCache.from_state(*ctx.cache.to_state())
    assert back.nbytes == ctx.cache.nbytes and back.layers[1].kc is back.layers[0].kc
    for la, lb in zip(ctx.cache.layers, back.layers):
        assert torch.equal(la.materialize()[0], lb.materialize()[0])
    assert tiny_lm.ask(ctx, "What did the keeper count?", max_new_tokens=4) is not None
    tensors, state = ctx.cache.to_state()
    state["layers"][1]["coef_from"] = 1
    with pytest.raises(ValueError, match="reads the key coefficients of layer 1, which holds none"):
        CompressedCache.from_state(tensors, state)


@pytest.mark.parametrize("spec,message", [
    ("snapkv(keep=0.5)+lowrank(rank=16,layers=2)", "needs every layer to keep the same tokens"),
    ("lowrank(rank=16,layers=2)+kivi(bits=4)", "keeps its shared coefficients unquantized"),
    ("lowrank(rank=16,layers=0)", "layers must be >= 1"),
])
def test_cross_layer_policy_errors(spec, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(spec)
