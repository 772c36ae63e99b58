import pytest
import torch
from conftest import decode_error, restores_only_with_model, tiny_llama, tiny_qwen

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.plan import KVShape, policy_nbytes
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.rope import RoPE
from memfit.kv.xquant import Remat, XLatent


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen])
def test_coordinates_of_the_input_rematerialize_k_and_v_exactly(make):
    """z = (K - b) U S^-1 is X's coordinates on the right-singular vectors W_k reads: the same z
    whether computed from K or from X, and z S U^T + b is K again (Qwen: with biases)."""
    model = make()
    attn = next(m for m in model.modules() if hasattr(m, "k_proj"))
    for proj in (attn.k_proj, attn.v_proj):
        if proj.bias is not None:  # initialised to zero: make them count
            proj.bias.data.normal_()
    r = Remat.of_model(model)[0]
    assert Remat.of_model(model)[0] is r  # factored once per model
    x = torch.randn(2, 7, model.config.hidden_size, dtype=torch.float64).float()
    for proj, f in ((attn.k_proj, r.k), (attn.v_proj, r.v)):
        h = model.config.num_key_value_heads
        k = proj(x).reshape(2, 7, h, -1).transpose(1, 2)  # [B, H, N, D]
        z = f.latent(k)
        torch.testing.assert_close(f.remat(z, h), k, rtol=1e-4, atol=1e-4)
        _, _, vt = torch.linalg.svd(proj.weight.double(), full_matrices=False)
        torch.testing.assert_close(z[:, 0].double(), x.double() @ vt.T, rtol=1e-3, atol=1e-3)


def test_xquant_cache_decodes_spills_forks_and_restores_with_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    cache, err8 = decode_error(model, ids, "xquant(bits=8,group=16,residual=16)")
    _, err2 = decode_error(model, ids, "xquant(bits=2,group=16,residual=16)")
    kivi, _ = decode_error(model, ids, "kivi(bits=8,group=16,residual=16)")
    assert err8 < 2e-3 < err2  # 8-bit coordinates: K and V back with RoPE on, at the right positions
    layer = cache.layers[0]
    assert isinstance(layer.qk, XLatent) and layer.pre_rope and layer.qk.num_tokens + layer.keys.shape[-2] == 120
    assert cache.nbytes == kivi.nbytes == policy_nbytes(cache.policy, 120, KVShape(2, 2, 16, 4))  # KIVI's bytes
    assert layer.not_packed() is not None  # the decode kernel reads KIVI codes of K and V, not of z
    restores_only_with_model(cache, model)  # the factors are the model's: restored with it, refused without
    fork = cache.fork()  # a fork's spills: z of its own tokens, at its positions 120..
    with torch.no_grad():
        got = [model(ids[:, t : t + 1], **with_cache(model, fork)).logits for t in range(120, 160)]
    assert fork.layers[0].qk is not None and fork.layers[0].origin == 120
    assert (torch.cat(got, 1) - ref[:, 120:]).abs().max() < 0.01 * ref.abs().max()


def test_xquant_through_the_api_answers_and_round_trips(tiny_lm):
    ids = torch.randint(0, 250, (1, 300), generator=torch.Generator().manual_seed(8))
    ctx = tiny_lm.prefill_ids(ids, "xquant(bits=4,group=16,residual=16)")
    assert isinstance(ctx.cache.layers[0].qk, XLatent)
    a = tiny_lm.ask(ctx, ["x", "yz"], max_new_tokens=30)
    back = CompressedCache.from_state(*ctx.cache.to_state(), model=tiny_lm.model)
    assert back.nbytes == ctx.nbytes
    assert tiny_lm.ask(type(ctx)(back, ctx.token_ids, ctx.policy, lm=tiny_lm), ["x", "yz"], max_new_tokens=30) == a


def test_bad_xquant_uses_name_the_problem():
    with pytest.raises(PolicyError, match="cannot follow an eviction"):
        parse_policy("kvzip(keep=0.5)+xquant(bits=2)")
    with pytest.raises(PolicyError, match="bits"):
        parse_policy("xquant(bits=3)")
    model = tiny_llama()
    ids = torch.randint(0, 250, (1, 200))
    with pytest.raises(ValueError, match="for_model"), torch.no_grad():  # no model: no RoPE, no weights
        model(ids, **with_cache(model, CompressedCache("xquant(group=16,residual=16)", 2)))
    with pytest.raises(ValueError, match="k_proj"), torch.no_grad():
        model(ids, **with_cache(model, CompressedCache("xquant(group=16,residual=16)", 2, rope=RoPE.from_model(model))))
    with pytest.raises(ValueError, match="k_proj"):
        CompressedCache("xquant", 2).attach_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
