"""Static decode (fixed buffers, device lengths): the same logits as the dynamic cache, across
window spills; back to a dynamic cache; clear refusals. The CUDA-graph replay itself is checked
on the GPU (marked ``gpu``)."""

import pytest
import torch
from conftest import tiny_llama

from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.layer import CompressedLayer
from memfit.kv.static import GraphDecoder

POLICY = "kivi(bits=4,group=16,residual=20)"  # a spill every 16 steps


def _prefilled(model, ids, policy=POLICY):
    cache = CompressedCache.for_model(model, policy)
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
    return cache


def _dynamic_logits(model, cache, feed):
    out = []
    with torch.no_grad():
        for i in range(feed.shape[1]):
            out.append(model(feed[:, i : i + 1], **with_cache(model, cache)).logits[:, -1])
    return torch.stack(out)


def _packed_decode_everywhere(monkeypatch):
    """The dynamic cache's CUDA decode path (spill, then attend over the packed KV) on CPU too,
    where decode_attention is the torch reference: the semantics static decode reproduces."""
    monkeypatch.setattr(CompressedLayer, "fast_decode", lambda self, ks: (
        ks.shape[-2] == 1 and self.kernels and self.parent is None and self.ragged is None and self.qk is not None
        and not self.defer))


BUDGET = "+decode(max_tokens=120,every=16,recent=8)"  # 75 + 80 tokens: evictions from the 46th step on


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("policy", [POLICY + BUDGET, "hadamard(bits=4,group=16,residual=20)" + BUDGET,
                                    "kivi(bits=2,group=16,residual=20,outliers=0.02)" + BUDGET])
def test_static_decode_keeps_a_decode_budget_as_the_dynamic_cache_does(device, policy, monkeypatch):
    """A decode budget in static decode: each step adds the attention the layer's own tokens receive
    (from the kernel's log-sum-exp), and between steps the layer keeps the best as the dynamic cache
    does: the same logits, in buffers of max_tokens + 1 tokens however many steps are asked for."""
    _packed_decode_everywhere(monkeypatch)
    model = tiny_llama(layers=2).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 75), generator=g).to(device)
    feed = torch.randint(0, 256, (3, 80), generator=g).to(device)
    dyn = _prefilled(model, ids, policy)
    ref = _dynamic_logits(model, dyn, feed)
    unbounded = _dynamic_logits(model, _prefilled(model, ids, policy.removesuffix(BUDGET)), feed)
    assert (ref[-1] - unbounded[-1]).abs().max() > 1e-3  # the budget changed what the last steps read

    cache = _prefilled(model, ids, policy).to_static(max_new_tokens=1000)
    st = cache.static_layers[0]
    assert st.capacity == 128  # max_tokens + 1, in whole key groups: not the 1,075 asked for
    dec = GraphDecoder(model, cache)
    got = []
    for i in range(feed.shape[1]):
        got.append(dec.step(feed[:, i : i + 1]).clone())
        assert st.nq + st.w <= 121
    torch.testing.assert_close(torch.stack(got), ref, rtol=2e-4, atol=2e-4)
    assert st.nq + st.w == dyn.layers[0].own_tokens()
    cache.to_dynamic()  # and on, dynamically, with the scores accumulated so far
    more = torch.randint(0, 256, (3, 20), generator=g).to(device)
    torch.testing.assert_close(_dynamic_logits(model, cache, more), _dynamic_logits(model, dyn, more),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("quant", ["kivi", "hadamard"])
def test_a_decode_budget_within_one_key_group(quant, monkeypatch):
    """A budget below one key group: the buffers hold one group (a rotated layer's codes then have no
    group past the first, which it reads as 16-bit tokens), and decoding matches the dynamic cache."""
    _packed_decode_everywhere(monkeypatch)
    policy = f"{quant}(bits=4,group=16,residual=20)+decode(max_tokens=12,every=4,recent=2)"
    model = tiny_llama(layers=2)
    g = torch.Generator().manual_seed(0)
    ids, feed = torch.randint(0, 256, (2, 30), generator=g), torch.randint(0, 256, (2, 30), generator=g)
    ref = _dynamic_logits(model, _prefilled(model, ids, policy), feed)
    cache = _prefilled(model, ids, policy).to_static(max_new_tokens=100)
    assert cache.static_layers[0].capacity == 16
    dec = GraphDecoder(model, cache)
    got = torch.stack([dec.step(feed[:, i : i + 1]).clone() for i in range(feed.shape[1])])
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("policy", [POLICY, "hadamard(bits=4,group=16,residual=20)",
                                    "hadamard(bits=4,value_bits=2,group=16,residual=20)",
                                    "hadamard(bits=2,group=16,residual=20,meta_bits=8)",
                                    # spills take RoPE off at their positions; the kernel puts it back
                                    "kivi(bits=4,group=16,residual=20,pre_rope=true)",
                                    # sparse outliers: the kernel's lists in fixed buffers, each spill's appended
                                    "kivi(bits=2,group=16,residual=20,outliers=0.02)",
                                    "kivi(bits=4,group=16,residual=20,pre_rope=true,outliers=0.02)"])
def test_static_decode_equals_the_dynamic_cache(device, policy, monkeypatch):
    _packed_decode_everywhere(monkeypatch)
    model = tiny_llama(layers=2).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 75), generator=g).to(device)
    feed = torch.randint(0, 256, (3, 40), generator=g).to(device)
    ref = _dynamic_logits(model, _prefilled(model, ids, policy), feed)

    cache = _prefilled(model, ids, policy).to_static(max_new_tokens=40)
    nq0 = cache.static_layers[0].nq
    dec = GraphDecoder(model, cache)  # a CUDA graph on the GPU, eager here
    got = torch.stack([dec.step(feed[:, i : i + 1]).clone() for i in range(feed.shape[1])])
    assert cache.static_layers[0].nq > nq0  # the window spilled while decoding
    assert cache.get_seq_length() == 75 + 40
    for buf in cache.static_layers[0].out or ():  # the spills' outliers were listed too
        assert int(buf.used.min()) > 0
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)

    # back to a dynamic cache: it holds what the dynamic one holds, and decodes on the same way
    dyn = _prefilled(model, ids, policy)
    _dynamic_logits(model, dyn, feed)
    cache.to_dynamic()
    assert cache.static_layers is None and cache.nbytes == dyn.nbytes
    for a, b in zip(cache.layers, dyn.layers):  # (the second layer's inputs differ by float rounding)
        codes = [getattr(x.qk, "q", x.qk).codes for x in (a, b)]  # rotated codes: their KIVI part
        assert (codes[0] == codes[1]).float().mean() > 0.999
        torch.testing.assert_close(a.keys, b.keys)
    more = torch.randint(0, 256, (3, 3), generator=g).to(device)
    torch.testing.assert_close(_dynamic_logits(model, cache, more), _dynamic_logits(model, dyn, more))


def test_static_decode_refuses_what_it_cannot_hold():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 256, (1, 40))
    with pytest.raises(ValueError, match="no KIVI quantizer"):
        _prefilled(model, ids, "none").to_static(8)
    cache = _prefilled(model, ids).to_static(max_new_tokens=16)
    with pytest.raises(ValueError, match="one token a step"):
        model(ids[:, :2], **with_cache(model, cache))
    with pytest.raises(RuntimeError, match="to_dynamic"):
        cache.to_state()
    dec = GraphDecoder(model, cache)
    with pytest.raises(RuntimeError, match="exceed the capacity"):
        for _ in range(64):
            dec.step(ids[:, :1])
    with pytest.raises(ValueError, match="to_static"):
        GraphDecoder(model, _prefilled(model, ids))


def test_a_static_step_over_a_full_static_cache_runs_unmasked_and_equals_the_dynamic_cache():
    """``memfit_static_step`` says every slot is filled: memfit's attention drops transformers' mask
    (so SDPA can run its GQA kernel), which is exact for a full cache: `bench decode`'s 16-bit
    graph baseline."""
    from transformers import DynamicCache, StaticCache

    model = tiny_llama()
    ids = torch.randint(0, 250, (2, 41))
    prompt = ids[:, :40]
    with torch.no_grad():
        dyn = DynamicCache(config=model.config)
        model(prompt, **with_cache(model, dyn))
        want = model(ids[:, 40:], **with_cache(model, dyn)).logits
        for slots in (41, 48):  # full, then with empty slots (which the mask must hide)
            cache = StaticCache(config=model.config, max_cache_len=slots)
            for s in range(0, 40, 16):
                model(prompt[:, s : s + 16], **with_cache(model, cache), cache_position=torch.arange(s, min(s + 16, 40)))
            got = model(ids[:, 40:], **with_cache(model, cache), cache_position=torch.tensor([40]),
                        memfit_static_step=slots == 41).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")  # inductor's hint for a float32 model on CUDA
def test_a_compiled_static_step_equals_the_uncompiled_one(device):
    """``GraphDecoder(compile=True)``: the step torch.compile'd (the append and the packed-KV
    attention left out of the trace) gives the same logits across a window spill, and the cache
    ends as the uncompiled one does; on the GPU the compiled step is also captured as a graph."""
    import torch._dynamo

    model = tiny_llama(layers=2).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 75), generator=g).to(device)
    feed = torch.randint(0, 256, (2, 20), generator=g).to(device)
    out = []
    for compile in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cache = _prefilled(model, ids).to_static(max_new_tokens=24)
        dec = GraphDecoder(model, cache, compile=compile)
        out.append((torch.stack([dec.step(feed[:, i : i + 1]).clone() for i in range(feed.shape[1])]), cache))
    (plain, c0), (compiled, c1) = out
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the second run was compiled
    assert c1.static_layers[0].nq > 64  # the window spilled while decoding
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
    for a, b in zip(c0.static_layers, c1.static_layers):
        assert (a.nq, a.w) == (b.nq, b.w)
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)


def test_static_outlier_buffers_take_a_spill_fuller_than_the_prefill():
    """The kernel reads any number of outliers a key group, so a spill with more in one key group than
    the prefill had is listed as it is: its entries after the prefill's, at its tokens' indices."""
    from memfit.kv.quant import kernel_outliers, quantize_keys
    from memfit.kv.static import _OutlierBuffers

    g = torch.Generator().manual_seed(0)
    q = quantize_keys(torch.randn(1, 1, 32, 16, generator=g), 4, 16, outliers=0.05)
    fuller = quantize_keys(torch.randn(1, 1, 32, 16, generator=g), 4, 16, outliers=0.2)
    buf = _OutlierBuffers(1, 1, 8, 1000, torch.device("cpu"))
    parts = [kernel_outliers(x, 1, 16) for x in (q, fuller)]
    buf.write(q, parts[0], 0, 16)
    buf.write(fuller, parts[1], 64, 16)
    counts = [int(o.ptr[..., -1] - o.ptr[..., 0]) for o in parts]
    assert counts[1] > 2 * counts[0] > 0
    n = sum(counts)
    assert int(buf.ptr[0, 0, -1] - buf.ptr[0, 0, 0]) == n
    assert torch.equal(buf.tok[:n], torch.cat((parts[0].tok, parts[1].tok + 64)))
    assert torch.equal(buf.val[:n], torch.cat((parts[0].val, parts[1].val)))
    tiles = buf.ptr[0, 0]  # key groups 4-5 (tokens 64-95) hold the spill's entries
    assert int(tiles[6] - tiles[4]) == counts[1] and int(tiles[2] - tiles[0]) == counts[0]
