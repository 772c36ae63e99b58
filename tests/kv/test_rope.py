import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.quant import dequantize
from memfit.kv.rope import RoPE


def test_rope_matches_the_model_and_inverts():
    model = tiny_llama(torch.float64)
    rope = RoPE.from_model(model)
    k = torch.randn(1, 2, 40, model.config.head_dim, dtype=torch.float64)
    pos = torch.arange(100, 140)
    cos, sin = model.model.rotary_emb(k, pos[None])
    _, want = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(rope.rotate(k, pos), want.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(rope.unrotate(rope.rotate(k, pos), pos), k.float(), rtol=0, atol=1e-5)
    scaled = RoPE(rope.inv_freq, scaling=1.3)
    torch.testing.assert_close(scaled.unrotate(scaled.rotate(k, pos), pos), k.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scaling", [1.0, 1.3])
def test_shifted_keys_equal_keys_computed_at_the_new_positions(scaling):
    """A document's keys computed at positions 0.. and moved by RoPE's composition equal the keys
    the model computes at the new positions (what reusing a stored document elsewhere needs)."""
    model = tiny_llama(torch.float64)
    rope = RoPE(RoPE.from_model(model).inv_freq, scaling=scaling)
    k = torch.randn(1, 2, 40, model.config.head_dim, dtype=torch.float64)
    at0 = rope.rotate(k, torch.arange(40))
    for delta in (0, 7, 1000, -3):
        want = rope.rotate(k, torch.arange(40) + delta)
        torch.testing.assert_close(rope.shift(at0, delta), want, rtol=0, atol=1e-4)
    spread = torch.arange(40) * 3  # one delta per token
    torch.testing.assert_close(rope.shift(at0, spread), rope.rotate(k, torch.arange(40) + spread), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="one per token"):
        rope.shift(at0, torch.zeros(3))
    m = rope.shift_matrix(1000)
    torch.testing.assert_close(rope.apply_shift(at0, m), rope.shift(at0, 1000), rtol=0, atol=1e-5)  # float32
    # 16-bit keys move in their own dtype: within about a unit in the last place of the exact move
    low = at0.bfloat16()
    moved, exact = rope.apply_shift(low, m), rope.shift(low, 1000)
    assert moved.dtype == torch.bfloat16
    assert (moved.float() - exact).abs().max() < 2.0**-6 * exact.abs().max()
    rounding = (exact.bfloat16().float() - exact).pow(2).mean().sqrt()
    assert (moved.float() - exact).pow(2).mean().sqrt() < 1.5 * rounding


def test_pre_rope_cache_stores_keys_before_rope_and_reads_them_back_rotated():
    model = tiny_llama(torch.float64)
    ids = torch.randint(0, 250, (1, 70), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache.for_model(model, "kivi(bits=8,group=16,residual=16,pre_rope=true)")
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        model(ids, **with_cache(model, ref))
        for t in range(5):  # decoding spills more groups at later positions
            nxt = torch.tensor([[7 + t]])
            model(nxt, **with_cache(model, cache))
            model(nxt, **with_cache(model, ref))
    layer, keys = cache.layers[1], ref.layers[1].keys
    n = layer.qk.num_tokens
    assert n == 64
    # the codes hold the keys with RoPE taken off (8-bit: within a small step of them) ...
    pre = RoPE.from_model(model).unrotate(keys[:, :, :n], torch.arange(n))
    assert (dequantize(layer.qk) - pre).abs().max() < 0.02 * pre.abs().max()
    # ... and what attention reads is the rotated keys again, at their own positions
    got, _ = layer.materialize()
    assert (got - keys).abs().max() < 0.02 * keys.abs().max()
    assert (dequantize(layer.qk) - keys[:, :, :n].float()).abs().max() > 0.1 * keys.abs().max()  # not post-RoPE


def test_pre_rope_needs_the_model_and_no_eviction():
    model = tiny_llama()
    cache = CompressedCache("kivi(bits=4,group=16,residual=16,pre_rope=true)", 2)  # no model: no RoPE
    with pytest.raises(ValueError, match="CompressedCache.for_model"), torch.no_grad():
        model(torch.randint(0, 250, (1, 40)), **with_cache(model, cache))
    with pytest.raises(PolicyError, match="nor an eviction unless the quantizer is klt"):
        parse_policy("snapkv(keep=0.5)+kivi(bits=4,pre_rope=true)")
    with pytest.raises(PolicyError, match="must be true or false"):
        parse_policy("kivi(pre_rope=maybe)")
    p = parse_policy("kivi(bits=2,pre_rope=1)")
    assert p.spec == "kivi(bits=2,group=64,residual=128,pre_rope=True)" and parse_policy(p.spec) == p


def test_pre_rope_context_answers_and_round_trips(tiny_lm):
    text = "The lighthouse keeper counted ships. " * 12
    ctx = tiny_lm.prefill(text, "kivi(bits=4,group=16,residual=16,pre_rope=true)")
    assert ctx.cache.layers[0].qk is not None and ctx.cache.layers[0].pre_rope
    ref = DynamicCache(config=tiny_lm.model.config)
    with torch.no_grad():
        tiny_lm.model(ctx.token_ids, **with_cache(tiny_lm.model, ref))
    keys = ref.layers[0].keys  # the prefill path (compress, then spill) also takes RoPE off and puts it back
    assert (ctx.cache.layers[0].materialize()[0] - keys).norm() < 0.1 * keys.norm()
    a = tiny_lm.ask(ctx, ["x", "yz"], max_new_tokens=5)  # forks: their own tokens stay after RoPE
    tensors, state = ctx.cache.to_state()
    assert "rope.inv_freq" in tensors
    back = CompressedCache.from_state(tensors, state)
    assert back.nbytes == ctx.nbytes and back.rope is not None
    assert tiny_lm.ask(type(ctx)(back, ctx.token_ids, ctx.policy, lm=tiny_lm), ["x", "yz"], max_new_tokens=5) == a


def test_pre_rope_cache_saved_before_its_first_spill_can_still_spill(tiny_lm):
    ctx = tiny_lm.prefill("short", "kivi(bits=4,group=16,residual=16,pre_rope=true)")
    assert ctx.cache.layers[0].qk is None  # nothing quantized yet
    back = CompressedCache.from_state(*ctx.cache.to_state())
    assert back.rope is not None
    more = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = DynamicCache(config=tiny_lm.model.config)
    with torch.no_grad():
        tiny_lm.model(more, **with_cache(tiny_lm.model, back))
        tiny_lm.model(torch.cat([ctx.token_ids, more], dim=1), **with_cache(tiny_lm.model, ref))
    assert back.layers[0].qk is not None
    keys = ref.layers[0].keys  # the spilled keys went through RoPE off and on at their own positions
    assert (back.layers[0].materialize()[0] - keys).norm() < 0.1 * keys.norm()


def test_the_kernel_gets_one_copy_of_inv_freq_per_device():
    """A decode step's pre-RoPE run reads the same inv_freq tensor every step (no copy a step; the
    kernel's offset table is built once per tensor); Llama's default RoPE is the model's."""
    model = tiny_llama(torch.float32)
    rope = RoPE.from_model(model)
    torch.testing.assert_close(RoPE.default(model.config.head_dim).inv_freq, rope.inv_freq)  # base 10000
    args = rope.kernel_args("cpu")
    assert args["rope"] is rope.inv_freq_on(torch.device("cpu")) and args["rope_scaling"] == rope.scaling
    cache = CompressedCache.for_model(model, "kivi(bits=4,group=16,residual=16,pre_rope=true)")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 64)), **with_cache(model, cache))
    runs = [cache.layers[0].runs(1)[0] for _ in range(2)]
    assert runs[0].rope is runs[1].rope and runs[0].rope_scaling == rope.scaling
