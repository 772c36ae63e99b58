import pytest
import torch

from memfit.kv.cache import CompressedCache
from memfit.kv.policy import PolicyError, parse_policy
from memfit.kv.quant import KIVI, LayerBits, attention_error

TEXT = "The keeper of the northern light logged every passing ship by name. " * 24


def test_assign_spends_bits_where_the_error_drops_most():
    errors = [{2: 0.50, 4: 0.05, 8: 0.04},  # very sensitive at 2 bits
              {2: 0.02, 4: 0.01, 8: 0.005},
              {2: 0.30, 4: 0.10, 8: 0.01}]
    assert LayerBits(bits=3).assign(errors) == [4, 2, 2]  # 9 bits to spend: one upgrade, the best one
    assert LayerBits(bits=3.4).assign(errors) == [4, 2, 4]  # 10.2: the next best
    assert LayerBits(bits=4).assign(errors) == [4, 4, 4]
    assert LayerBits(bits=2).assign(errors) == [2, 2, 2]
    assert LayerBits(bits=8).assign(errors) == [8, 8, 8]


def test_assign_never_exceeds_the_target_mean():
    g = torch.Generator().manual_seed(0)
    for target in (2.5, 3, 4, 5.5):
        errs = [{2: float(a), 4: float(a) / 4, 8: float(a) / 16} for a in torch.rand(30, generator=g)]
        bits = LayerBits(bits=target).assign(errs)
        assert sum(bits) / len(bits) <= target


def test_attention_error_shrinks_with_bits():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h, n in ((4, 8), (2, 256), (2, 256)))
    e = [attention_error(q, k, v, KIVI(b, 32, 16)) for b in (2, 4, 8)]
    assert e[0] > e[1] > e[2] > 0


def test_prefill_measures_each_layer_and_stores_its_bits(tiny_lm):
    ctx = tiny_lm.prefill(TEXT, "kvtuner(bits=3,group=16,residual=16,window=8)")
    bits = [layer.qk.bits for layer in ctx.cache.layers]
    assert set(bits) <= {2, 4, 8} and sum(bits) / len(bits) <= 3
    tensors, state = ctx.cache.to_state()
    back = CompressedCache.from_state(tensors, state)
    assert [layer.quant.bits for layer in back.layers] == bits
    fork = back.fork(1)
    assert [layer.quant.bits for layer in fork.layers] == bits  # new tokens spill at their layer's width
    uni = tiny_lm.prefill(TEXT, "kivi(bits=2,group=16,residual=16)")
    assert ctx.nbytes >= uni.nbytes


def test_layer_bits_without_measurement_uses_the_widest_choice_within_the_target():
    cache = CompressedCache("kvtuner(bits=5)", 2)
    assert [layer.quant.bits for layer in cache.layers] == [4, 4]
    with pytest.raises(PolicyError, match="target mean"):
        parse_policy("kvtuner(bits=9)")
    assert parse_policy("snapkv(keep=0.3)+kvtuner(bits=3)").queries_needed() == 32
